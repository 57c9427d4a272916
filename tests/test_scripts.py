"""Every script, run as users run it, prints its own output and no
TensorFlow start-up or deprecation lines. make test runs the whole
procedure with TF_ENABLE_ONEDNN_OPTS=0, and a training and an evaluation
again with =1 (TensorFlow prints its oneDNN notice at start-up, the same
start-up for every script)."""

import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, scaled_model_def, write_config, write_json

HEIGHT, WIDTH, NUM_CLASSES = 32, 64, 6
# absl's preamble, glog-style lines (I0000 00:00:...), the oneDNN notice,
# Python warnings and TensorFlow's deprecation notices.
TF_NOISE = re.compile(r"absl|oneDNN|^[IWEF]\d{4} |^WARNING|Warning:|Instructions for "
                      r"updating|deprecat|cuda|TensorFlow binary", re.IGNORECASE)


def run(*arguments):
    process = subprocess.run([sys.executable, *map(str, arguments)], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    noise = [line for line in process.stderr.splitlines() if TF_NOISE.search(line)]
    script = arguments[1] if arguments[0] == "-m" else arguments[0]
    assert not noise, f"{script} printed:\n" + "\n".join(noise)
    return process.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    run("-m", "dataset.synthetic", "--out", root / "data", "--num_train", 8,
        "--num_test", 4, "--height", HEIGHT, "--width", WIDTH)
    model_def = write_json(root / "model_def.json", scaled_model_def(16))
    common = dict(gpu_id="", model="AdapNet_pp", num_classes=NUM_CLASSES, batch_size=4,
                  skip_step=1, height=HEIGHT, width=WIDTH, mask=None, model_def=model_def)
    train_config = write_config(root / "train.config", dict(
        common, intialize=None, checkpoint=root / "run", train_data=root / "data" /
        "train.tfrecords", max_iteration=2, learning_rate=1e-3, save_step=2, power=0.9))
    test_values = dict(common, checkpoint=root / "run",
                       test_data=root / "data" / "test.tfrecords")
    test_config = write_config(root / "test.config", test_values)
    rank_config = write_config(root / "rank.config", dict(
        test_values, test_data=root / "data" / "train.tfrecords",
        rank_save=root / "rank.npz"))
    return root, model_def, train_config, test_config, rank_config


@pytest.mark.onednn
@pytest.mark.skipif(os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0",
                    reason="oneDNN off: the whole procedure below runs these scripts")
def test_training_and_evaluation_are_quiet_with_onednn_on(workspace, tmp_path):
    _, _, train_config, test_config, _ = workspace
    assert "saved" in run("train.py", "-c", train_config, "--checkpoint", tmp_path / "run")
    assert "mIoU:" in run("evaluate.py", "-c", test_config, "--checkpoint", tmp_path / "run")


@pytest.mark.slow
def test_the_procedure_through_the_scripts_is_quiet(workspace):
    root, model_def, train_config, test_config, rank_config = workspace
    assert "saved" in run("train.py", "-c", train_config)
    assert "mIoU:" in run("evaluate.py", "-c", test_config)
    assert "saved" in run("get_oracle_rank.py", "-c", rank_config)
    prune = ["prun_model.py", "--save_nvidia_name", root / "rank.npz",
             "--checkpoint_name", root / "run", "--model_def", model_def,
             "--Num_classes", NUM_CLASSES, "--height", HEIGHT, "--width", WIDTH,
             "--phase", "easpp", "--threshold", 0.5,
             "--histogram_save", root / "histogram.png",
             "--new_checkpoint_save", root / "pruned" / "model.ckpt",
             "--new_model_def", root / "pruned" / "model_def.json",
             "--mask_save", root / "pruned" / "mask.npy"]
    assert "all selected" in run(*prune, "--decide_threshold", "true")
    run(*prune, "--try_zeros", "false")
    assert os.path.isfile(root / "pruned" / "model.ckpt.index")
    assert "mIoU:" in run("evaluate.py", "-c", test_config, "--checkpoint",
                          root / "pruned" / "model.ckpt", "--model_def",
                          root / "pruned" / "model_def.json")
