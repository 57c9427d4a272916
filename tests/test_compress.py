"""compress.py (docs/compress.md): the step/acceptance/redo logic and the
threshold search on their own (stand-in evaluations, no TensorFlow), then
runs on a tiny model (default.json / 16, 32x64 synthetic shapes): the
default rule with residual streams for one stage whose first step is redone
(with the other allocation family, then with half the step), resumed to
two, and one stage of budget_before_retraining with residual streams; checked: the
run directory (checkpoints restore with their model_def + mask, parameters
fall, the CSV matches the evaluations, a stream narrows without masks), which records each step reads, that the test
records are read only after a stage is decided, and the one-line errors.

Real passes run, but their mIoU is replaced: the gated passes report 50 -
0.1 per removed channel, the validation after retraining 40 for stage 1's
first two tries and 49.5 otherwise (50 for the given model), so that the tiny
model's noisy mIoU cannot decide what the tests check."""

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

import compress
from common.errors import UserError
from dataset import synthetic
from helpers import REPO, compress_workspace, scaled_model_def
from models.architecture import adapnet_pp, resolve_widths
from models.model_def import load_masks, load_model_def
from netcompress.jobs import compress as staged
from netcompress.graphs import inference, training
from netcompress.jobs import evaluate as evaluation, rank as ranking
from netcompress.settings.config import load_config
from netcompress.pruning_math.costs import total_parameters
from netcompress.pruning_math.plan import plan_removal
from netcompress.pruning_math.schedule import Attempt, channel_costs, direct_iterations, \
    family_orderings, least_reachable, orderings, prefix_removal, removal_for_goal, \
    resource_of, run_stage
from netcompress.pruning_math.search import removed_channels, search, search_groups

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


# ---- the step, acceptance and redo logic alone -------------------------------------

def _attempts(outcomes):
    """A stand-in attempt: the validation mIoU after retraining is
    outcomes(step); it reaches its goal exactly."""
    calls = []

    def attempt(step, goal, excluded=()):
        assert excluded == ()  # one allocation family: never a family redo
        calls.append((step, goal))
        return Attempt(step, goal, reached=goal, removed=10, val_miou=outcomes(step))
    return attempt, calls


def test_stage_kept_at_its_first_step():
    attempt, calls = _attempts(lambda step: 49.5)
    kept, tries = run_stage(100.0, 20.0, 30.0, 5.0, 49.0, attempt, log=lambda line: None)
    assert calls == [(30.0, 70.0)] and kept is tries[0] and kept.accepted


def test_stage_redone_with_half_the_step():
    attempt, calls = _attempts(lambda step: 48.0 if step > 10 else 49.2)
    logged = []
    kept, tries = run_stage(70.0, 20.0, 30.0, 5.0, 49.0, attempt, log=logged.append)
    assert calls == [(30.0, 40.0), (15.0, 55.0), (7.5, 62.5)]
    assert [t.accepted for t in tries] == [False, False, True] and kept is tries[-1]
    assert "redo with a step of 15 points" in logged[0]
    assert "redo with a step of 7.5 points" in logged[1]


def test_run_stops_when_the_smallest_step_fails():
    attempt, calls = _attempts(lambda step: 10.0)
    logged = []
    kept, tries = run_stage(100.0, 20.0, 20.0, 5.0, 49.0, attempt, log=logged.append)
    assert kept is None and [step for step, _ in calls] == [20.0, 10.0, 5.0]
    assert "smallest step (5 points) failed" in tries[-1].note and logged[-1].endswith("failed")


def test_last_step_stops_at_the_target_and_may_be_small():
    attempt, calls = _attempts(lambda step: 50.0)
    kept, _ = run_stage(22.0, 20.0, 30.0, 5.0, 49.0, attempt, log=lambda line: None)
    assert calls == [(2.0, 20.0)] and kept.accepted


def test_nothing_left_to_remove_stops():
    def attempt(step, goal, excluded=()):
        return Attempt(step, goal, removed=0)
    kept, tries = run_stage(50.0, 20.0, 10.0, 5.0, 49.0, attempt, log=lambda line: None)
    assert kept is None and len(tries) == 1 and "no channel left" in tries[0].note


def test_earlier_tries_are_counted_first():
    """A stage's direct try, made before the steps, is the first of its tries
    and numbers the tries after it."""
    direct = Attempt(60.0, 40.0, reached=40.0, removed=30, val_miou=45.0)
    attempt, calls = _attempts(lambda step: 49.5)
    logged = []
    kept, tries = run_stage(100.0, 40.0, 20.0, 5.0, 49.0, attempt, log=logged.append,
                            earlier=[direct])
    assert calls == [(20.0, 80.0)] and tries == [direct, kept] and kept.accepted
    attempt, calls = _attempts(lambda step: 10.0)
    kept, tries = run_stage(100.0, 40.0, 20.0, 10.0, 49.0, attempt, log=logged.append,
                            earlier=[direct])
    assert kept is None and len(tries) == 3 and logged[-1].startswith("try 3: ")


def test_direct_iterations():
    """auto: the retraining of the stages the step needs to reach the target,
    each kept at its first try, at most `stages`; none where one step
    reaches the target anyway."""
    assert direct_iterations("auto", 100, 8, 100.0, 40.0, 20.0) == 300
    assert direct_iterations("auto", 100, 8, 100.0, 39.0, 20.0) == 400  # 61 points: 4 steps
    assert direct_iterations("auto", 100, 2, 100.0, 40.0, 20.0) == 200
    assert direct_iterations("auto", 100, 8, 100.0, 80.0, 20.0) == 0
    assert direct_iterations(700, 100, 8, 100.0, 40.0, 20.0) == 700
    assert direct_iterations(0, 100, 8, 100.0, 40.0, 20.0) == 0


def test_direct_try_is_kept_or_hands_over_to_the_steps(tmp_path):
    """The direct try aims at the target from the stage's model, retrained the
    direct steps, and is judged against a reference retrained as long (here
    a stand-in reference of 50, tolerance 2)."""
    config = {"target_percent": 40.0, "tolerance": 2.0}
    references = []

    def reference(config, rows, directory, stage, log, progress, iterations=None,
                  name="reference"):
        references.append((stage, iterations, name))
        return 50.0, os.path.join("stage1", name, "retrain", "model.ckpt-300")

    for val, kept in ((48.5, True), (47.5, False)):
        calls, judged, logged = [], {}, []

        def attempt(step, goal, excluded=(), iterations=None, direct=False):
            calls.append((step, goal, iterations, direct))
            return Attempt(step, goal, reached=goal, removed=30, val_miou=val)

        with mock.patch.object(staged, "_reference", reference):
            accepted, tries = staged._direct_try(config, [{"stage": 0}], str(tmp_path), 100.0,
                                                 300, attempt, judged, logged.append, False)
        assert calls == [(60.0, 40.0, 300, True)] and len(tries) == 1
        assert (accepted is tries[0]) == kept and tries[0].accepted == kept
        assert judged["direct"] == {"reference": 50.0, "floor": 48.0, "reference_checkpoint":
                                    os.path.join("stage1", "direct_reference", "retrain",
                                                 "model.ckpt-300")}
        assert logged[0].startswith("direct try: the whole way to the target (60 points)")
        if not kept:
            assert tries[0].note.startswith("validation mIoU 47.50 < 48.00: step toward")
    assert references == [(1, 300, "direct_reference")] * 2


def _family_attempts(outcomes):
    """A stand-in with two allocation families: the streams family is chosen
    first (as if its gated mIoU were higher); ``outcomes(step, family)``."""
    calls = []

    def attempt(step, goal, excluded=()):
        families = [family for family in ("streams", "convs") if family not in excluded]
        family = families[0]
        calls.append((step, family))
        return Attempt(step, goal, reached=goal, removed=10, val_miou=outcomes(step, family),
                       family=family, others=tuple(families[1:]))
    return attempt, calls


def test_failed_step_is_redone_with_the_other_family_first():
    attempt, calls = _family_attempts(lambda step, family: 49.5 if family == "convs" else 47.0)
    logged = []
    kept, tries = run_stage(100.0, 20.0, 30.0, 5.0, 49.0, attempt, log=logged.append)
    assert calls == [(30.0, "streams"), (30.0, "convs")]
    assert kept is tries[1] and kept.family == "convs" and not tries[0].accepted
    assert "redo the step with the allocation family convs" in logged[0]


def test_both_families_failing_halve_the_step_and_try_both_again():
    attempt, calls = _family_attempts(
        lambda step, family: 49.5 if (step, family) == (15.0, "convs") else 48.0)
    kept, tries = run_stage(100.0, 20.0, 30.0, 5.0, 49.0, attempt, log=lambda line: None)
    assert calls == [(30.0, "streams"), (30.0, "convs"), (15.0, "streams"), (15.0, "convs")]
    assert kept is tries[-1] and [t.accepted for t in tries] == [False] * 3 + [True]


def test_family_orderings_keep_the_convs_apart_from_the_streams():
    model_def = scaled_model_def(8)
    widths = resolve_widths(model_def, NUM_CLASSES, adapnet_pp())
    rng = np.random.default_rng(2)
    layers = search_groups("all", streams=True)["all"]
    streams = [layer for layer in layers if layer.endswith("/residual")]
    assert len(streams) == 4
    raw = {layer: rng.random(widths[layer]) for layer in layers}
    costs = {layer: 1.0 + index for index, layer in enumerate(layers)}
    convs = {layer: raw[layer] for layer in layers if layer not in streams}
    alone = family_orderings(convs, convs, costs, [])
    assert {name: order for name, (_, order) in alone.items()} == \
        orderings(convs, convs, costs)  # without streams: exactly as before
    both = family_orderings(raw, raw, costs, streams)
    assert set(both) == set(alone) | {name + "+streams" for name in alone}
    for name, (family, order) in both.items():
        touched = {layer for layer, _ in order}
        if name.endswith("+streams"):
            assert family == "streams" and order == orderings(raw, raw, costs)[name[:-8]]
            assert set(streams) <= touched
        else:
            assert family == "convs" and order == alone[name][1]
            assert not touched & set(streams)


def test_streams_reach_macs_goals_the_convs_alone_cannot():
    """With every removable channel gone (each layer keeps its best one), the
    streams' readers and writers still run at full stream width unless the
    streams are prunable too; a goal between the two is reached only with
    them, through a plan that stays valid (conv3s given back a channel)."""
    model_def = scaled_model_def(8)
    rng = np.random.default_rng(1)
    widths = resolve_widths(model_def, NUM_CLASSES, adapnet_pp())
    given = resource_of(model_def, {}, NUM_CLASSES, HEIGHT, WIDTH, "macs")
    reachable = {}
    for streams in (False, True):
        layers = search_groups("all", streams=streams)["all"]
        raw = {layer: rng.random(widths[layer]) for layer in layers}
        order = orderings(raw, raw, {layer: 1.0 for layer in layers})["global"]
        removed, after = removal_for_goal(order, 0.0, model_def, {}, NUM_CLASSES, HEIGHT,
                                          WIDTH, "macs")
        assert any(layer.endswith("/residual") for layer in removed) == streams
        # What decides whether a stage's direct try can reach its target.
        half = order[:len(order) // 2]
        assert least_reachable({"whole": order, "half": half}, model_def, {}, NUM_CLASSES,
                               HEIGHT, WIDTH, "macs") == after
        assert least_reachable({"half": half}, model_def, {}, NUM_CLASSES, HEIGHT, WIDTH,
                               "macs") > after
        reachable[streams] = after / given
    print(f"smallest MACs fraction: convs {reachable[False]:.3f}, "
          f"with streams {reachable[True]:.3f}")
    assert reachable[True] < 0.5 * reachable[False]


def test_removal_meets_the_step_with_the_shortest_prefix():
    """The chosen removal is the shortest prefix of the order that reaches the
    goal, its layers keep their best channel, and the plan counts it."""
    model_def = scaled_model_def(8)
    groups = search_groups("all")["all"]
    rng = np.random.default_rng(0)
    widths = resolve_widths(model_def, NUM_CLASSES, adapnet_pp())
    raw = {layer: rng.random(widths[layer]) for layer in groups}
    normalised = {layer: values / values.max() for layer, values in raw.items()}
    costs = channel_costs(model_def, {}, NUM_CLASSES, HEIGHT, WIDTH, "parameters", groups)
    assert all(cost > 0 for cost in costs.values())
    orders = orderings(raw, normalised, costs)
    assert set(orders) == {"global", "global_per_cost", "per_layer"}
    first = orders["global"]
    assert [raw[layer][index] for layer, index in first] == \
        sorted(raw[layer][index] for layer, index in first)
    for layer in groups:  # the best channel of every layer never goes
        assert (layer, int(np.argmax(raw[layer]))) not in first
    base = resource_of(model_def, {}, NUM_CLASSES, HEIGHT, WIDTH, "parameters")
    goal = 0.6 * base
    for order in orders.values():
        removed, after = removal_for_goal(order, goal, model_def, {}, NUM_CLASSES, HEIGHT,
                                          WIDTH, "parameters")
        count = sum(len(indices) for indices in removed.values())
        assert after <= goal
        shorter = plan_removal(model_def, {}, NUM_CLASSES, prefix_removal(order, count - 1))
        assert total_parameters(shorter.model_def_after, NUM_CLASSES) > goal
        plan = plan_removal(model_def, {}, NUM_CLASSES, removed)
        assert total_parameters(plan.model_def_after, NUM_CLASSES) == after


# ---- runs on a tiny model ----------------------------------------------------------

def _fake_miou(original):
    """GatedGraph.evaluate that runs the real pass, then reports 50 - 0.1 per
    removed channel as the mIoU."""
    def evaluate(self, session, removed, num_classes, bar=None, gate_values=None):
        _, loss = original(self, session, removed, num_classes, bar, gate_values)
        count = sum(len(indices) for indices in removed.values())
        return mock.Mock(mean_iou=lambda: (50.0 - 0.1 * count) / 100.0), loss
    return evaluate


FAILING_TRIES = (os.path.join("stage1", "try1"), os.path.join("stage1", "try2"))


def _fake_validation(original, events, failing=FAILING_TRIES):
    """compress's _validate that runs the real pass, then reports 40 for
    the tries ``failing`` (stage 1's first two), 50 for the given model and
    the reference, 49.5 otherwise; ``events`` records (what, directory) in
    order."""
    def validate(config, model, directory, log, progress, what="after retraining"):
        original(config, model, directory, log, progress, what)
        events.append(("validate", os.path.relpath(directory, config["run_dir"])))
        if failing and directory.endswith(failing):
            return 40.0
        return 50.0 if directory.endswith(("stage0", "reference")) else 49.5
    return validate


def _recorded_retraining(original, events):
    def retrain_config(config, pruned, directory, iterations=None):
        events.append(("retrain", os.path.relpath(directory, config["run_dir"]),
                       os.path.realpath(pruned["checkpoint"])))
        return original(config, pruned, directory, iterations)
    return retrain_config


def _recorded_test(original, events):
    def evaluate_test(config, model, directory, log, progress):
        events.append(("evaluate", os.path.relpath(directory, config["run_dir"])))
        return original(config, model, directory, log, progress)
    return evaluate_test


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return compress_workspace(tmp_path_factory.mktemp("compress"), NUM_CLASSES, HEIGHT,
                              WIDTH, num_train=8, train_steps=4, retrain_iterations=2,
                              budget=1.0, search_steps=3, latency_runs=2)


def _run(workspace, *overrides, failing=FAILING_TRIES):
    """compress.main in this process; returns (log lines, [(step, records read)],
    [(validate, evaluate or retrain, directory in run_dir[, initial checkpoint])]).
    ``failing``: the tries whose validation after retraining is below the floor."""
    reads, events = [], []

    def recording(function):
        def wrapper(path, *args, **kwargs):
            # A graph whose records are fed per pass is built with a tensor;
            # its passes are recorded by count_records, one per file read.
            if isinstance(path, str):
                reads.append((staged.current_step, os.path.realpath(path)))
            return function(path, *args, **kwargs)
        return wrapper

    with mock.patch.object(inference, "eval_dataset", recording(inference.eval_dataset)), \
            mock.patch.object(evaluation, "count_records", recording(evaluation.count_records)), \
            mock.patch.object(ranking, "count_records", recording(ranking.count_records)), \
            mock.patch.object(training, "train_dataset", recording(training.train_dataset)), \
            mock.patch.object(inference.GatedGraph, "evaluate",
                              _fake_miou(inference.GatedGraph.evaluate)), \
            mock.patch.object(staged, "_validate",
                              _fake_validation(staged._validate, events, failing)), \
            mock.patch.object(staged, "_evaluate_test",
                              _recorded_test(staged._evaluate_test, events)), \
            mock.patch.object(staged, "retrain_config",
                              _recorded_retraining(staged.retrain_config, events)), \
            contextlib.redirect_stdout(io.StringIO()) as output:
        compress.main(["-c", workspace["config"], *overrides])
    return output.getvalue().splitlines(), reads, events


@pytest.fixture(scope="module")
def runs(workspace):
    """The default rule with residual streams prunable: one stage (its first
    step redone with the other allocation family, then with half the step),
    then a rerun to two stages over a half-written stage 2; and one stage of
    budget_before_retraining, streams prunable too, in another run_dir."""
    run_dir = workspace["root"] / "run"
    # Latency: the rerun measures every stage again and writes the table checked.
    with mock.patch.object(staged, "measure_latency", lambda *args, **kwargs: {}):
        first = _run(workspace, "--final_iterations", "0")  # the rerun's final retraining only
    stage1 = run_dir / "stage1"
    before = {path: os.stat(path).st_mtime_ns for path in _files(stage1)}
    row1 = (stage1 / "row.json").read_text()
    (run_dir / "stage2").mkdir()
    (run_dir / "stage2" / "rank.npz").write_text("half-written")
    second = _run(workspace, "--stages", "2")
    budget_dir = workspace["root"] / "budget"
    with mock.patch.object(staged, "measure_latency", lambda *args, **kwargs: {}):
        # A budget of 30 points lets conv1 and block1 pass at threshold 1 (each
        # layer and block1's stream keep their best channel; 81 channels at
        # most, 8.1 points of the stand-in mIoU), so a stream is cut whatever
        # the scores; block2 on is bisected. Latency: measured in the rerun.
        budget = _run(workspace, "--stage_rule", "budget_before_retraining", "--run_dir",
                      str(budget_dir), "--budget", "30")
    return {"run_dir": run_dir, "first": first, "second": second, "mtimes": before,
            "row1": row1, "budget_dir": budget_dir, "budget": budget}


def _files(directory):
    return sorted(os.path.join(where, name) for where, _, names in os.walk(directory)
                  for name in names)


def _rows(run_dir):
    return staged.finished_rows({"run_dir": str(run_dir)})


@pytest.mark.slow
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


@pytest.mark.slow
def test_failed_try_is_redone_with_the_other_family_then_half_the_step(runs):
    rows = _rows(runs["run_dir"])
    first, second = rows[1], rows[2]
    assert first["tries"] == 3 and first["step_pct"] == 15.0
    tries = json.loads((runs["run_dir"] / "stage1" / "tries.json").read_text())["tries"]
    # The step of 30 points failed by the family chosen on validation data,
    # then by the other one; with the streams, whose channels remove many
    # parameters each, the stand-in's mIoU (fewest channels) chooses them.
    families = [t["family"] for t in tries]
    assert families == ["streams", "convs", "streams"]
    assert [t["step_pct"] for t in tries] == [30.0, 30.0, 15.0]
    assert [t["allocation"].endswith("+streams") for t in tries] == [True, False, True]
    assert [t["accepted"] for t in tries] == [False, False, True]
    assert tries[0]["removed_channels"] < tries[1]["removed_channels"]
    assert first["failed_tries"] == [
        {"step_pct": 30.0, "allocation": t["allocation"],
         "resource_pct": pytest.approx(70.0, abs=1.0), "val_miou_retrained": 40.0,
         "iterations": 2, "direct": False}
        for t in tries[:2]]
    assert first["model_def"].startswith(os.path.join("stage1", "try3"))
    assert first["allocation"] == tries[2]["allocation"]
    assert first["resource_percent"] <= 85.0 + 1e-9 < rows[0]["resource_percent"]
    # The next stage starts from the step last kept.
    assert second["tries"] == 1 and second["step_pct"] == 15.0
    assert second["resource_percent"] <= 70.0 + 1e-9
    assert json.loads((runs["run_dir"] / "stage1" / "tries.json").read_text())["floor"] == 49.0
    log = runs["first"][0]
    assert any("redo the step with the allocation family convs" in line for line in log)
    assert any("not by streams" in line for line in log)
    assert any("redo with a step of 15 points" in line for line in log)
    assert any(f"(redone: step 30 -> val 40.00, step 30 {tries[1]['allocation']} -> val "
               f"40.00)" in line for line in log)
    with open(runs["run_dir"] / "stages.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [line["tries"] for line in table] == ["0", "3", "1", "0"]  # the last: final
    assert [float(line["val_miou_retrained"]) for line in table] == [50.0, 49.5, 49.5, 49.5]


@pytest.mark.slow
def test_final_model_gets_the_retraining_the_failed_tries_used(runs, workspace):
    """final_iterations auto (the rerun): the last kept stage's model is
    retrained as many more steps as the tries not kept retrained (stage 1's
    two failed tries, 2 steps each), so that it has had the run's whole
    retraining; 0 (the first run) and a run whose tries were all kept have
    none."""
    from netcompress.formats.checkpoint_paths import resolve_checkpoint

    run_dir = runs["run_dir"]
    rows = _rows(run_dir)
    final = json.loads((run_dir / "final" / "final.json").read_text())
    assert final["stage"] == 2 and final["iterations"] == 2 * 2
    assert (final["model_def"], final["mask"]) == (rows[2]["model_def"], rows[2]["mask"])
    assert final["checkpoint"] == os.path.join("final", "retrain", "model.ckpt-4")
    tested = (run_dir / "final" / "eval.txt").read_text().strip().splitlines()[-1]
    assert float(tested[6:]) == round(final["test_miou"], 2)
    retrained = [event for event in runs["second"][2]
                 if event[0] == "retrain" and event[1] == "final"]
    source = staged._stage_model({"run_dir": str(run_dir)}, rows[2])[2]
    assert [event[2] for event in retrained] == [os.path.realpath(resolve_checkpoint(source))]
    assert any(line.rstrip().endswith("stage 2 retrained 4 more steps")
               and line.split()[0] == "final" for line in runs["second"][0])
    # final_iterations 0 (the first run): none; a run whose tries were all kept: none.
    assert not [event for event in runs["first"][2] if event[1] == "final"]
    assert not any(line.split()[:1] == ["final"] for line in runs["first"][0])
    assert not (runs["budget_dir"] / "final").exists()


def test_failed_retraining_steps_counts_every_try_not_kept(tmp_path):
    rows = [{"stage": 0},
            {"stage": 1, "failed_tries": [{"val_miou_retrained": 40.0},
                                          {"val_miou_retrained": None}]},  # not retrained
            {"stage": 2, "failed_tries": []}]
    config = {"run_dir": str(tmp_path), "retrain_iterations": 50}
    assert staged.failed_retraining_steps(config, rows) == 50
    (tmp_path / "stage3").mkdir()  # the stage that failed: every try retrained
    (tmp_path / "stage3" / "tries.json").write_text(json.dumps(
        {"tries": [{"val_miou_retrained": 30.0}, {"val_miou_retrained": 31.0}]}))
    assert staged.failed_retraining_steps(config, rows) == 150
    assert staged.failed_retraining_steps(config, rows[:1]) == 0
    # A try with its own count (a direct try) counts it; so does a kept one.
    rows[1]["failed_tries"][0].update(iterations=300, direct=True)
    assert staged.failed_retraining_steps(config, rows) == 400
    assert staged.retraining_steps(config, rows) == 400 + 2 * 50
    rows[2]["iterations"] = 300
    assert staged.retraining_steps(config, rows) == 400 + 50 + 300


def test_reference_is_retrained_alongside(tmp_path):
    """reference: retrained: stage 1 retrains the given model as a try is
    retrained (same stage seed), stage 2 continues from stage 1's reference,
    so each stage is judged against as many steps (stand-ins for training
    and validation)."""
    config = {"reference": "retrained", "run_dir": str(tmp_path), "model_def": "m.json",
              "mask": None, "checkpoint": "given.ckpt", "gpu_id": "", "model": "AdapNet_pp",
              "num_classes": NUM_CLASSES, "batch_size": 1, "skip_step": 1, "height": HEIGHT,
              "width": WIDTH, "atrous_path": "auto"}
    trained = []

    def retrain(config, model, directory, stage, log, progress, iterations=None,
                step="retrain"):
        trained.append((model["checkpoint"], os.path.relpath(directory, tmp_path), stage,
                        step))
        return os.path.join(directory, "retrain", "model.ckpt-2")

    rows = [{"stage": 0, "reference": 40.0, "reference_checkpoint": None}]
    with mock.patch.object(staged, "_retrain", retrain), \
            mock.patch.object(staged, "_validate", lambda *args, **kwargs: 45.0), \
            mock.patch.object(staged, "_given_model",
                              lambda config: staged.model_config(config, "m.json", None,
                                                                 "given.ckpt")):
        first = staged._reference(config, rows, str(tmp_path / "stage1"), 1, print, False)
        rows.append({"stage": 1, "reference": first[0], "reference_checkpoint": first[1]})
        second = staged._reference(config, rows, str(tmp_path / "stage2"), 2, print, False)
        given = staged._reference(dict(config, reference="given"), rows,
                                  str(tmp_path / "stage3"), 3, print, False)
    assert first == (45.0, os.path.join("stage1", "reference", "retrain", "model.ckpt-2"))
    assert trained == [
        ("given.ckpt", os.path.join("stage1", "reference"), 1, "reference"),
        (os.path.join(str(tmp_path), first[1]), os.path.join("stage2", "reference"), 2,
         "reference")]
    assert second[1] == os.path.join("stage2", "reference", "retrain", "model.ckpt-2")
    assert given == (40.0, None)


@pytest.mark.slow
def test_run_directory_is_consistent(runs, workspace):
    from netcompress.formats.checkpoint_paths import resolve_checkpoint
    from netcompress.jobs.prune import verify_checkpoint

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
        assert row["resource_percent"] == pytest.approx(
            100.0 * row["parameters"] / rows[0]["parameters"])
        parameters.append(row["parameters"])
        if row["stage"]:
            try_dir = f"try{row['tries']}"
            for name in ("rank.npz", "tries.json", "eval.txt", f"{try_dir}/prune.txt",
                         f"{try_dir}/val.txt", f"{try_dir}/pruned/model_def.json",
                         f"{try_dir}/retrain/checkpoint"):
                assert (run_dir / f"stage{row['stage']}" / name).is_file(), name
            assert row["candidates"] > 0 and row["candidates_per_s"] > 0
    assert parameters == sorted(parameters, reverse=True) and len(set(parameters)) == 3
    _check_table(run_dir, rows)
    log = runs["second"][0]
    assert any(line.lstrip().startswith("stage  parameters") for line in log)


def _check_table(run_dir, rows, latency=True):
    with open(run_dir / "stages.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    final = run_dir / "final" / "final.json"
    if final.is_file():  # the last line: the last stage's model after its final retraining
        last = table.pop()
        assert last["stage"] == "final"
        assert {key: last[key] for key in ("parameters", "gmacs", "latency_ms")} == \
            {key: table[-1][key] for key in ("parameters", "gmacs", "latency_ms")}
        assert float(last["test_miou"]) == round(json.loads(final.read_text())["test_miou"], 2)
    assert [int(r["stage"]) for r in table] == [row["stage"] for row in rows]
    for row, line in zip(rows, table):
        evaluated = (run_dir / f"stage{row['stage']}" / "eval.txt").read_text()
        miou = evaluated.strip().splitlines()[-1]
        assert miou.startswith("mIoU: ") and float(line["test_miou"]) == float(miou[6:])
        assert int(line["parameters"]) == row["parameters"]
        assert latency is False or float(line["latency_ms"]) > 0
        assert float(line["miou_change"]) == pytest.approx(
            float(line["test_miou"]) - float(table[0]["test_miou"]), abs=0.011)
    assert (run_dir / "compression.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_budget_rule_stays_available(runs, workspace):
    budget_dir = runs["budget_dir"]
    rows = _rows(budget_dir)
    assert [row["stage"] for row in rows] == [0, 1]
    row = rows[1]
    assert row["tries"] == 1 and row["thresholds"] and row["allocation"] == "thresholds"
    assert row["val_miou_retrained"] == 49.5 and row["parameters"] < rows[0]["parameters"]
    search = json.loads((budget_dir / "stage1" / "search.json").read_text())
    assert search["evaluations"] == row["candidates"] > 0
    for name in ("rank.npz", "prune.txt", "val.txt", "eval.txt", "pruned/model_def.json",
                 "retrain/checkpoint"):
        assert (budget_dir / "stage1" / name).is_file(), name
    _check_table(budget_dir, rows, latency=False)


@pytest.mark.slow
def test_budget_rule_prunes_the_streams(runs, workspace):
    """With `streams: true` the stage narrows residual streams end to end: the
    written model_def has them narrower, their conv3s follow without a mask,
    the stage checkpoint restores against model_def + mask, and the table's
    parameters and MACs fall."""
    from models.architecture import adapnet_pp, resolve_widths
    from netcompress.formats.checkpoint_paths import resolve_checkpoint
    from netcompress.jobs.prune import verify_checkpoint

    budget_dir = runs["budget_dir"]
    given, row = _rows(budget_dir)
    config = load_config(workspace["config"], "compress", [f"run_dir={budget_dir}"])
    model_def, mask, checkpoint = staged._stage_model(config, row)
    architecture = adapnet_pp()
    before = resolve_widths(load_model_def(config["model_def"]), NUM_CLASSES, architecture)
    definition = load_model_def(model_def)
    after = resolve_widths(definition, NUM_CLASSES, architecture)
    streams = [group.name for group in architecture.stream_groups()]
    narrower = [name for name in streams if after[name] < before[name]]
    print("stream widths:", {name: (before[name], after[name]) for name in streams})
    assert "block1/residual" in narrower and after["block1/residual"] == 1
    search = json.loads((budget_dir / "stage1" / "search.json").read_text())
    assert search["thresholds"]["block1"] == 1.0
    removed = search["removed"]
    assert set(narrower) <= set(removed)
    masks = load_masks(mask)
    assert not [unit for unit in masks if unit.startswith("block1/")]  # width 1: no mask
    for name in narrower:  # every conv3 of the block writes the narrower stream
        for unit in architecture.stream_units(name):
            conv3 = definition["params"][unit.key][2]
            if unit.name in masks:  # only a conv3 cut on its own needs a mask
                assert f"{unit.scope}/conv3" in removed
                assert masks[unit.name][1] == after[name] > conv3 == len(masks[unit.name][0])
            else:
                assert conv3 == after[name]
    verify_checkpoint(resolve_checkpoint(checkpoint), definition, masks, NUM_CLASSES,
                      HEIGHT, WIDTH, "stage 1")
    with open(budget_dir / "stages.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert int(table[1]["parameters"]) == row["parameters"] < given["parameters"]
    assert float(table[1]["gmacs"]) < float(table[0]["gmacs"])
    assert row["macs"] < given["macs"]


@pytest.mark.slow
def test_search_never_reads_the_test_records(runs, workspace):
    test = os.path.realpath(workspace["files"]["test"])
    val = os.path.realpath(workspace["files"]["val"])
    reads = runs["first"][1] + runs["second"][1] + runs["budget"][1]
    assert {step for step, path in reads if path == test} == {"evaluate"}
    assert {path for step, path in reads if step == "search"} == {val}
    assert {step for step, path in reads if path == val} == {"search", "validate"}


@pytest.mark.slow
def test_test_records_are_read_after_the_stage_is_decided(runs):
    """Each stage's test evaluation comes after every validation of its
    tries, and nothing of the stage runs after it."""
    for run in ("first", "second", "budget"):
        events = runs[run][2]
        for position, (what, directory, *_) in enumerate(events):
            stage = directory.split(os.sep)[0]
            later = [event[1].split(os.sep)[0] for event in events[position + 1:]]
            if what == "evaluate":
                assert stage not in later, (run, events)
        evaluated = [event[1] for event in events if event[0] == "evaluate"]
        if evaluated[-1] == "final":  # the final retraining's test comes last of all
            assert events[-1] == ("evaluate", "final")
            evaluated.pop()
        assert evaluated == sorted(set(evaluated)) and evaluated


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(runs, workspace):
    for change in ("budget=2", "tolerance=2", "stage_rule=budget_before_retraining"):
        config = load_config(workspace["config"], "compress", [change])
        with pytest.raises(UserError, match=change.split("=")[0]):
            staged.check(config)
    # The inputs' contents are recorded, and unchanged they pass.
    config = load_config(workspace["config"], "compress")
    recorded = json.loads((runs["run_dir"] / "run.json").read_text())["inputs"]
    assert recorded == staged.check_contents(config)
    assert recorded["test_data"]["sha256"] == hashlib.sha256(
        open(workspace["files"]["test"], "rb").read()).hexdigest()
    assert recorded["mask"] is None and recorded["checkpoint"]["path"] == workspace["checkpoint"]
    assert f"test_data: {workspace['files']['test']} (sha256 " \
           f"{recorded['test_data']['sha256'][:12]})" in runs["second"][0]


def test_rerun_after_an_input_changed_is_refused(workspace, tmp_path):
    """run.json records what the inputs held; a rerun whose test records now
    hold other examples (same path) is refused naming them, the same bytes
    rewritten are not a change, and a run.json without digests warns."""
    files = {key: str(tmp_path / os.path.basename(workspace["files"][key]))
             for key in ("train", "val", "test")}
    for key, path in files.items():
        shutil.copy(workspace["files"][key], path)
    config = load_config(workspace["config"], "compress", [
        f"run_dir={tmp_path / 'run'}", f"train_data={files['train']}",
        f"val_data={files['val']}", f"test_data={files['test']}"])
    staged.check(config)
    inputs = staged.check_contents(config)
    assert inputs["test_data"]["sha256"] == hashlib.sha256(
        open(files["test"], "rb").read()).hexdigest()
    staged.record_run(config, inputs)
    shutil.copy(workspace["files"]["test"], files["test"])  # the same bytes again
    assert staged.check_contents(config) == inputs
    shutil.copy(workspace["files"]["val"], files["test"])  # other examples, same path
    with pytest.raises(UserError, match=rf"holds a run whose test_data had other content "
                                        rf"\({files['test']}, sha256 "
                                        rf"{inputs['test_data']['sha256'][:12]}; now"):
        staged.check_contents(config)
    run_file = tmp_path / "run" / "run.json"
    run_file.write_text(json.dumps(staged.run_identity(config)))
    logged = []
    staged.check_contents(config, log=logged.append)
    assert logged == [f"warning: {run_file} records no input digests (written before they "
                      f"were recorded): not checked that the inputs still hold what its "
                      f"stages read"]


@pytest.mark.slow
def test_direct_try_reaches_a_latency_target_only_the_streams_reach(workspace):
    """direct_iterations: stage 1's first try removes the whole way to the
    target in one step, retrained its own 3 steps and, within the
    tolerance, is the stage. The target, 17 % of the given latency (a
    stand-in: latency as MACs), is below the 20.7 % of the MACs the convs
    alone can reach on this model (13.2 % with the streams): the convs'
    candidates cannot meet the step and do not compete, and the stage
    narrows the residual streams. The run stops at the target with nothing
    left for a final retraining."""
    from models.architecture import adapnet_pp, resolve_widths

    run_dir = workspace["root"] / "direct"
    logged = []

    def latency_as_macs(config, rows, model, parameters, macs, log, progress):
        logged.append(macs)
        return 100.0 * macs / rows[0]["macs"]

    with mock.patch.object(staged, "measure_latency", lambda *args, **kwargs: {}), \
            mock.patch.object(staged, "_resource_percent", latency_as_macs):
        log, _, events = _run(workspace, "--run_dir", str(run_dir), "--target", "latency",
                              "--target_percent", "17", "--direct_iterations", "3",
                              "--stages", "3", failing=())
    rows = _rows(run_dir)
    assert len(rows) == 2
    row = rows[1]
    assert row["direct"] and row["iterations"] == 3 and row["tries"] == 1
    assert row["step_pct"] == 83.0 and row["resource_percent"] <= 17.0
    assert logged == [row["macs"]] and row["macs"] <= 0.17 * rows[0]["macs"]
    assert row["allocation"].endswith("+streams") and not row["failed_tries"]
    assert any(line.startswith("cannot meet the step: global, global_per_cost, per_layer")
               for line in log)
    architecture = adapnet_pp()
    config = load_config(workspace["config"], "compress", [f"run_dir={run_dir}"])
    before = resolve_widths(load_model_def(config["model_def"]), NUM_CLASSES, architecture)
    after = resolve_widths(load_model_def(staged._stage_model(config, row)[0]), NUM_CLASSES,
                           architecture)
    assert any(after[group.name] < before[group.name]
               for group in architecture.stream_groups())
    assert row["checkpoint"] == os.path.join("stage1", "try1", "retrain", "model.ckpt-3")
    assert row["reference"] == 50.0  # reference: given, as for the steps
    tries = json.loads((run_dir / "stage1" / "tries.json").read_text())
    assert tries["direct"]["floor"] == 49.0 and "floor" not in tries  # no step was tried
    assert [event[1] for event in events if event[0] == "retrain"] == \
        [os.path.join("stage1", "try1")]
    assert any(line.startswith("stopped: latency at") for line in log)
    assert any(line.split()[:1] == ["1"] and "direct step 83 (3 steps)" in line
               for line in log)
    assert not (run_dir / "final").exists()


def test_latency_target_is_measured_against_the_given_model(workspace):
    """A latency target's percentage: the model against the given one, timed
    in one process (here the given model against itself)."""
    config = load_config(workspace["config"], "compress", ["target=latency"])
    logged = []
    percent = staged._resource_percent(config, [{"parameters": 1, "macs": 1}],
                                       staged._given_model(config), 1, 1, logged.append,
                                       False)
    assert 25 < percent < 400 and logged[0].startswith("latency ")


def test_bad_inputs_are_one_line_errors(workspace, tmp_path):
    files = workspace["files"]
    for change, message in (("target_percent=100", "target_percent"),
                            ("min_step_percent=40", "min_step_percent")):
        config = load_config(workspace["config"], "compress",
                             [change, f"run_dir={tmp_path / 'r'}"])
        with pytest.raises(UserError, match=message):
            staged.check(config)
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
