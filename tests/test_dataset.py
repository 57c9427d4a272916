import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import REPO
from dataset import convert_to_tfrecords, pipeline, records, synthetic
from common.errors import UserError

tf.compat.v1.disable_eager_execution()

HEIGHT, WIDTH, NUM_CLASSES = 32, 64, 5


def write_record(path, examples):
    with records.record_writer(str(path)) as writer:
        for image, label in examples:
            writer.write(records.encode_example(image, label))
    return str(path)


def random_example(rng, height=HEIGHT, width=WIDTH, num_classes=NUM_CLASSES):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.integers(0, num_classes, (height, width), dtype=np.uint8)
    return image, label


def indexed_examples(count):
    """Examples whose image[0, 0, 0] is their index."""
    rng = np.random.default_rng(1)
    examples = []
    for index in range(count):
        image, label = random_example(rng)
        image[0, 0, 0] = index
        examples.append((image, label))
    return examples


def run_all(dataset):
    """Every element of a finite dataset, in order."""
    with tf.compat.v1.Session() as sess:
        next_element = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        elements = []
        while True:
            try:
                elements.append(sess.run(next_element))
            except tf.errors.OutOfRangeError:
                return elements


def run_error(dataset, path):
    """The UserError that reading the first element of dataset turns into."""
    with tf.compat.v1.Session() as sess:
        next_element = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            sess.run(next_element)
    return records.data_error_from(caught.value, path)


# --- records -----------------------------------------------------------------

def test_encode_parse_round_trip_keeps_bytes_bgr_order_and_one_hot(tmp_path):
    rng = np.random.default_rng(0)
    image, label = random_example(rng)
    image[3, 5] = (10, 20, 30)  # B, G, R
    label[3, 5] = 4
    path = write_record(tmp_path / "one.tfrecords", [(image, label)])

    assert records.count_records(path) == 1
    [(read_image, read_label)] = list(records.read_examples(path))
    np.testing.assert_array_equal(read_image, image)
    np.testing.assert_array_equal(read_label, label)

    with tf.Graph().as_default():
        serialized = tf.compat.v1.placeholder(tf.string, [])
        parsed_image, parsed_label = records.parse_example(
            serialized, HEIGHT, WIDTH, NUM_CLASSES)
        assert parsed_image.shape.as_list() == [HEIGHT, WIDTH, 3]
        assert parsed_label.shape.as_list() == [HEIGHT, WIDTH, NUM_CLASSES]
        assert parsed_image.dtype == tf.float32 and parsed_label.dtype == tf.float32
        with tf.compat.v1.Session() as sess:
            got_image, got_label = sess.run(
                [parsed_image, parsed_label],
                {serialized: records.encode_example(image, label)})
    np.testing.assert_array_equal(got_image, image.astype(np.float32))
    assert got_image[3, 5].tolist() == [10.0, 20.0, 30.0]
    assert got_label[3, 5].tolist() == [0, 0, 0, 0, 1]
    np.testing.assert_array_equal(got_label.sum(axis=-1), np.ones((HEIGHT, WIDTH)))
    np.testing.assert_array_equal(got_label.argmax(axis=-1), label)


def test_encode_example_is_deterministic_and_rejects_bad_arrays():
    image, label = random_example(np.random.default_rng(0))
    assert records.encode_example(image, label) == records.encode_example(
        image.copy(), label.copy())
    with pytest.raises(UserError, match="uint8"):
        records.encode_example(image.astype(np.float32), label)
    with pytest.raises(UserError, match="HxWx3"):
        records.encode_example(image[:, :, :2], label)
    with pytest.raises(UserError, match="32x64 but label is 32x63"):
        records.encode_example(image, label[:, :63])


def test_missing_record_file_is_a_user_error_naming_it(tmp_path):
    missing = str(tmp_path / "nope.tfrecords")
    for call in (lambda: records.require_record_file(missing),
                 lambda: records.count_records(missing),
                 lambda: pipeline.eval_dataset(missing, 2, HEIGHT, WIDTH, NUM_CLASSES),
                 lambda: pipeline.train_dataset(missing, 2, HEIGHT, WIDTH, NUM_CLASSES)):
        with pytest.raises(UserError, match="nope.tfrecords"):
            call()


def test_truncated_record_file_is_a_user_error(tmp_path):
    path = write_record(tmp_path / "cut.tfrecords", indexed_examples(3))
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:-100])
    with pytest.raises(UserError, match=r"cut\.tfrecords: corrupt or truncated"):
        records.count_records(path)
    with tf.Graph().as_default():
        dataset = pipeline.eval_dataset(path, 2, HEIGHT, WIDTH, NUM_CLASSES)
        with tf.compat.v1.Session() as sess:
            next_element = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
            assert len(sess.run(next_element)[0]) == 2
            with pytest.raises(tf.errors.DataLossError) as caught:
                sess.run(next_element)
    message = str(records.data_error_from(caught.value, path))
    assert message.startswith(f"bad data in {path}: corrupt or truncated record file (")
    assert "truncated record" in message and "\n" not in message


def test_wrong_record_size_becomes_one_line_user_error(tmp_path):
    image, label = random_example(np.random.default_rng(0), height=32, width=48)
    path = write_record(tmp_path / "small.tfrecords", [(image, label)])
    with tf.Graph().as_default():
        error = run_error(pipeline.eval_dataset(path, 1, 64, 64, NUM_CLASSES), path)
    message = str(error)
    assert "record is 32x48, config expects 64x64" in message
    assert path in message
    assert "\n" not in message


def test_label_id_out_of_range_becomes_user_error(tmp_path):
    image, label = random_example(np.random.default_rng(0))
    label[7, 9] = 7
    path = write_record(tmp_path / "ids.tfrecords", [(image, label)])
    with tf.Graph().as_default():
        error = run_error(pipeline.train_dataset(path, 1, HEIGHT, WIDTH, 5), path)
    message = str(error)
    assert "label id 7 >= num_classes (5)" in message
    assert path in message
    assert "\n" not in message


# --- pipeline ----------------------------------------------------------------

def test_eval_dataset_single_pass_keeps_order_and_partial_batch(tmp_path):
    examples = indexed_examples(10)
    path = write_record(tmp_path / "ten.tfrecords", examples)
    with tf.Graph().as_default():
        batches = run_all(pipeline.eval_dataset(path, 4, HEIGHT, WIDTH, NUM_CLASSES))
    assert [len(images) for images, _ in batches] == [4, 4, 2]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    assert images[:, 0, 0, 0].tolist() == list(range(10))
    np.testing.assert_array_equal(labels.argmax(-1), np.stack([l for _, l in examples]))


def test_eval_shards_are_disjoint_and_cover_every_record(tmp_path):
    path = write_record(tmp_path / "seven.tfrecords", indexed_examples(7))
    seen = []
    with tf.Graph().as_default():
        for index in range(2):
            batches = run_all(pipeline.eval_dataset(
                path, 3, HEIGHT, WIDTH, NUM_CLASSES, shard=(index, 2)))
            seen.append(sorted(int(v) for images, _ in batches
                               for v in images[:, 0, 0, 0]))
    assert seen == [[0, 2, 4, 6], [1, 3, 5]]
    with pytest.raises(UserError, match="shard index"):
        pipeline.eval_dataset(path, 3, HEIGHT, WIDTH, NUM_CLASSES, shard=(2, 2))


def aligned_example(offset):
    """Label derived from the image: id = blue channel % NUM_CLASSES.

    The blue channel is not mirror-symmetric, so flipping only one of the two
    breaks the relation.
    """
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[..., 0] = xs * 3 + ys
    image[..., 1] = offset
    label = (image[..., 0] % NUM_CLASSES).astype(np.uint8)
    return image, label


def test_train_flip_keeps_image_and_label_aligned(tmp_path):
    examples = [aligned_example(offset) for offset in range(3)]
    path = write_record(tmp_path / "aligned.tfrecords", examples)
    unflipped_column = examples[0][0][0, :, 0].astype(np.float32)
    for flip in (True, False):
        with tf.Graph().as_default():
            dataset = pipeline.train_dataset(path, 4, HEIGHT, WIDTH, NUM_CLASSES,
                                             flip=flip, shuffle_buffer=3, seed=1)
            images, labels = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
            assert images.shape.as_list() == [4, HEIGHT, WIDTH, 3]
            assert labels.shape.as_list() == [4, HEIGHT, WIDTH, NUM_CLASSES]
            with tf.compat.v1.Session() as sess:
                batches = [sess.run([images, labels]) for _ in range(10)]
        flipped = unflipped = 0
        for batch_images, batch_labels in batches:
            np.testing.assert_array_equal(
                batch_labels.argmax(-1), batch_images[..., 0] % NUM_CLASSES)
            for row in batch_images[:, 0, :, 0]:
                if np.array_equal(row, unflipped_column):
                    unflipped += 1
                else:
                    np.testing.assert_array_equal(row, unflipped_column[::-1])
                    flipped += 1
        assert flipped + unflipped == 40
        if flip:
            assert flipped > 5 and unflipped > 5
        else:
            assert flipped == 0


# --- converter ---------------------------------------------------------------

def write_list(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_convert_png_round_trip_bgr_palette_ids_and_mean(tmp_path):
    rng = np.random.default_rng(0)
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rgb_images, label_ids = [], []
    for index in range(2):
        rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        rgb[1, 2] = (200, 100, 50)  # R, G, B
        ids = rng.integers(0, 4, (HEIGHT, WIDTH), dtype=np.uint8)
        Image.fromarray(rgb, "RGB").save(images_dir / f"img{index}.png")
        rgb_images.append(rgb)
        label_ids.append(ids)
    Image.fromarray(label_ids[0], "L").save(images_dir / "lab0.png")
    # Palette whose colours differ from the indices: the ids must be indices.
    palette_label = Image.fromarray(label_ids[1], "P")
    palette_label.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 90, 90, 90] + [0] * 756)
    palette_label.save(images_dir / "lab1.png")

    list_path = write_list(tmp_path / "list.txt", [
        "# image label", "", "images/img0.png images/lab0.png",
        f"{images_dir / 'img1.png'} images/lab1.png"])
    record_path = str(tmp_path / "out" / "train.tfrecords")
    mean_path = str(tmp_path / "mean.npy")
    count = convert_to_tfrecords.convert(list_path, record_path, mean_path=mean_path,
                                         num_classes=4, progress=False)
    assert count == 2
    examples = list(records.read_examples(record_path))
    assert len(examples) == 2
    for (image, label), rgb, ids in zip(examples, rgb_images, label_ids):
        assert image[1, 2].tolist() == [50, 100, 200]
        np.testing.assert_array_equal(image, rgb[:, :, ::-1])
        np.testing.assert_array_equal(label, ids)
    mean = np.load(mean_path, allow_pickle=False)
    assert mean.dtype == np.float32 and mean.shape == (HEIGHT, WIDTH, 3)
    expected_mean = (rgb_images[0][:, :, ::-1].astype(np.float64)
                     + rgb_images[1][:, :, ::-1]) / 2
    # Stored as float32: values <= 255 round by at most 255 * 2**-24 = 1.5e-5.
    np.testing.assert_allclose(mean, expected_mean, rtol=0, atol=255 * 2.0 ** -24)
    assert sorted(os.listdir(tmp_path / "out")) == ["train.tfrecords"]


def test_convert_jpeg_colour_and_grayscale(tmp_path):
    colour = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    colour[:] = (220, 120, 20)  # R, G, B
    Image.fromarray(colour, "RGB").save(tmp_path / "colour.jpg", quality=95)
    gray = np.tile(np.arange(WIDTH, dtype=np.uint8) * 4, (HEIGHT, 1))
    Image.fromarray(gray, "L").save(tmp_path / "gray.jpg", quality=95)
    Image.fromarray(np.ones((HEIGHT, WIDTH), np.uint8), "L").save(tmp_path / "lab.png")
    list_path = write_list(tmp_path / "list.txt",
                           ["colour.jpg lab.png", "gray.jpg lab.png"])
    record_path = str(tmp_path / "jpeg.tfrecords")
    convert_to_tfrecords.convert(list_path, record_path, progress=False)
    (colour_bgr, _), (gray_bgr, _) = records.read_examples(record_path)
    assert np.abs(colour_bgr.astype(int) - [20, 120, 220]).max() <= 4
    np.testing.assert_array_equal(gray_bgr[..., 0], gray_bgr[..., 1])
    np.testing.assert_array_equal(gray_bgr[..., 0], gray_bgr[..., 2])
    assert np.abs(gray_bgr[..., 0].astype(int) - gray).max() <= 8


def test_convert_resize_uses_nearest_for_labels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)
    ids = rng.choice(np.array([0, 10, 20], np.uint8), (40, 70))
    Image.fromarray(rgb, "RGB").save(tmp_path / "img.png")
    Image.fromarray(ids, "L").save(tmp_path / "lab.png")
    list_path = write_list(tmp_path / "list.txt", ["img.png lab.png"])
    record_path = str(tmp_path / "resized.tfrecords")
    convert_to_tfrecords.convert(list_path, record_path, resize=(HEIGHT, WIDTH),
                                 progress=False)
    [(image, label)] = list(records.read_examples(record_path))
    assert image.shape == (HEIGHT, WIDTH, 3) and label.shape == (HEIGHT, WIDTH)
    assert set(np.unique(label).tolist()) == {0, 10, 20}
    # Bilinear on the image does create values the source corners bound.
    assert len(np.unique(image)) > 3


def make_pair(directory, name, image_size, label_size, max_id=2, label_mode="L"):
    rng = np.random.default_rng(len(name))
    rgb = rng.integers(0, 256, image_size + (3,), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(directory / f"{name}.png")
    ids = rng.integers(0, max_id + 1, label_size, dtype=np.uint8)
    ids.flat[0] = max_id
    if label_mode == "RGB":
        Image.fromarray(np.stack([ids] * 3, -1), "RGB").save(directory / f"{name}_lab.png")
    else:
        Image.fromarray(ids, label_mode).save(directory / f"{name}_lab.png")
    return f"{name}.png {name}_lab.png"


@pytest.mark.parametrize("case, pattern", [
    ("size", r"image .*bad\.png is 32x64 but label .*bad_lab\.png is 32x60"),
    ("class", r"label .*bad_lab\.png has class id 9 >= num_classes \(5\)"),
    ("missing", r"label file not found: .*ghost_lab\.png"),
    ("colour_label", r"label .*bad_lab\.png has 3 channels"),
])
def test_convert_errors_name_the_file_and_keep_existing_record(tmp_path, case, pattern):
    good = make_pair(tmp_path, "good", (HEIGHT, WIDTH), (HEIGHT, WIDTH))
    record_path = str(tmp_path / "data.tfrecords")
    convert_to_tfrecords.convert(write_list(tmp_path / "good.txt", [good]),
                                 record_path, progress=False)
    with open(record_path, "rb") as handle:
        before = handle.read()

    if case == "size":
        bad = make_pair(tmp_path, "bad", (HEIGHT, WIDTH), (HEIGHT, 60))
    elif case == "class":
        bad = make_pair(tmp_path, "bad", (HEIGHT, WIDTH), (HEIGHT, WIDTH), max_id=9)
    elif case == "missing":
        bad = "good.png ghost_lab.png"
    else:
        bad = make_pair(tmp_path, "bad", (HEIGHT, WIDTH), (HEIGHT, WIDTH),
                        label_mode="RGB")
    # The bad pair comes second, so the failure happens mid-conversion.
    bad_list = write_list(tmp_path / "bad.txt", [good, bad])
    with pytest.raises(UserError, match=pattern):
        convert_to_tfrecords.convert(bad_list, record_path, num_classes=5,
                                     mean_path=str(tmp_path / "mean.npy"),
                                     progress=False)
    with open(record_path, "rb") as handle:
        assert handle.read() == before
    assert [name for name in os.listdir(tmp_path) if ".tmp" in name] == []
    assert not (tmp_path / "mean.npy").exists()


def test_convert_list_errors(tmp_path):
    with pytest.raises(UserError, match="list file not found: .*absent.txt"):
        convert_to_tfrecords.convert(str(tmp_path / "absent.txt"),
                                     str(tmp_path / "x.tfrecords"), progress=False)
    bad_line = write_list(tmp_path / "three.txt", ["a.png b.png c.png"])
    with pytest.raises(UserError, match="three.txt line 1: expected"):
        convert_to_tfrecords.convert(bad_line, str(tmp_path / "x.tfrecords"),
                                     progress=False)
    with pytest.raises(UserError, match="HxW"):
        convert_to_tfrecords.parse_size("64by64")
    assert convert_to_tfrecords.parse_size("64x128") == (64, 128)


def run_cli(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_reports_user_error_on_one_line_and_exits_2(tmp_path):
    make_pair(tmp_path, "good", (HEIGHT, WIDTH), (HEIGHT, WIDTH))
    list_path = write_list(tmp_path / "list.txt", ["good.png missing_lab.png"])
    result = run_cli(["-m", "dataset.convert_to_tfrecords", "--file", list_path,
                      "--record", str(tmp_path / "o.tfrecords")], cwd=REPO)
    assert result.returncode == 2
    # TensorFlow may log to stderr too; ours is the one and last error line.
    stderr_lines = result.stderr.strip().splitlines()
    error_lines = [line for line in stderr_lines if line.startswith("error")]
    assert error_lines == [stderr_lines[-1]]
    assert error_lines[0].startswith("error: label file not found: ")
    assert "missing_lab.png" in error_lines[0]
    assert "Traceback" not in result.stderr


def test_cli_as_script_path_converts(tmp_path):
    pair = make_pair(tmp_path, "good", (HEIGHT, WIDTH), (HEIGHT, WIDTH))
    list_path = write_list(tmp_path / "list.txt", [pair])
    record_path = str(tmp_path / "o.tfrecords")
    # Run from elsewhere so only the script's own sys.path fix finds the repo.
    result = run_cli([os.path.join(REPO, "dataset", "convert_to_tfrecords.py"),
                      "--file", list_path, "--record", record_path,
                      "--resize", "16x32", "--no_progress"], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    [(image, label)] = list(records.read_examples(record_path))
    assert image.shape == (16, 32, 3) and label.shape == (16, 32)


# --- synthetic ---------------------------------------------------------------

def test_synthetic_same_seed_same_bytes(tmp_path):
    def generated_bytes(name, seed):
        paths = synthetic.generate(str(tmp_path / name), num_train=5, num_test=3,
                                   seed=seed, num_val=4)
        contents = {}
        for key in ("train", "val", "test", "classes"):
            with open(paths[key], "rb") as handle:
                contents[key] = handle.read()
        return contents

    first = generated_bytes("a", seed=3)
    assert first == generated_bytes("b", seed=3)
    other = generated_bytes("c", seed=4)
    assert other["train"] != first["train"] and other["test"] != first["test"]
    assert first["train"] != first["test"]
    # The validation split is its own images, held out from both.
    val_images = list(records.read_examples(str(tmp_path / "a" / "val.tfrecords")))
    other_images = list(records.read_examples(str(tmp_path / "a" / "test.tfrecords"))) + \
        list(records.read_examples(str(tmp_path / "a" / "train.tfrecords")))
    assert len(val_images) == 4
    assert not any(np.array_equal(v[0], o[0]) for v in val_images for o in other_images)
    train_path = str(tmp_path / "a" / "train.tfrecords")
    assert records.count_records(train_path) == 5
    image, label = next(records.read_examples(train_path))
    assert image.shape == (synthetic.DEFAULT_HEIGHT, synthetic.DEFAULT_WIDTH, 3)
    assert label.max() < synthetic.NUM_CLASSES
    assert (tmp_path / "a" / "classes.txt").read_text().splitlines()[2] == "2 disc"


@pytest.fixture(scope="module")
def synthetic_splits():
    train = list(synthetic.generate_examples(200, seed=0, split="train"))
    test = list(synthetic.generate_examples(80, seed=0, split="test"))
    return train, test


def test_synthetic_classes_present_and_separated_by_void(synthetic_splits):
    train, _ = synthetic_splits
    labels = np.stack([label for _, label in train])
    fractions = np.bincount(labels.ravel(), minlength=synthetic.NUM_CLASSES) / labels.size
    assert labels.max() == synthetic.NUM_CLASSES - 1
    assert 0.4 < fractions[synthetic.BACKGROUND] < 0.9
    assert 0.01 < fractions[synthetic.VOID] < 0.15
    for shape_class in synthetic.SHAPE_CLASSES:
        assert fractions[shape_class] > 0.02, synthetic.CLASS_NAMES[shape_class]
        images_with_class = (labels == shape_class).any(axis=(1, 2)).sum()
        assert images_with_class > 40
    # Any two 4-neighbours with different classes have void between them,
    # i.e. every object edge carries a void band.
    for first, second in ((labels[:, 1:, :], labels[:, :-1, :]),
                          (labels[:, :, 1:], labels[:, :, :-1])):
        changes = first != second
        assert changes.any()
        assert np.all((first[changes] == synthetic.VOID)
                      | (second[changes] == synthetic.VOID))


def shape_pixels(examples):
    images = np.stack([image for image, _ in examples]).reshape(-1, 3)
    labels = np.stack([label for _, label in examples]).ravel()
    keep = np.isin(labels, synthetic.SHAPE_CLASSES)
    return images[keep].astype(np.float64), labels[keep]


def test_synthetic_colour_does_not_reveal_the_shape_class(synthetic_splits):
    train, test = synthetic_splits
    train_colours, train_labels = shape_pixels(train)
    test_colours, test_labels = shape_pixels(test)
    classes = np.array(synthetic.SHAPE_CLASSES)
    majority_rate = max(np.mean(test_labels == c) for c in classes)

    means = np.stack([train_colours[train_labels == c].mean(0) for c in classes])
    spread = np.linalg.norm(means[:, None] - means[None], axis=-1).max()
    # On a 0..255 scale: all class means are mid-grey, apart by sampling noise
    # only (a class-dependent shift of +-30 grey levels gives a spread of ~76).
    assert spread < 35.0
    assert np.all(np.abs(means - 127.5) < 20.0)

    nearest_mean = classes[np.argmin(
        np.linalg.norm(test_colours[:, None] - means[None], axis=-1), axis=1)]
    assert np.mean(nearest_mean == test_labels) < majority_rate + 0.05

    # A per-colour-bin Bayes classifier fitted on train does no better on test.
    def bins(colours):
        quantised = (colours // 32).astype(int)
        return quantised[:, 0] * 64 + quantised[:, 1] * 8 + quantised[:, 2]
    counts = np.zeros((512, len(classes)))
    np.add.at(counts, (bins(train_colours), np.searchsorted(classes, train_labels)), 1)
    histogram_guess = classes[counts.argmax(axis=1)][bins(test_colours)]
    assert np.mean(histogram_guess == test_labels) < majority_rate + 0.05


def test_convert_refuses_outputs_over_its_inputs(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.fromarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8), "RGB").save(images_dir / "i.png")
    Image.fromarray(np.ones((HEIGHT, WIDTH), np.uint8), "L").save(images_dir / "l.png")
    list_path = write_list(tmp_path / "list.txt", ["images/i.png images/l.png"])
    contents = {path: open(path, "rb").read() for path in
                (list_path, str(images_dir / "i.png"), str(images_dir / "l.png"))}
    for record, mean, message in (
            (list_path, None, "--record '%s' would replace the input --file" % list_path),
            (str(tmp_path / "r.tfrecords"), str(images_dir / "l.png"),
             "--mean '%s' would replace the input a listed file" % (images_dir / "l.png"))):
        with pytest.raises(UserError, match=re.escape(message)):
            convert_to_tfrecords.convert(list_path, record, mean_path=mean, progress=False)
    assert {path: open(path, "rb").read() for path in contents} == contents
    assert sorted(os.listdir(tmp_path)) == ["images", "list.txt"]
