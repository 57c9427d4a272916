"""Cityscapes in and out (README "Cityscapes"): the converter's --cityscapes
mode, the classes file, predict.py --cityscapes_ids, and agreement of
evaluate.py's IoUs with Cityscapes' own evaluation."""

import glob
import math
import os

import numpy as np
import pytest
from PIL import Image

from helpers import run_script_in_process, scaled_model_def, write_config, write_json
from common.errors import UserError
from dataset import cityscapes
from dataset.convert_to_tfrecords import convert_cityscapes
from dataset.records import read_examples

HEIGHT, WIDTH = 32, 64
# Label ids drawn (cityscapesscripts' table): road 7, sidewalk 8, building 11,
# vegetation 21, sky 23, person 24, car 26; and ids whose trainId is 255, so
# void in training and ignored by the official evaluation: unlabeled 0,
# ego vehicle 1, parking 9, caravan 29.
VOID_IDS = (0, 1, 9, 29)


def label_ids(rng):
    ids = np.full((HEIGHT, WIDTH), 7, np.uint8)
    top = int(rng.integers(8, 14))
    ids[:top] = 23
    ids[top:top + 6, :WIDTH // 2] = 11
    ids[top:top + 6, WIDTH // 2:] = 21
    ids[top + 6:top + 9] = 8
    left = int(rng.integers(0, WIDTH - 20))
    ids[top + 8:top + 14, left:left + 16] = 26
    ids[top + 6:top + 12, left + 17:left + 19] = 24
    ids[-3:] = 1
    ids[-6:-3, :6] = 9
    ids[0] = 0
    ids[top + 2:top + 4, 2:6] = 29
    return ids


def image_of(ids, rng):
    """Colours that follow the label (a few training steps find something)."""
    wide = ids.astype(np.int64)
    base = np.stack([(wide * 37) % 256, (wide * 91) % 256, (wide * 53) % 256], -1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def build_tree(root, cities, frames=2, seed=0):
    """ROOT/{leftImg8bit,gtFine}/SPLIT/CITY/CITY_SEQ_FRAME_*.png, as Cityscapes
    lays them out; {split: [cities]}."""
    rng = np.random.default_rng(seed)
    for split, names in cities.items():
        for city in names:
            for frame in range(frames):
                ids = label_ids(rng)
                stem = f"{city}_{frame:06d}_{19 + frame:06d}"
                for kind, suffix, array in (
                        ("leftImg8bit", cityscapes.IMAGE_SUFFIX, image_of(ids, rng)),
                        ("gtFine", cityscapes.LABEL_SUFFIX, ids)):
                    folder = os.path.join(root, kind, split, city)
                    os.makedirs(folder, exist_ok=True)
                    Image.fromarray(array).save(os.path.join(folder, stem + suffix))
    return str(root)


def read_ground_truth(root, split):
    paths = sorted(glob.glob(os.path.join(root, "gtFine", split, "*",
                                          "*" + cityscapes.LABEL_SUFFIX)))
    return [np.asarray(Image.open(path)) for path in paths]


def test_label_ids_map_to_both_class_sets_and_back():
    official = cityscapes.ClassSet(19)
    assert official.num_classes == 20 and official.names[:4] == ["void", "road", "sidewalk",
                                                                  "building"]
    assert official.names[19] == "bicycle"
    ids = np.array([7, 8, 11, 21, 23, 24, 26, 33, 0, 1, 9, 29, 14, 30])
    # trainIds + 1; every id with trainId 255 -> void (0).
    assert official.classes_of(ids, "x").tolist() == [1, 2, 3, 9, 11, 12, 14, 19,
                                                      0, 0, 0, 0, 0, 0]
    adapnet = cityscapes.ClassSet(12)
    assert adapnet.num_classes == 12
    assert adapnet.names == ["void", "sky", "building", "road", "sidewalk", "fence",
                             "vegetation", "pole", "car", "sign", "pedestrian", "cyclist"]
    # truck 27, bus 28 -> car; rider 25, motorcycle 32, bicycle 33 -> cyclist;
    # wall 12, traffic light 19, terrain 22, train 31 -> void.
    ids = np.array([23, 11, 7, 8, 13, 21, 17, 26, 27, 28, 20, 24, 25, 32, 33, 12, 19, 22, 31])
    assert adapnet.classes_of(ids, "x").tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 9, 10,
                                                     11, 11, 11, 0, 0, 0, 0]
    # Back: the first label of each class; void -> 0 (unlabeled).
    assert official.label_ids_of(np.arange(20)).tolist() == [0, 7, 8, 11, 12, 13, 17, 19,
                                                             20, 21, 22, 23, 24, 25, 26,
                                                             27, 28, 31, 32, 33]
    assert adapnet.label_ids_of(np.arange(12)).tolist() == [0, 23, 11, 7, 8, 13, 21, 17,
                                                            26, 20, 24, 25]
    for class_set in (official, adapnet):
        classes = np.arange(class_set.num_classes)
        assert class_set.classes_of(class_set.label_ids_of(classes), "x").tolist() == \
            classes.tolist()


def test_converter_reads_the_layout_maps_ids_and_writes_the_names(tmp_path):
    root = build_tree(tmp_path / "cs", {"train": ["bremen", "aachen"], "val": ["lindau"]})
    record = str(tmp_path / "out" / "train.tfrecords")
    assert convert_cityscapes(root, "train", 12, record, progress=False,
                              resize=(16, 32)) == 4
    truth = read_ground_truth(root, "train")  # aachen's frames first: sorted
    adapnet = cityscapes.ClassSet(12)
    for (image, label), ids in zip(read_examples(record), truth):
        assert image.shape == (16, 32, 3)
        expected = np.asarray(Image.fromarray(adapnet.to_class[ids]).resize(
            (32, 16), Image.NEAREST))
        assert np.array_equal(label, expected)
    names = (tmp_path / "out" / "train.classes.txt").read_text().splitlines()
    assert names[0] == "0 void" and names[8] == "8 car" and len(names) == 12

    record = str(tmp_path / "val.tfrecords")
    assert convert_cityscapes(root, "val", 19, record, progress=False) == 2
    labels = [label for _, label in read_examples(record)]
    official = cityscapes.ClassSet(19)
    for label, ids in zip(labels, read_ground_truth(root, "val")):
        assert np.array_equal(label, official.to_class[ids])
        assert (label[np.isin(ids, VOID_IDS)] == 0).all()
    assert (tmp_path / "val.classes.txt").read_text().splitlines()[19] == "19 bicycle"


def test_converter_errors_name_the_file(tmp_path):
    root = build_tree(tmp_path / "cs", {"val": ["lindau"]})
    label = os.path.join(root, "gtFine", "val", "lindau",
                         "lindau_000001_000020" + cityscapes.LABEL_SUFFIX)
    ids = np.asarray(Image.open(label)).copy()
    ids[5, 5] = 40
    Image.fromarray(ids).save(label)
    with pytest.raises(UserError, match=r"^label .*lindau_000001_000020_gtFine_labelIds.png "
                                        r"holds id 40, which is no Cityscapes label id"):
        convert_cityscapes(root, "val", 19, str(tmp_path / "a.tfrecords"), progress=False)
    assert not (tmp_path / "a.tfrecords").exists()
    assert not (tmp_path / "a.classes.txt").exists()
    os.remove(label)
    result = run_script_in_process(
        "dataset/convert_to_tfrecords.py", "--cityscapes", root, "--split", "val",
        "--classes", "19", "--record", str(tmp_path / "b.tfrecords"), "--no_progress")
    assert result.returncode == 2
    assert result.errors == [f"error: no label for {root}/leftImg8bit/val/lindau/"
                             f"lindau_000001_000020_leftImg8bit.png: {label} not found"]
    os.makedirs(os.path.join(root, "leftImg8bit", "train"))
    with pytest.raises(UserError, match="Cityscapes folder not found: .*gtFine/train$"):
        convert_cityscapes(root, "train", 19, str(tmp_path / "c.tfrecords"), progress=False)


@pytest.mark.slow
def test_official_evaluation_agrees_with_evaluate(tmp_path):
    """Convert, train 2 steps, evaluate, predict --cityscapes_ids, and run
    Cityscapes' own evaluation on the predictions: the same class IoUs and
    mean (docs/metric.md says why they can be equal)."""
    from netcompress.jobs import compress as staged
    from netcompress.settings.config import load_config
    from netcompress.jobs.evaluate import evaluate
    from netcompress.jobs.predict import predict
    from netcompress.jobs.train import train

    root = build_tree(tmp_path / "cs", {"train": ["aachen", "bremen"],
                                        "val": ["frankfurt", "lindau"]})
    data = tmp_path / "data"
    for split in ("train", "val"):
        convert_cityscapes(root, split, 19, str(data / f"{split}.tfrecords"), progress=False)
    base = dict(gpu_id="", model="AdapNet_pp", num_classes=20, batch_size=2, skip_step=10,
                height=HEIGHT, width=WIDTH, mask=None,
                model_def=write_json(tmp_path / "tiny.json", scaled_model_def(16)),
                classes=data / "train.classes.txt")
    train(load_config(write_config(tmp_path / "train.config", dict(
        base, intialize=None, checkpoint=tmp_path / "run" / "model.ckpt",
        train_data=data / "train.tfrecords", max_iteration=2, learning_rate=0.005,
        save_step=2, power=0.9)), "train"), progress=False)
    config = load_config(write_config(tmp_path / "test.config", dict(
        base, checkpoint=tmp_path / "run", test_data=data / "val.tfrecords")), "evaluate")

    report = []
    matrix = evaluate(config, log=report.append, progress=False)
    table = report[-1].splitlines()
    assert table[1].split()[:2] == ["1", "road"] and table[19].split()[:2] == ["19", "bicycle"]
    predicted = np.flatnonzero(matrix.matrix[1:].sum(axis=0))
    assert len(predicted) >= 3, predicted  # not a trivial prediction

    # One more image, of another size than the network's and without a
    # label: the official evaluation reads only the predictions of its labels.
    big = os.path.join(root, "leftImg8bit", "val", "ulm", "ulm_000000_000019_leftImg8bit.png")
    os.makedirs(os.path.dirname(big))
    Image.fromarray(np.zeros((48, 80, 3), np.uint8)).save(big)
    predictions, colours = tmp_path / "predictions", tmp_path / "colours"
    predict(config, os.path.join(root, "leftImg8bit", "val"), str(predictions),
            log=lambda _: None, progress=False, cityscapes_ids=True, overlays=str(colours))
    assert sorted(os.listdir(predictions)) == [
        f"{city}_{frame:06d}_{19 + frame:06d}_labelIds.png"
        for city in ("frankfurt", "lindau") for frame in (0, 1)] + [
        "ulm_000000_000019_labelIds.png"]
    assert len(os.listdir(colours)) == 2 * 5 + 1  # label + overlay each, the legend
    # Each prediction has its image's own size, whatever the network's.
    with Image.open(predictions / "ulm_000000_000019_labelIds.png") as image:
        assert image.size == (80, 48) and image.mode == "L"
        assert set(np.unique(image)) <= set(cityscapes.ClassSet(19).to_label_id.tolist())

    official = cityscapes.official_evaluation(root, "val", str(predictions))
    ours = matrix.class_iou()
    names = cityscapes.ClassSet(19).names
    for class_id in range(1, 20):
        theirs = official["classScores"][names[class_id]]
        if math.isnan(ours[class_id]):
            assert math.isnan(theirs), names[class_id]
        else:
            assert theirs == pytest.approx(ours[class_id], abs=1e-12), names[class_id]
    assert official["averageScoreClasses"] == pytest.approx(matrix.mean_iou(), abs=1e-12)
    assert 0 < matrix.mean_iou() < 1

    # compress.py's per-class reports (evaluate() of its model configs) name
    # the classes too.
    model = staged.model_config(config, config["model_def"], None, config["checkpoint"])
    assert model["classes"] == config["classes"]


def test_cityscapes_ids_refusals(tmp_path):
    """Checked before any graph is built."""
    from netcompress.jobs.predict import predict

    root = build_tree(tmp_path / "cs", {"val": ["lindau"]})
    images = os.path.join(root, "leftImg8bit", "val")
    config = dict(num_classes=6, checkpoint=str(tmp_path / "none"), model_def="m.json",
                  mask=None, classes=None)
    with pytest.raises(UserError, match=r"^--cityscapes_ids needs a model of 20 classes .* "
                                        r"or 12 .*, not num_classes 6$"):
        predict(config, images, str(tmp_path / "out"), cityscapes_ids=True)
    config["num_classes"] = 20
    with pytest.raises(UserError, match="--overlays .*/out/colours' is inside --output"):
        predict(config, images, str(tmp_path / "out"), cityscapes_ids=True,
                overlays=str(tmp_path / "out" / "colours"))
    with pytest.raises(UserError, match="holds no \\*_leftImg8bit.png"):
        predict(config, os.path.join(root, "gtFine"), str(tmp_path / "out"),
                cityscapes_ids=True)
    assert not (tmp_path / "out").exists()


def test_classes_key_of_another_class_set_is_refused(tmp_path):
    from netcompress.settings.config import load_config
    from netcompress.formats.palette import config_class_names

    names = tmp_path / "x.classes.txt"
    names.write_text(cityscapes.classes_text(cityscapes.ClassSet(19).names))
    model_def = write_json(tmp_path / "tiny.json", scaled_model_def(16))
    values = dict(gpu_id="", model="AdapNet_pp", num_classes=20, batch_size=2, skip_step=1,
                  height=HEIGHT, width=WIDTH, mask=None, model_def=model_def,
                  checkpoint=tmp_path, test_data=model_def, classes=names)
    path = write_config(tmp_path / "test.config", values)
    with pytest.raises(UserError, match="'checkpoint' checkpoint"):
        load_config(path, "evaluate")  # every other key is fine
    (tmp_path / "checkpoint").write_text("")
    config = load_config(path, "evaluate")
    assert config_class_names(config)[19] == "bicycle"
    with pytest.raises(UserError, match=r"x.classes.txt names class 19 but num_classes is 12"):
        config_class_names(dict(config, num_classes=12))
    with pytest.raises(UserError, match="'classes' file .*nothing.txt' does not exist"):
        load_config(path, "evaluate", [f"classes={tmp_path}/nothing.txt"])


def test_official_evaluation_script_on_hand_made_predictions(tmp_path):
    """Ground truth with every car pixel predicted as road: car IoU 0, road
    IoU = road pixels / (road + car pixels); void ids are ignored."""
    from netcompress.graphs.metrics import ConfusionMatrix

    root = build_tree(tmp_path / "cs", {"val": ["lindau"]})
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    official = cityscapes.ClassSet(19)
    matrix = ConfusionMatrix(20)
    road = car = 0
    for path in glob.glob(os.path.join(root, "gtFine", "val", "*", "*.png")):
        ids = np.asarray(Image.open(path))
        guess = np.where(ids == 26, 7, ids).astype(np.uint8)
        name = os.path.basename(path).replace("_gtFine_labelIds", "_labelIds")
        Image.fromarray(guess).save(predictions / name)
        matrix.update(official.to_class[ids], official.to_class[guess])
        road, car = road + (ids == 7).sum(), car + (ids == 26).sum()
    result = run_script_in_process("dataset/cityscapes.py", "--cityscapes", root,
                                   "--predictions", predictions)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "road              %.2f" % (100 * road / (road + car)) in lines
    assert "car                0.00" in lines and "sky              100.00" in lines
    assert "wall                  -" in lines and "parking" not in result.stdout
    assert lines[-1] == "mIoU: %.2f" % (100 * matrix.mean_iou())
    (predictions / "lindau_000000_000019_extra.png").write_bytes(b"")
    result = run_script_in_process("dataset/cityscapes.py", "--cityscapes", root,
                                   "--predictions", predictions)
    assert result.returncode == 2
    assert result.errors[0].startswith(f"error: Cityscapes' evaluation of {predictions} "
                                       f"stopped: ERROR: Found multiple predictions")
