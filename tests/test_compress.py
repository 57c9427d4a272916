"""compress.py (docs/compress.md): the threshold search on its own, then a
two-stage run on a tiny model (default.json / 16, 32x64 synthetic shapes):
run one stage, resume to two, and check the run directory (checkpoints
restore with their model_def + mask, parameters fall, the CSV matches the
evaluations), which records each step reads, and the one-line errors.

The search's mIoU is replaced by a function of the channels removed (50 -
0.1 per channel) after the real gated pass has run: a tiny model's mIoU
does not reliably leave something to remove at every stage."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

import compress
from common.errors import UserError
from dataset import synthetic
from helpers import REPO, scaled_model_def, write_config
from models.model_def import load_masks, load_model_def, save_model_def
from netcompress import compress as staged
from netcompress import evaluation, ranking, training
from netcompress.config import load_config
from netcompress.costs import total_parameters
from netcompress.search import removed_channels, search, search_groups

HEIGHT, WIDTH = 32, 64
NUM_CLASSES = synthetic.NUM_CLASSES


# ---- the search alone -------------------------------------------------------------

def _scores(groups, seed=0):
    rng = np.random.default_rng(seed)
    return {layer: rng.random(8) for layers in groups.values() for layer in layers}


def test_search_shares_the_budget_and_keeps_the_goal():
    groups = search_groups("section")
    assert list(groups) == ["conv1", "block1", "block2", "block3", "block4", "easpp",
                            "decoder"]
    scores = _scores(groups)
    seen = []

    def evaluate(removed):
        seen.append(removed)
        return 50.0 - 0.05 * sum(len(indices) for indices in removed.values())

    found = search(evaluate, scores, groups, budget=2.0, steps=5)
    assert found.start_miou == 50.0 and found.goal == pytest.approx(48.0)
    assert 48.0 <= found.miou < 50.0 and found.removed_count <= 40
    assert found.evaluations == len(seen)  # identical candidates are not re-evaluated
    assert found.miou == evaluate(found.removed)
    # Every group stayed within its share of the budget.
    for name, threshold, miou, passed in found.history:
        share = list(groups).index(name) + 1
        assert passed == (miou >= 50.0 - 2.0 * share / len(groups))
    # The chosen removal is what the thresholds give.
    for name, threshold in found.thresholds.items():
        for layer in groups[name]:
            expected = removed_channels(scores[layer], threshold)
            assert list(found.removed.get(layer, [])) == list(expected)


def test_search_all_and_floor():
    groups = search_groups("all")
    scores = _scores(groups, seed=1)
    found = search(lambda removed: 40.0, scores, groups, budget=1.0, steps=3)
    assert found.thresholds == {"all": 1.0}  # nothing lost: everything but the best goes
    assert all(len(found.removed[layer]) == 7 for layer in groups["all"])
    found = search(lambda removed: 40.0 - len(removed), scores, groups, budget=5.0,
                   floor=40.0)
    assert found.thresholds == {"all": 0.0} and not found.removed


# ---- a two-stage run ------------------------------------------------------------

def _fake_miou(original):
    """GatedGraph.evaluate that runs the real pass, then reports 50 - 0.1 per
    removed channel as the mIoU."""
    def evaluate(self, session, removed, num_classes, bar=None, gate_values=None):
        _, loss = original(self, session, removed, num_classes, bar, gate_values)
        count = sum(len(indices) for indices in removed.values())
        return mock.Mock(mean_iou=lambda: (50.0 - 0.1 * count) / 100.0), loss
    return evaluate


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    save_model_def(scaled_model_def(16), str(root / "tiny.json"))
    files = synthetic.generate(str(root / "data"), num_train=8, num_test=4, num_val=4,
                               height=HEIGHT, width=WIDTH, seed=3)
    base = dict(gpu_id="", model="AdapNet_pp", num_classes=NUM_CLASSES, batch_size=4,
                skip_step=10, height=HEIGHT, width=WIDTH, mask=None,
                model_def=str(root / "tiny.json"))
    train_config = write_config(root / "train.config", dict(
        base, intialize=None, checkpoint=root / "start" / "model.ckpt",
        train_data=files["train"], max_iteration=4, learning_rate=0.005, save_step=4,
        power=0.9))
    checkpoint = training.train(load_config(train_config, "train"), progress=False,
                                seed=0)["checkpoint"]
    config = write_config(root / "compress.config", dict(
        base, checkpoint=checkpoint, train_data=files["train"], val_data=files["val"],
        test_data=files["test"], run_dir=root / "run", stages=1, retrain_iterations=3,
        learning_rate=0.001, power=0.9, budget=1.0, search_steps=3, latency_runs=2,
        seed=0))
    return {"root": root, "files": files, "config": config, "checkpoint": checkpoint}


def _run(workspace, *overrides):
    """compress.main in this process; returns (log lines, [(step, records read)])."""
    reads = []

    def recording(function):
        def wrapper(path, *args, **kwargs):
            reads.append((staged.current_step, os.path.realpath(path)))
            return function(path, *args, **kwargs)
        return wrapper

    with mock.patch.object(evaluation, "eval_dataset", recording(evaluation.eval_dataset)), \
            mock.patch.object(evaluation, "count_records", recording(evaluation.count_records)), \
            mock.patch.object(ranking, "count_records", recording(ranking.count_records)), \
            mock.patch.object(training, "train_dataset", recording(training.train_dataset)), \
            mock.patch.object(evaluation.GatedGraph, "evaluate",
                              _fake_miou(evaluation.GatedGraph.evaluate)), \
            contextlib.redirect_stdout(io.StringIO()) as output:
        compress.main(["-c", workspace["config"], *overrides])
    return output.getvalue().splitlines(), reads


@pytest.fixture(scope="module")
def runs(workspace):
    """One stage, then a rerun to two stages over a half-written stage 2."""
    run_dir = workspace["root"] / "run"
    first = _run(workspace)
    stage1 = run_dir / "stage1"
    before = {path: os.stat(path).st_mtime_ns for path in _files(stage1)}
    row1 = (stage1 / "row.json").read_text()
    (run_dir / "stage2").mkdir()
    (run_dir / "stage2" / "rank.npz").write_text("half-written")
    second = _run(workspace, "--stages", "2")
    return {"run_dir": run_dir, "first": first, "second": second, "mtimes": before,
            "row1": row1}


def _files(directory):
    return sorted(os.path.join(where, name) for where, _, names in os.walk(directory)
                  for name in names)


def _rows(run_dir):
    return staged.finished_rows({"run_dir": str(run_dir)})


def test_resume_keeps_finished_stages(runs):
    stage1 = runs["run_dir"] / "stage1"
    assert (stage1 / "row.json").read_text() == runs["row1"]
    assert {path: os.stat(path).st_mtime_ns for path in _files(stage1)} == runs["mtimes"]
    log = runs["second"][0]
    assert any(line.startswith("resuming") for line in log)
    assert any("clearing the unfinished" in line for line in log)
    assert not any(line.startswith("== stage 1") for line in log)
    assert [row["stage"] for row in _rows(runs["run_dir"])] == [0, 1, 2]
    assert (runs["run_dir"] / "stage2" / "rank.npz").read_bytes()[:2] == b"PK"


def test_run_directory_is_consistent(runs, workspace):
    from netcompress.checkpoint_paths import resolve_checkpoint
    from netcompress.pruning import verify_checkpoint

    run_dir = runs["run_dir"]
    rows = _rows(run_dir)
    config = load_config(workspace["config"], "compress")
    parameters = []
    for row in rows:
        model_def, mask, checkpoint = staged._stage_model(config, row)
        definition = load_model_def(model_def)
        verify_checkpoint(resolve_checkpoint(checkpoint), definition, load_masks(mask),
                          NUM_CLASSES, HEIGHT, WIDTH, f"stage {row['stage']}")
        assert total_parameters(definition, NUM_CLASSES) == row["parameters"]
        parameters.append(row["parameters"])
        if row["stage"]:
            for name in ("rank.npz", "search.json", "prune.txt", "eval.txt",
                         "pruned/model_def.json", "retrain/checkpoint"):
                assert (run_dir / f"stage{row['stage']}" / name).is_file(), name
            search = json.loads((run_dir / f"stage{row['stage']}" / "search.json").read_text())
            assert search["evaluations"] == row["candidates"] > 0
            assert row["candidates_per_s"] > 0
    assert parameters == sorted(parameters, reverse=True) and len(set(parameters)) == 3
    with open(run_dir / "stages.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["stage"]) for r in table] == [0, 1, 2]
    for row, line in zip(rows, table):
        evaluated = (run_dir / f"stage{row['stage']}" / "eval.txt").read_text()
        miou = evaluated.strip().splitlines()[-1]
        assert miou.startswith("mIoU: ") and float(line["test_miou"]) == float(miou[6:])
        assert int(line["parameters"]) == row["parameters"]
        assert float(line["latency_ms"]) > 0
        assert float(line["miou_change"]) == pytest.approx(
            float(line["test_miou"]) - float(table[0]["test_miou"]), abs=0.011)
    assert (run_dir / "compression.png").read_bytes()[:4] == b"\x89PNG"
    log = runs["second"][0]
    assert any(line.lstrip().startswith("stage  parameters") for line in log)


def test_search_never_reads_the_test_records(runs, workspace):
    test = os.path.realpath(workspace["files"]["test"])
    val = os.path.realpath(workspace["files"]["val"])
    reads = runs["first"][1] + runs["second"][1]
    assert {step for step, path in reads if path == test} == {"evaluate"}
    assert {path for step, path in reads if step == "search"} == {val}
    assert {step for step, path in reads if path == val} == {"search"}


def test_rerun_with_other_settings_is_refused(runs, workspace):
    config = load_config(workspace["config"], "compress", ["budget=2"])
    with pytest.raises(UserError, match="budget"):
        staged.check(config)


def test_bad_inputs_are_one_line_errors(workspace, tmp_path):
    files = workspace["files"]
    config = load_config(workspace["config"], "compress",
                         [f"val_data={files['test']}", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(UserError, match="test data"):
        staged.check(config)
    config = load_config(workspace["config"], "compress",
                         [f"run_dir={os.path.dirname(files['val'])}"])
    with pytest.raises(UserError, match="holds the input"):
        staged.check(config)
    result = subprocess.run([sys.executable, os.path.join(REPO, "compress.py"), "-c",
                             workspace["config"], "--set", "budgte=1"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: override budgte=1: unknown key 'budgte' (value 1) for a compress config; "
        "did you mean 'budget'?"]
    assert not os.path.exists(tmp_path / "r")
