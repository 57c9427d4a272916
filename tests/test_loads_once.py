"""How often one compress.py stage and one rank pass read their inputs and
build graphs (docs/testing.md): a model_def, mask and checkpoint are read,
and a graph built, no more often than the work needs. Counted by wrappers
that call through; the stage runs on a tiny model (default.json / 16,
32x64 synthetic shapes) with the mIoUs replaced as in test_compress.py, so
that its one try is kept."""

import contextlib
import io
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf

from dataset import synthetic
from helpers import compress_workspace
from models import model_def as model_def_module
from models.AdapNet_pp import AdapNet_pp
from netcompress.formats import checkpoints
from netcompress.graphs import inference
from netcompress.jobs import compress as staged
from netcompress.settings.config import load_config
from netcompress.pruning_math.costs import inference_macs, total_parameters
from netcompress.jobs.rank import rank

HEIGHT, WIDTH = 32, 64
NUM_CLASSES = synthetic.NUM_CLASSES


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return compress_workspace(tmp_path_factory.mktemp("once"), NUM_CLASSES, HEIGHT, WIDTH,
                              num_train=4, train_steps=2, retrain_iterations=1,
                              budget=30.0, search_steps=2, latency_runs=1)


class Counts:
    """Calls of the readers and of AdapNet_pp.build while active. Path
    lookups (resolve_checkpoint) are not counted: they read no values, and
    their number varied between runs of the same stage (22 or 21 in the
    budget stage: timing-dependent, not investigated)."""

    # read_checkpoint: the values read from disk (a read_once block shares them).
    READERS = {"load_model_def": (model_def_module, "load_model_def"),
               "load_masks": (model_def_module, "load_masks"),
               "read_checkpoint": (checkpoints, "_read_values")}

    def __init__(self):
        self.calls = dict.fromkeys(list(self.READERS) + ["checkpoint_opens", "builds"], 0)

    def counted(self, name, function):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def active(self):
        with contextlib.ExitStack() as stack:
            for name, (module, attribute) in self.READERS.items():
                original = getattr(module, attribute)
                wrapper = self.counted(name, original)
                # Every module that imported the function by name.
                for loaded in list(sys.modules.values()):
                    if loaded is not None and getattr(loaded, attribute, None) is original:
                        stack.enter_context(mock.patch.object(loaded, attribute, wrapper))
            stack.enter_context(mock.patch.object(
                tf.compat.v1.train, "NewCheckpointReader",
                self.counted("checkpoint_opens", tf.compat.v1.train.NewCheckpointReader)))
            stack.enter_context(mock.patch.object(
                AdapNet_pp, "build", self.counted("builds", AdapNet_pp.build)))
            yield self


def _fake_miou(original):
    def evaluate(self, session, removed, num_classes, bar=None, gate_values=None):
        _, loss = original(self, session, removed, num_classes, bar, gate_values)
        count = sum(len(indices) for indices in removed.values())
        return mock.Mock(mean_iou=lambda: (50.0 - 0.1 * count) / 100.0), loss
    return evaluate


def _stage_one(workspace, tmp_path, *overrides):
    """Counts of one stage 1 after a stand-in stage 0 (mIoU 50)."""
    config = load_config(workspace["config"], "compress",
                         [f"run_dir={tmp_path / 'run'}", *overrides])
    staged.check_inputs(config)
    config = staged.given_model_files(config)
    model_def = workspace["model_def"]
    row0 = {"stage": 0, "model_def": None, "mask": None, "checkpoint": None,
            "parameters": total_parameters(model_def, NUM_CLASSES),
            "macs": inference_macs(model_def, NUM_CLASSES, HEIGHT, WIDTH, {}),
            "resource_percent": 100.0, "reference": 50.0, "reference_checkpoint": None,
            "step_pct": None}
    work = staged._stage_after_retraining if config["stage_rule"] == staged.AFTER_RETRAINING \
        else staged._stage_budget

    def validate(config, model, directory, log, progress, what="after retraining"):
        original_validate(config, model, directory, log, progress, what)
        return 49.5

    original_validate = staged._validate
    counts = Counts()
    with mock.patch.object(inference.GatedGraph, "evaluate",
                           _fake_miou(inference.GatedGraph.evaluate)), \
            mock.patch.object(staged, "_validate", validate), \
            contextlib.redirect_stdout(io.StringIO()), counts.active():
        row, reason = work(config, [row0], str(tmp_path / "run" / "stage1"), print, False)
    staged._held.close()  # run() closes it at its end
    assert row is not None, reason
    assert row["tries"] == 1
    return counts.calls


@pytest.mark.slow  # staged compression, as in test_compress.py
def test_a_stage_after_retraining_reads_and_builds_once(workspace, tmp_path):
    calls = _stage_one(workspace, tmp_path)
    # Graphs: the rank pass, the gated candidates, the written checkpoint's
    # check, retraining, validation and test in one (before: 7, the source
    # checked again by the pruning; 6, validation and test apart).
    # Checkpoint values read from disk: each of the three checkpoints once,
    # the stage's model shared by its rank pass, gated graph and pruning
    # (before: 7, then 6 with the source read three times). model_def and
    # mask: the stage's model's once for all its readers; the new model's
    # are written, not read (retraining and evaluation take them from the
    # checkpoint's description).
    assert calls["builds"] == 5
    assert calls["read_checkpoint"] == 3
    assert calls["checkpoint_opens"] == 10  # before: 18, 16
    assert calls["load_model_def"] == 1  # before: 8, 6
    assert calls["load_masks"] == 0  # before: 6, 4 (the given model has no mask)


@pytest.mark.slow  # staged compression, as in test_compress.py
@pytest.mark.long  # the stage-wide sharing is the after_retraining test's too
def test_a_budget_stage_reads_and_builds_once(workspace, tmp_path):
    calls = _stage_one(workspace, tmp_path, "stage_rule=budget_before_retraining")
    # As a stage after retraining, the search's gated graph for the candidates'.
    assert calls["builds"] == 5  # before: 7, 6
    assert calls["read_checkpoint"] == 3  # before: 7, 6
    assert calls["checkpoint_opens"] == 10  # before: 18, 16
    assert calls["load_model_def"] == 1  # before: 8, 6
    assert calls["load_masks"] == 0  # before: 2, 1


def test_a_rank_pass_reads_and_builds_once(workspace):
    config = dict(workspace["base"], checkpoint=workspace["checkpoint"],
                  test_data=workspace["files"]["train"])
    counts = Counts()
    with counts.active():
        rank(config, progress=False)
    # One graph; the filter norms come from the values restored (before: the
    # checkpoint read twice, opened 4 times).
    assert counts.calls == {"builds": 1, "read_checkpoint": 1, "checkpoint_opens": 3,
                            "load_model_def": 1, "load_masks": 0}


def test_read_once_shares_one_read_of_a_checkpoint(workspace):
    prefix = workspace["checkpoint"]
    counts = Counts()
    with counts.active():
        with checkpoints.read_once(prefix):
            first = checkpoints.read_checkpoint(prefix)
            second = checkpoints.read_checkpoint(prefix)
        after = checkpoints.read_checkpoint(prefix)
    assert counts.calls["read_checkpoint"] == 2  # once in the block, once after it
    assert first is not second and first.keys() == second.keys() == after.keys()
    name = next(key for key, value in first.items() if getattr(value, "ndim", 0))
    assert first[name] is second[name] and not first[name].flags.writeable
    assert after[name].flags.writeable and np.array_equal(after[name], first[name])
