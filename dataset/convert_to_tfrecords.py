"""Convert a list of `image_path label_path` lines, or a Cityscapes split,
into an AdapNet++ record.

    python dataset/convert_to_tfrecords.py --file list.txt --record out.tfrecords \
        [--mean mean.npy] [--resize HxW] [--num_classes N]
    python dataset/convert_to_tfrecords.py --cityscapes ROOT --split train|val \
        --classes 19|12 --record out.tfrecords [--mean mean.npy] [--resize HxW]

Relative paths in the list are resolved against the list file's directory;
blank lines and lines starting with '#' are skipped. Images (PNG/JPEG, read
with Pillow) are stored in BGR order, which is what OpenCV's imread returns
and what existing AdapNet++ records hold. Labels are single-channel PNGs of
class ids (mode L or P; for P the palette index is the id, not its colour).
With --resize images are resized bilinearly and labels by nearest neighbour.

--cityscapes reads ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png with their
ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png, maps the label ids to training
classes (dataset/cityscapes.py) and writes the class names beside the record
(out.classes.txt), for the `classes` config key.
"""

import argparse
import contextlib
import os
import sys

if __package__ in (None, ""):
    # Run as a path: make `common` and `dataset` importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common.errors import INTERRUPT_EXIT, UserError, one_line
from common.outputs import check_outputs

# Pillow modes whose values are plain 8-bit class ids.
_LABEL_MODES = ("L", "P", "1")
_COLOUR_LABEL_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA")


def read_list_file(list_path):
    """[(image_path, label_path)] from a list file, paths made absolute."""
    try:
        with open(list_path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"list file not found: {list_path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read list file {list_path}: {exc}") from None
    base_dir = os.path.dirname(os.path.abspath(list_path))
    pairs = []
    for line_number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        fields = stripped.split()
        if len(fields) != 2:
            raise UserError(
                f"{list_path} line {line_number}: expected 'image_path label_path', "
                f"got {len(fields)} fields: {stripped!r}")
        pairs.append(tuple(os.path.join(base_dir, os.path.expanduser(field))
                           for field in fields))
    if not pairs:
        raise UserError(f"list file has no entries: {list_path}")
    return pairs


def parse_size(text):
    """'HxW' -> (H, W) positive ints."""
    parts = str(text).lower().split("x")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise UserError(f"size must look like HxW (e.g. 384x768), got {text!r}") from None
    if height < 1 or width < 1:
        raise UserError(f"size must be positive, got {text!r}")
    return height, width


def _open_image(path, what):
    """Decoded PIL image; UserError naming the file if it is missing or bad."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot decode {what} {path}: {one_line(exc)}") from None


def _image_to_bgr(image, path, size=None):
    if image.mode.startswith("I") or image.mode == "F":
        raise UserError(f"image {path} has unsupported mode {image.mode} "
                        f"(expected 8-bit grayscale or colour)")
    rgb = image.convert("RGB")  # drops alpha, expands grayscale and palettes
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[:, :, ::-1])


def _image_to_label(image, path, size=None, label_map=None):
    if image.mode in _COLOUR_LABEL_MODES:
        raise UserError(f"label {path} has {len(image.getbands())} channels "
                        f"(mode {image.mode}); expected single-channel class ids")
    if image.mode in _LABEL_MODES:
        # For mode P this is the palette index, not the colour.
        ids = np.asarray(image, dtype=np.uint8)
    elif image.mode.startswith("I") or image.mode == "F":
        wide = np.asarray(image)
        if wide.size and (wide.min() < 0 or wide.max() > 255
                          or not np.array_equal(wide, np.round(wide))):
            raise UserError(f"label {path} holds values that are not class ids 0..255 "
                            f"(mode {image.mode}, max {wide.max()})")
        ids = wide.astype(np.uint8)
    else:
        raise UserError(f"label {path} has unsupported mode {image.mode}")
    if label_map is not None:  # on the full label: every id is checked
        ids = label_map(ids, path)
    if size is not None and ids.shape != tuple(size):
        ids = np.asarray(Image.fromarray(ids, mode="L").resize(
            (size[1], size[0]), Image.NEAREST), dtype=np.uint8)
    return np.ascontiguousarray(ids)


def convert(list_path, record_path, mean_path=None, resize=None, num_classes=None,
            progress=True):
    """Write record_path (and the BGR mean image to mean_path); returns the count.

    resize: None or (height, width). Without it all images must share one size,
    since a record is read at a single network input size.
    """
    if num_classes is not None and (isinstance(num_classes, bool)
                                    or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= 256):
        raise UserError(f"num_classes must be an integer in 1..256, got {num_classes!r}")
    if resize is not None:
        resize = tuple(int(value) for value in resize)
    pairs = read_list_file(list_path)
    # Fail before the (long) conversion if any file is missing.
    for image_path, label_path in pairs:
        for path, what in ((image_path, "image"), (label_path, "label")):
            if not os.path.isfile(path):
                raise UserError(f"{what} file not found: {path} (listed in {list_path})")

    def check_label(label, label_path):
        if num_classes is not None and label.size:
            max_id = int(label.max())
            if max_id >= num_classes:
                raise UserError(f"label {label_path} has class id {max_id} "
                                f">= num_classes ({num_classes})")
    inputs = {"--file": [list_path],
              "a listed file": [path for pair in pairs for path in pair]}
    return _convert_pairs(pairs, record_path, inputs, mean_path, resize,
                          progress, check_label=check_label)


def convert_cityscapes(root, split, classes, record_path, mean_path=None, resize=None,
                       progress=True):
    """Write record_path from a Cityscapes split (dataset/cityscapes.py), the
    class names to classes_path(record_path) and, optionally, the mean image;
    returns the count."""
    from dataset import cityscapes

    class_set = cityscapes.ClassSet(classes)
    if resize is not None:
        resize = tuple(int(value) for value in resize)
    pairs = cityscapes.find_pairs(root, split)
    names_path = cityscapes.classes_path(record_path)
    text = cityscapes.classes_text(class_set.names)

    def write_names():
        from common.files import replace_atomically

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
        replace_atomically(names_path, write)
    inputs = {"a --cityscapes file": [path for pair in pairs for path in pair]}
    return _convert_pairs(pairs, record_path, inputs, mean_path, resize,
                          progress, label_map=class_set.classes_of,
                          more_outputs={"classes file": [names_path]}, finish=write_names)


def _convert_pairs(pairs, record_path, inputs, mean_path, resize, progress,
                   check_label=None, label_map=None, more_outputs=None, finish=None):
    """The conversion loop of both modes; ``finish()`` writes any other
    output inside the record's writer block (a failure discards the record)."""
    written = {"--record": [record_path]}
    if mean_path is not None:
        written["--mean"] = [mean_path]
    written.update(more_outputs or {})
    check_outputs(written, inputs)
    # Imported only now so list and file errors are reported without loading TF.
    from dataset.records import encode_example, record_writer, save_npy_atomic

    mean_sum = None
    common_size = resize
    first_path = None
    bar = tqdm(pairs, desc="converting", unit="image", disable=not progress)
    # The bar is closed (its line ended) before an error or `interrupted` is printed.
    with record_writer(record_path) as writer, contextlib.closing(bar):
        for image_path, label_path in bar:
            image_file = _open_image(image_path, "image")
            label_file = _open_image(label_path, "label")
            image_size = (image_file.height, image_file.width)
            label_size = (label_file.height, label_file.width)
            if image_size != label_size:
                raise UserError(
                    f"size mismatch: image {image_path} is {_hxw(image_size)} but "
                    f"label {label_path} is {_hxw(label_size)}")
            if common_size is None:
                common_size, first_path = image_size, image_path
            elif resize is None and image_size != common_size:
                raise UserError(
                    f"image {image_path} is {_hxw(image_size)} but {first_path} is "
                    f"{_hxw(common_size)}; use --resize HxW to store one size")
            image = _image_to_bgr(image_file, image_path, resize)
            label = _image_to_label(label_file, label_path, resize, label_map)
            if check_label is not None:
                check_label(label, label_path)
            writer.write(encode_example(image, label))
            if mean_path is not None:
                if mean_sum is None:
                    mean_sum = np.zeros(image.shape, np.float64)
                mean_sum += image
        if mean_path is not None:
            # Inside the writer block: a failure here also discards the record.
            save_npy_atomic(mean_path, (mean_sum / len(pairs)).astype(np.float32))
        if finish is not None:
            finish()
    return len(pairs)


def _hxw(size):
    return f"{size[0]}x{size[1]}"


def build_arg_parser():
    parser = argparse.ArgumentParser(
        description="Convert 'image_path label_path' lines, or a Cityscapes split, into an "
                    "AdapNet++ TFRecord (images stored BGR, labels as uint8 class ids).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file",
                        help="text file with one 'image_path label_path' per line")
    source.add_argument("--cityscapes", metavar="ROOT",
                        help="Cityscapes root (holding leftImg8bit/ and gtFine/)")
    parser.add_argument("--split", choices=("train", "val"),
                        help="--cityscapes: the split to convert")
    parser.add_argument("--classes", type=int, choices=(19, 12),
                        help="--cityscapes: 19 (official classes, num_classes 20 with "
                             "void) or 12 (AdapNet++'s 11 + void)")
    parser.add_argument("--record", required=True, help="output .tfrecords path")
    parser.add_argument("--mean", help="also write the mean image (float32 HxWx3, BGR) "
                                       "to this .npy path")
    parser.add_argument("--resize", metavar="HxW",
                        help="resize images (bilinear) and labels (nearest)")
    parser.add_argument("--num_classes", type=int,
                        help="--file: reject labels with class ids >= this")
    parser.add_argument("--no_progress", action="store_true",
                        help="do not show a progress bar")
    return parser


def main(argv=None):
    """Exit status: 0, 2 for bad input, 130 for Ctrl-C (docs/errors.md)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # record_writer has removed its temporary file: nothing partial is left.
        print("interrupted", file=sys.stderr)
        return INTERRUPT_EXIT


def _main(argv):
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.cityscapes is not None:
        if args.split is None or args.classes is None:
            parser.error("--cityscapes needs --split and --classes")
        if args.num_classes is not None:
            parser.error("--num_classes is for --file (--classes sets it with --cityscapes)")
    elif args.split is not None or args.classes is not None:
        parser.error("--split and --classes go with --cityscapes")
    from common.runtime import import_tensorflow_quietly
    import_tensorflow_quietly()
    try:
        resize = parse_size(args.resize) if args.resize is not None else None
        if args.cityscapes is not None:
            count = convert_cityscapes(args.cityscapes, args.split, args.classes,
                                       args.record, mean_path=args.mean, resize=resize,
                                       progress=not args.no_progress)
        else:
            count = convert(args.file, args.record, mean_path=args.mean,
                            resize=resize, num_classes=args.num_classes,
                            progress=not args.no_progress)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    message = f"wrote {count} examples to {args.record}"
    if args.cityscapes is not None:
        from dataset.cityscapes import ClassSet, classes_path
        message += (f", class names to {classes_path(args.record)} (num_classes "
                    f"{ClassSet(args.classes).num_classes})")
    print(message + (f" and the mean image to {args.mean}" if args.mean else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
