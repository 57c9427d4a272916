"""train.py / evaluate.py: learning, resume, NaN guard, one-line errors."""

import glob
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, run_script_in_process, scaled_model_def, write_config, write_json
from dataset import synthetic
from dataset.records import encode_example, record_writer
from netcompress.settings.config import load_config
from common.errors import UserError
from netcompress.jobs.evaluate import evaluate
from netcompress.jobs.train import train


def write_workspace(root, model_def, height, width, batch_size, num_train, num_test):
    """Records and train/test configs under ``root``: (root, files, train, test)."""
    files = synthetic.generate(str(root / "data"), num_train=num_train, num_test=num_test,
                               height=height, width=width, seed=3)
    base = dict(gpu_id="", model="AdapNet_pp", num_classes=synthetic.NUM_CLASSES,
                batch_size=batch_size, skip_step=10, height=height, width=width, mask=None,
                model_def=model_def)
    train_config = write_config(root / "train.config", dict(
        base, intialize=None, checkpoint=root / "run" / "model.ckpt",
        train_data=files["train"], max_iteration=600, learning_rate=0.005, save_step=600,
        power=0.9))
    test_config = write_config(root / "test.config", dict(
        base, checkpoint=root / "run", test_data=files["test"]))
    return root, files, train_config, test_config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # 48x96, not the synthetic default 64x128: the assertions keep their
    # margins (measured below) at 56 % of the pixels; at 32x64 (2x4 outputs)
    # a random removal came within 1.5 points of the default criterion (seed 1).
    return write_workspace(root, os.path.join(REPO, "models", "small.json"), 48, 96,
                           batch_size=8, num_train=400, num_test=48)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The smallest setting that shows a training behaviour: widths / 16,
    32x64 images, batch 2 (the learning tests use ``demo``)."""
    root = tmp_path_factory.mktemp("tiny")
    model_def = write_json(root / "tiny.json", scaled_model_def(16))
    return write_workspace(root, model_def, 32, 64, batch_size=2, num_train=8, num_test=4)


@pytest.fixture(scope="module")
def quick_checkpoint(tiny):
    """A 1-step checkpoint, for tests that only need one to exist."""
    root, _, train_config, _ = tiny
    result = train(load_config(train_config, "train", [f"checkpoint={root}/quick/model.ckpt",
                                                       "max_iteration=1", "save_step=1"]),
                   progress=False)
    return result["checkpoint"]


def chance_mean_iou(label_pixels):
    """Expected mIoU of uniformly random predictions over classes 0..C-1,
    given the pixel count of each true class (void row ignored)."""
    counts = np.asarray(label_pixels[1:], np.float64)
    total, num_classes = counts.sum(), len(label_pixels)
    true_positive = counts / num_classes
    predicted = total / num_classes
    return float(np.mean(true_positive / (counts + predicted - true_positive)))


# Measured on this model (48x96, oneDNN off): taylor_out 28.6 / 24.1 against
# random 16.1 / 16.1 validation mIoU at 10 % / 20 % removed with seed 0 (gaps
# 12.6 and 8.1 points); seeds 1 and 2: gaps 6.4 / 4.8 and 4.2 / 3.1; seed 0
# with oneDNN on: 11.4 / 6.4. The test asks for 2 points, under the smallest.
MARGIN = 2.0


@pytest.fixture(scope="module")
def trained(demo):
    """The small model trained 600 steps on the synthetic shapes (seeded).
    Measured (48x96): data loss to 0.24-0.29 of its start, test mIoU 3.8-4.3x
    chance with seeds 0-2 (oneDNN off), 0.24 and 4.5x with oneDNN on (seed 0);
    the test asks for 0.6 and 3x."""
    _, _, train_config, _ = demo
    return train(load_config(train_config, "train"), progress=False, seed=0)


@pytest.mark.slow
def test_small_model_learns_the_synthetic_shapes(demo, trained):
    _, _, train_config, test_config = demo
    result = trained
    data_losses = np.array(result["data_losses"])
    first, last = data_losses[:20].mean(), data_losses[-20:].mean()
    print(f"data loss {first:.3f} -> {last:.3f}")
    assert last < 0.6 * first
    matrix = evaluate(load_config(test_config, "evaluate"), progress=False)
    chance = chance_mean_iou(matrix.matrix.sum(axis=1))
    print(f"mIoU {100 * matrix.mean_iou():.2f}, chance {100 * chance:.2f}")
    assert matrix.mean_iou() > 3 * chance
    assert matrix.num_images == 48


@pytest.mark.slow
def test_default_criterion_beats_random_on_the_trained_model(demo, trained):
    """Criteria judged as users judge them (get_oracle_rank.py --compare):
    validation mIoU after removing a fraction of every prunable layer."""
    from netcompress.jobs.compare import compare
    from netcompress.settings.config import PRUNE_SETTINGS
    from netcompress.jobs.rank import rank

    root, files, _, test_config = demo
    config = dict(load_config(test_config, "evaluate"), test_data=files["train"],
                  val_data=files["val"], rank_save="")
    ranks = rank(config, progress=False)
    result = compare(config, ranks, fractions=(0.1, 0.2), progress=False)
    miou = {(criterion, fraction): value for criterion, fraction, _, value in result["rows"]}
    default = next(s.default for s in PRUNE_SETTINGS if s.name == "criterion")
    print(f"unpruned {result['baseline']:.2f}; " + ", ".join(
        f"{c} {f:g}: {v:.2f}" for (c, f), v in sorted(miou.items())))
    for fraction in (0.1, 0.2):
        assert miou[(default, fraction)] > miou[("random", fraction)] + MARGIN
        assert miou[(default, fraction)] <= result["baseline"] + 1.0


@pytest.mark.onednn
def test_resume_continues_from_saved_step_in_a_copied_directory(tiny, tmp_path):
    """A checkpoint directory that does not exist is made; the state file
    names checkpoints relatively, so a copy of the folder resumes from
    itself, step count included."""
    _, _, train_config, _ = tiny
    first = train(load_config(train_config, "train", [f"checkpoint={tmp_path}/run",
                                                      "max_iteration=4", "save_step=2"]),
                  progress=False)
    assert first["step"] == 4 and len(first["losses"]) == 4
    assert first["checkpoint"] == f"{tmp_path}/run/model.ckpt-4"
    assert os.path.isfile(f"{tmp_path}/run/model.ckpt-2.index")
    assert not glob.glob(f"{tmp_path}/run/*.meta")  # the graph is rebuilt from the model_def
    assert str(tmp_path) not in open(f"{tmp_path}/run/checkpoint").read()
    shutil.copytree(f"{tmp_path}/run", f"{tmp_path}/copy")
    messages = []
    second = train(load_config(train_config, "train", [f"checkpoint={tmp_path}/copy",
                                                       "max_iteration=7", "save_step=100"]),
                   log=messages.append, progress=False)
    assert f"resuming from {tmp_path}/copy/model.ckpt-4 at step 4" in messages
    assert second["step"] == 7 and len(second["losses"]) == 3
    assert second["checkpoint"] == f"{tmp_path}/copy/model.ckpt-7"


def checkpoint_tensors(prefix):
    import tensorflow as tf
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


@pytest.mark.slow
def test_divergence_never_leaves_a_non_finite_checkpoint(tiny, tmp_path):
    """An absurd learning rate overflows variables (Adam slots, batch-norm
    statistics, weights) within a few steps; with a save every step and
    max_to_keep 1, every checkpoint left must be finite in every variable."""
    _, _, train_config, _ = tiny
    prefix = f"checkpoint={tmp_path}/model.ckpt"
    train(load_config(train_config, "train", [prefix, "max_iteration=2", "save_step=2"]),
          progress=False)
    # 1e10 (measured): an Adam slot overflows while the loss is still finite.
    config = load_config(train_config, "train", [prefix, "max_iteration=40", "save_step=1",
                                                 "learning_rate=1e10"])
    config["max_to_keep"] = 1
    with pytest.raises(UserError, match=r"(loss is (nan|inf) at step|variables are not "
                                        r"finite after step) \d+: training stopped; last "
                                        r"good checkpoint: .*model.ckpt-\d+") as caught:
        train(config, progress=False)
    last = str(caught.value).split("last good checkpoint: ")[1].split(" ")[0]
    # This run saved at least one finite step; the Saver rotated the older ones.
    remaining = glob.glob(f"{tmp_path}/model.ckpt-*.index")
    steps = sorted(int(path.split("-")[-1].split(".")[0]) for path in remaining)
    assert steps[-1] > 2 and last == f"{tmp_path}/model.ckpt-{steps[-1]}"
    assert len(steps) == 2  # max_to_keep 1 of this run, and the resumed step 2
    state = open(f"{tmp_path}/checkpoint").read()
    assert os.path.basename(last) in state.splitlines()[0]
    for path in remaining:
        for name, value in checkpoint_tensors(path[:-len(".index")]).items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":  # not the description
                assert np.isfinite(value).all(), (path, name)


def directory_digest(directory):
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


def test_resume_only_a_training_checkpoint_of_this_model(tiny, tmp_path):
    _, _, train_config, _ = tiny
    one_step = ["max_iteration=1", "save_step=1"]
    # A folder holding another model's training checkpoint.
    other = write_json(tmp_path / "other.json", scaled_model_def(32))
    train(load_config(train_config, "train", [f"checkpoint={tmp_path}/a", f"model_def={other}",
                                              *one_step]), progress=False)
    before = directory_digest(tmp_path / "a")
    # Its description names the first difference (netcompress/formats/description.py).
    with pytest.raises(UserError, match=r"model_def .*tiny.json differs from the one in "
                                        r"checkpoint .*a/model.ckpt-1: params\[\"1\"\] is 4 "
                                        r"in the file, 2 in the checkpoint"):
        train(load_config(train_config, "train", [f"checkpoint={tmp_path}/a", *one_step]),
              progress=False)
    assert directory_digest(tmp_path / "a") == before
    # A folder whose state file names a checkpoint of no training run (a pruned one).
    from netcompress.formats.checkpoint_paths import record_in_state_file
    from netcompress.formats.checkpoints import read_checkpoint, write_checkpoint
    values = {name: value for name, value in read_checkpoint(f"{tmp_path}/a").items()
              if "Adam" not in name and name != "global_step"}
    write_checkpoint(values, f"{tmp_path}/pruned/model.ckpt")
    record_in_state_file(f"{tmp_path}/pruned/model.ckpt")
    before = directory_digest(tmp_path / "pruned")
    with pytest.raises(UserError, match=r"already holds .*pruned/model.ckpt, which is not a "
                                        r"checkpoint of this run .*set intialize: "):
        train(load_config(train_config, "train", [f"checkpoint={tmp_path}/pruned",
                                                  f"model_def={other}", *one_step]),
              progress=False)
    assert directory_digest(tmp_path / "pruned") == before


def in_process(script, *args):
    result = run_script_in_process(script, *args)
    return result.returncode, result.errors, result.stderr


def run_script(script, *args, env=None):
    """A script in a new process: for what only a new process shows (the
    oneDNN setting is read when TensorFlow is imported)."""
    process = subprocess.run([sys.executable, os.path.join(REPO, script), *args],
                             capture_output=True, text=True, cwd=REPO, timeout=300,
                             env=None if env is None else dict(os.environ, **env))
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    return process.returncode, errors, process.stderr


def test_scripts_report_bad_config_in_one_line(tiny, tmp_path):
    _, _, train_config, test_config = tiny
    code, errors, stderr = in_process("train.py", "-c", train_config,
                                                 "--set", "batchsize=4")
    assert code == 2 and len(errors) == 1, stderr
    assert "batchsize" in errors[0] and "batch_size" in errors[0]
    assert "Traceback" not in stderr
    code, errors, stderr = in_process("evaluate.py", "-c", test_config,
                                                 "--height", "40")
    assert code == 2 and len(errors) == 1 and "height" in errors[0], stderr


def test_evaluate_rejects_mismatched_model_def(tiny, quick_checkpoint, tmp_path):
    _, _, _, test_config = tiny
    other = write_json(tmp_path / "other.json", scaled_model_def(32))
    code, errors, stderr = in_process("evaluate.py", "-c", test_config, "--checkpoint",
                                      quick_checkpoint, "--model_def", other)
    assert code == 2 and len(errors) == 1, stderr
    assert f"model_def {other} differs from the one in checkpoint" in errors[0]


def test_bad_label_in_records_is_a_one_line_error(tiny, quick_checkpoint, tmp_path):
    _, _, _, test_config = tiny
    record = str(tmp_path / "bad.tfrecords")
    label = np.ones((32, 64), np.uint8)
    label[5, 5] = 9
    with record_writer(record) as writer:
        writer.write(encode_example(np.zeros((32, 64, 3), np.uint8), label))
    code, errors, stderr = in_process("evaluate.py", "-c", test_config, "--test_data", record,
                                      "--checkpoint", quick_checkpoint)
    assert code == 2 and len(errors) == 1, stderr
    assert "label id 9 >= num_classes (6)" in errors[0] and record in errors[0]


def test_initialize_restores_matching_variables_by_name(tiny, quick_checkpoint, tmp_path):
    _, _, train_config, _ = tiny
    messages = []
    # Another class count: the class-count layers cannot be restored.
    train(load_config(train_config, "train", [f"checkpoint={tmp_path}/b/model.ckpt",
                                              "max_iteration=1", "save_step=1",
                                              f"intialize={quick_checkpoint}",
                                              "num_classes=7"]),
          log=messages.append, progress=False)
    import tensorflow as tf
    reader = tf.compat.v1.train.NewCheckpointReader
    total = len([n for n in reader(f"{tmp_path}/b/model.ckpt-1").get_variable_to_shape_map()
                 if n.startswith("resnet_v2_50/") and "Adam" not in n])
    # conv78, conv5, conv911, conv912: weights + 4 BN vectors each.
    assert f"initialised {total - 20} of {total} variables" in " ".join(messages)
    assert any("resnet_v2_50/conv5/weights (shape [8, 8, 6, 6] in checkpoint" in m
               for m in messages)


def test_truncated_record_file_is_a_one_line_error(tiny, quick_checkpoint, tmp_path):
    _, files, _, test_config = tiny
    record = str(tmp_path / "truncated.tfrecords")
    with open(files["test"], "rb") as source, open(record, "wb") as target:
        data = source.read()
        target.write(data[:len(data) // 2 + 100])  # cut inside the third of 4
    code, errors, stderr = in_process("evaluate.py", "-c", test_config, "--test_data", record,
                                      "--checkpoint", quick_checkpoint)
    assert code == 2 and len(errors) == 1, stderr
    assert record in errors[0] and "Traceback" not in stderr


def train_with_onednn_off(*args):
    """train.py with oneDNN off and no GPU: in this process where that is
    already so (make test's first pass), else in a new one."""
    import tensorflow as tf
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0" and \
            not tf.config.list_physical_devices("GPU"):
        return in_process("train.py", *args)
    return run_script("train.py", *args, env={"TF_ENABLE_ONEDNN_OPTS": "0"})


@pytest.mark.slow  # two training processes
def test_failed_op_is_reported_as_the_op_not_as_bad_data(tiny, tmp_path):
    """The issue's AMD failure, forced on any machine: native dilated convs
    with oneDNN off have no gradient kernel on the CPU (GPUs hidden)."""
    _, _, train_config, _ = tiny
    code, errors, stderr = train_with_onednn_off(
        "-c", train_config, "--atrous_path", "native", "--gpu_id", "-1",
        "--checkpoint", str(tmp_path / "native" / "model.ckpt"), "--max_iteration", "1")
    assert code == 1 and len(errors) == 1, stderr
    assert "Traceback" not in stderr and "bad data" not in errors[0]
    assert "Conv2DBackprop" in errors[0] and "dilation rates larger than 1" in errors[0]
    # The default path trains in the same setting.
    code, errors, stderr = train_with_onednn_off(
        "-c", train_config, "--gpu_id", "-1", "--max_iteration", "1",
        "--checkpoint", str(tmp_path / "auto" / "model.ckpt"))
    assert code == 0 and not errors, stderr


def test_checkpoint_over_an_input_is_refused_before_training(tiny, tmp_path):
    _, files, train_config, _ = tiny
    before = directory_digest(os.path.dirname(files["train"]))
    with pytest.raises(UserError, match=r"is a file, not a directory"):
        train(load_config(train_config, "train", [f"checkpoint={files['train']}"]),
              progress=False)
    # A state file would be written where the records are.
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    records = str(records_dir / "checkpoint")
    with open(files["train"], "rb") as source, open(records, "wb") as target:
        target.write(source.read())
    with pytest.raises(UserError, match=r"checkpoint .* would replace the input train_data"):
        train(load_config(train_config, "train", [f"checkpoint={records_dir}",
                                                  f"train_data={records}"]), progress=False)
    assert directory_digest(os.path.dirname(files["train"])) == before
    assert os.listdir(records_dir) == ["checkpoint"]


def test_training_checkpoints_describe_their_model_for_resume_and_intialize(
        tiny, quick_checkpoint, tmp_path):
    """netcompress/formats/description.py: a resume and an `intialize` take the
    model from the checkpoint and refuse a model_def that differs in what
    shapes cannot tell (split halves)."""
    import copy
    from netcompress.formats.description import read_description
    root, _, train_config, _ = tiny
    model_def = scaled_model_def(16)
    found = read_description(quick_checkpoint)
    assert (found.model, found.num_classes, found.model_def, found.masks) == \
        ("AdapNet_pp", synthetic.NUM_CLASSES, model_def, {})
    other = copy.deepcopy(model_def)
    other["split"]["8"] = [2, 6]  # block2/unit_4: same shapes as [4, 4]
    other_path = write_json(tmp_path / "other.json", other)
    difference = 'split\\["8"\\] is \\[2, 6\\] in the file, \\[4, 4\\] in the checkpoint'
    one_step = ["max_iteration=1", "save_step=1"]
    with pytest.raises(UserError, match=f"model_def {other_path} differs from the one in "
                                        f"checkpoint {quick_checkpoint}: {difference}"):
        train(load_config(train_config, "train", [f"checkpoint={tmp_path}/init", *one_step,
                                                   f"intialize={quick_checkpoint}",
                                                   f"model_def={other_path}"]),
              progress=False)
    assert not os.path.exists(tmp_path / "init")
    # Without a model_def: the one `intialize` describes (its class count may differ).
    from netcompress.graphs.training import training_model
    fresh = [f"checkpoint={tmp_path}/init", "model_def=None"]
    config = training_model(load_config(train_config, "train", [
        *fresh, f"intialize={quick_checkpoint}", "num_classes=7"]))
    assert config["checkpoint_model"].model_def == model_def and config["num_classes"] == 7
    with pytest.raises(UserError, match="model_def is required to train a new model"):
        training_model(load_config(train_config, "train", fresh))
    shutil.copytree(os.path.dirname(quick_checkpoint), tmp_path / "run")
    before = directory_digest(tmp_path / "run")
    resume = [f"checkpoint={tmp_path}/run/model.ckpt", "max_iteration=2", "save_step=1"]
    with pytest.raises(UserError, match=f"model_def {other_path} differs from the one in "
                                        f"checkpoint {tmp_path}/run/model.ckpt-1: "
                                        f"{difference}"):
        train(load_config(train_config, "train", [*resume, f"model_def={other_path}"]),
              progress=False)
    assert directory_digest(tmp_path / "run") == before
    # No model_def, no num_classes: the checkpoint's.
    messages = []
    result = train(load_config(train_config, "train", [*resume, "model_def=None"]) | {
        "num_classes": None}, log=messages.append, progress=False)
    assert f"resuming from {tmp_path}/run/model.ckpt-1 at step 1" in messages
    assert result["step"] == 2
    assert read_description(result["checkpoint"]).model_def == model_def
