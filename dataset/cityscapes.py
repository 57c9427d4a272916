"""Cityscapes in and out (README "Cityscapes"): its folder layout, its label
ids mapped to our training classes and back, the classes file, and its
official pixel-level evaluation run on predict.py --cityscapes_ids' output:

    python dataset/cityscapes.py --cityscapes ROOT --split val --predictions DIR

Training classes follow our format: 0 is void, the classes are 1..N-1.
  19: Cityscapes' official trainIds shifted by one (trainId t -> class t + 1);
      every label whose trainId is 255 (ignored in its evaluation) -> void.
  12: AdapNet++'s 11 classes + void, each made of the Cityscapes labels in
      ADAPNET_12_LABELS; every other label -> void.
The label table (ids, names, trainIds) comes from cityscapesscripts, the
dataset's own scripts, so the ids are the ones its evaluation expects.
"""

import argparse
import contextlib
import glob
import io
import math
import os
import sys

if __package__ in (None, ""):
    # Run as a path: make `common` and `dataset` importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from common.errors import USER_ERROR_EXIT, UserError

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val", "test")
CLASS_SETS = (19, 12)

# AdapNet++'s Cityscapes classes in class-id order (netcompress/formats/palette.py
# has their colours): each lists the Cityscapes labels it is made of; the
# first one is what predict.py --cityscapes_ids writes for it.
ADAPNET_12_LABELS = (
    ("sky", ("sky",)),
    ("building", ("building",)),
    ("road", ("road",)),
    ("sidewalk", ("sidewalk",)),
    ("fence", ("fence",)),
    ("vegetation", ("vegetation",)),
    ("pole", ("pole",)),
    ("car", ("car", "truck", "bus")),
    ("sign", ("traffic sign",)),
    ("pedestrian", ("person",)),
    ("cyclist", ("rider", "bicycle", "motorcycle")),
)


def _labels():
    from cityscapesscripts.helpers.labels import labels
    # id -1 (license plate) never appears in a label image.
    return [label for label in labels if label.id >= 0]


class ClassSet:
    """One mapping between Cityscapes label ids and our class ids.

    ``to_class``: uint8 [256] lookup, label id -> class id; ``known``: bool
    [256], which label ids exist; ``to_label_id``: uint8 [classes], class id
    -> the label id written for it (void -> 0, 'unlabeled'); ``names``:
    class names by class id, 'void' first."""

    def __init__(self, classes):
        if classes not in CLASS_SETS:
            raise UserError(f"--classes must be 19 or 12, got {classes!r}")
        labels = _labels()
        by_name = {label.name: label for label in labels}
        self.to_class = np.zeros(256, np.uint8)
        self.known = np.zeros(256, bool)
        for label in labels:
            self.known[label.id] = True
        if classes == 19:
            by_train_id = {}
            for label in labels:
                if 0 <= label.trainId < 255:
                    by_train_id.setdefault(label.trainId, []).append(label.name)
            # A trainId is named, and written back, as its first label in the
            # table, as in cityscapesscripts' own inverse table.
            groups = [(names[0], names) for _, names in sorted(by_train_id.items())]
        else:
            groups = [(name, list(members)) for name, members in ADAPNET_12_LABELS]
        self.num_classes = len(groups) + 1
        self.names = ["void"] + [name for name, _ in groups]
        self.to_label_id = np.zeros(self.num_classes, np.uint8)
        for class_id, (_, members) in enumerate(groups, start=1):
            for member in members:
                self.to_class[by_name[member].id] = class_id
            self.to_label_id[class_id] = by_name[members[0]].id

    def classes_of(self, label_ids, path):
        """Class ids of a label image of Cityscapes label ids; a UserError
        naming the file for an id Cityscapes does not have."""
        label_ids = np.asarray(label_ids, np.uint8)
        unknown = ~self.known[label_ids]
        if unknown.any():
            raise UserError(f"label {path} holds id {int(label_ids[unknown][0])}, which is "
                            f"no Cityscapes label id (0..{int(np.flatnonzero(self.known)[-1])})")
        return self.to_class[label_ids]

    def label_ids_of(self, class_map):
        """Cityscapes label ids of a class map (the inverse mapping)."""
        return self.to_label_id[np.asarray(class_map, np.intp)]


def class_set_for(num_classes):
    """The ClassSet a model of ``num_classes`` (void included) was trained
    with: 20 -> the 19 official classes, 12 -> AdapNet++'s."""
    if num_classes == 20:
        return ClassSet(19)
    if num_classes == 12:
        return ClassSet(12)
    raise UserError(f"--cityscapes_ids needs a model of 20 classes (void + Cityscapes' 19) "
                    f"or 12 (void + AdapNet++'s 11), not num_classes {num_classes}")


def find_pairs(root, split):
    """[(image, label)] of ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and
    their ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png, sorted; a missing
    folder or label is a UserError naming it."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    image_dir = os.path.join(root, "leftImg8bit", split)
    label_dir = os.path.join(root, "gtFine", split)
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise UserError(f"Cityscapes folder not found: {folder}")
    images = sorted(glob.glob(os.path.join(glob.escape(image_dir), "*", "*" + IMAGE_SUFFIX)))
    if not images:
        raise UserError(f"no */*{IMAGE_SUFFIX} in {image_dir}")
    pairs = []
    for image in images:
        city = os.path.basename(os.path.dirname(image))
        stem = os.path.basename(image)[:-len(IMAGE_SUFFIX)]
        label = os.path.join(label_dir, city, stem + LABEL_SUFFIX)
        if not os.path.isfile(label):
            raise UserError(f"no label for {image}: {label} not found")
        pairs.append((image, label))
    return pairs


def classes_path(record_path):
    """The classes file written beside a record: data/x.tfrecords ->
    data/x.classes.txt."""
    stem, extension = os.path.splitext(record_path)
    return (stem if extension.lower() in (".tfrecords", ".tfrecord") else record_path) \
        + ".classes.txt"


def classes_text(names):
    """`ID NAME` lines (netcompress/palette.read_class_names reads them)."""
    return "".join(f"{index} {name}\n" for index, name in enumerate(names))


def official_evaluation(root, split, predictions):
    """Cityscapes' own pixel-level evaluation (cityscapesscripts'
    evalPixelLevelSemanticLabeling, unchanged) of the predictions under
    ``predictions`` against ROOT/gtFine/SPLIT; returns its result dict
    ('classScores' {label name: IoU or NaN}, 'averageScoreClasses', ...).

    Run in-process with its own functions and an argument object of its
    own kind; only two settings differ from its command line: no JSON file
    is written, and the instance-level scores (iIoU) are off, as they need
    the *_instanceIds.png files and numpy's removed ``in1d``."""
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = official.CArgs()
    args.__dict__.update(vars(official.args))
    args.predictionPath, args.predictionWalk = predictions, None
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    ground_truth = sorted(glob.glob(os.path.join(glob.escape(root), "gtFine", split, "*",
                                                 "*" + LABEL_SUFFIX)))
    if not ground_truth:
        raise UserError(f"no */*{LABEL_SUFFIX} in {os.path.join(root, 'gtFine', split)}")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            found = [official.getPrediction(args, path) for path in ground_truth]
            return official.evaluateImgLists(found, ground_truth, args)
    except SystemExit:
        # Its printError prints the reason, then exits.
        reason = " ".join(printed.getvalue().split()) or "no reason given"
        raise UserError(f"Cityscapes' evaluation of {predictions} stopped: {reason}") \
            from None


def evaluation_report(result):
    """The official result as evaluate.py lays out its table (IoU in %)."""
    ignored = {label.name for label in _labels() if label.ignoreInEval}
    lines = [f"{'class':<14}  {'IoU %':>7}"]
    for name, score in result["classScores"].items():
        if name in ignored:
            continue
        lines.append(f"{name:<14}  {'-' if math.isnan(score) else f'{100 * score:.2f}':>7}")
    lines.append(f"mIoU: {100 * result['averageScoreClasses']:.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Cityscapes' official pixel-level evaluation (cityscapesscripts) of "
                    "predict.py --cityscapes_ids' output, without the instance-level "
                    "scores.")
    parser.add_argument("--cityscapes", required=True, metavar="ROOT",
                        help="Cityscapes root (holding gtFine/)")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--predictions", required=True, metavar="DIR",
                        help="the --output of predict.py --cityscapes_ids")
    args = parser.parse_args(argv)
    try:
        if not os.path.isdir(args.predictions):
            raise UserError(f"--predictions {args.predictions!r} is not a directory")
        print(evaluation_report(official_evaluation(args.cityscapes, args.split,
                                                    args.predictions)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
