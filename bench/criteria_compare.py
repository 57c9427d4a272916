"""Criteria on equal terms: the same stages with every criterion.

    python bench/criteria_compare.py -c config/compress.config [--fraction 0.2] \
        [--rounds 1] [--criteria taylor_out taylor reference l1 random] [--out DIR]

Settings come from a compress.py config (model, data, retrain_iterations,
learning_rate, seed, ...; `stages` and the search settings are not used).
Each stage removes the same fraction of every prunable layer's channels
(the lowest-scoring ones by the criterion; at least one stays), so every
criterion reaches the same parameter count; then it retrains
retrain_iterations steps (same seed for every criterion). Stage 1 ranks the
given model once for all criteria; a later stage ranks each criterion's own
retrained model. Printed per criterion and stage: parameters, validation
mIoU after pruning (no retraining) and after retraining, and test mIoU
after retraining. Files go to --out (default: run_dir + '-criteria'), which
must be new or empty.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import UserError  # noqa: E402
from netcompress.settings.cli import run_main, run_script  # noqa: E402
from netcompress.pruning_math.criteria import CRITERIA  # noqa: E402

DESCRIPTION = ("Remove the same fraction of every prunable layer by each criterion, "
               "retrain, and compare validation and test mIoU (settings from a compress.py "
               "config).")


def add_arguments(parser):
    parser.add_argument("--fraction", type=float, default=0.2,
                        help="fraction of every prunable layer removed per stage")
    parser.add_argument("--rounds", type=int, default=1,
                        help="prune-retrain stages per criterion (the config's `stages` "
                             "is not used)")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA),
                        choices=list(CRITERIA), help="criteria to compare (default: all)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: run_dir + '-criteria')")


def _check(config, args):
    from netcompress.jobs.compress import check_inputs

    check_inputs(config)
    if not 0 < args.fraction < 1:
        raise UserError(f"--fraction must be between 0 and 1, got {args.fraction}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {args.rounds}")
    out = args.out or config["run_dir"].rstrip("/") + "-criteria"
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out!r} exists and is not an empty directory")
    return out


def _miou(matrix):
    import numpy as np

    return 100.0 * float(np.nan_to_num(matrix.mean_iou()))


def _gated_mious(config, model, data, removals):
    """Validation mIoU of ``model`` with each removal gated ({layer: indices})."""
    import tensorflow as tf

    from netcompress.graphs.inference import GatedGraph

    gated = GatedGraph(model, data)
    with tf.compat.v1.Session(graph=gated.graph) as session:
        gated.restore(session, model["checkpoint"], model["model_def"])
        return [_miou(gated.evaluate(session, removed, config["num_classes"])[0])
                for removed in removals]


def _prune(config, model, rank_path, removed, directory):
    """Remove exactly ``removed`` through pruning.execute; the pruned model."""
    from models.model_def import load_masks, load_model_def
    from netcompress.pruning_math.plan import plan_removal
    from netcompress.jobs.compress import prune_settings
    from netcompress.jobs.prune import PruneJob, execute

    model_def = load_model_def(model["model_def"])
    masks = load_masks(model["mask"])
    plan = plan_removal(model_def, masks, config["num_classes"], removed)
    settings = prune_settings(config, model, rank_path, directory)
    execute(PruneJob(settings, model_def, masks, list(removed), plan=plan),
            log=lambda line: None)
    return dict(model, model_def=settings.new_model_def,
                mask=settings.mask_save if plan.masks_after else None,
                checkpoint=settings.new_checkpoint_save)


def _work(config, args, out):
    from models.model_def import load_model_def
    from netcompress.jobs import compress as staged
    from netcompress.formats.checkpoint_paths import resolve_checkpoint
    from netcompress.jobs.compare import lowest
    from netcompress.pruning_math.costs import total_parameters
    from netcompress.jobs.evaluate import evaluate
    from netcompress.jobs.rank import rank
    from netcompress.jobs.train import train

    def test_miou(model, data):
        return _miou(evaluate(dict(model, test_data=data), log=lambda line: None))

    def retrain(model, directory, stage):
        result = train(staged.retrain_config(config, model, directory),
                       log=lambda line: None,
                       seed=None if config["seed"] is None else config["seed"] + stage)
        return dict(model, checkpoint=result["checkpoint"])

    start = staged.model_config(config, config["model_def"], config["mask"],
                                resolve_checkpoint(config["checkpoint"]))
    base_val = _gated_mious(config, start, config["val_data"], [{}])[0]
    base_test = test_miou(start, config["test_data"])
    parameters = total_parameters(load_model_def(config["model_def"]), config["num_classes"])
    print(f"unpruned: {parameters} parameters, validation mIoU {base_val:.2f}, "
          f"test mIoU {base_test:.2f}")
    models = {criterion: start for criterion in args.criteria}
    shared_rank = None
    results = []  # (stage, criterion, parameters, val pruned, val retrained, test)
    for stage in range(1, args.rounds + 1):
        for criterion in args.criteria:
            model = models[criterion]
            directory = os.path.join(out, f"stage{stage}", criterion)
            os.makedirs(directory, exist_ok=True)
            rank_path = os.path.join(out, "stage1", "rank.npz") if stage == 1 \
                else os.path.join(directory, "rank.npz")
            if stage > 1 or shared_rank is None:
                sums = rank(dict(model, test_data=config["train_data"]))
                sums.save(rank_path)
                if stage == 1:
                    shared_rank = sums
            else:
                sums = shared_rank
            scores = sums.scores(criterion)
            removed = {layer: lowest(scores[layer], args.fraction) for layer in sums.layers}
            removed = {layer: indices for layer, indices in removed.items() if len(indices)}
            pruned_val = _gated_mious(config, model, config["val_data"], [removed])[0]
            pruned = _prune(config, model, rank_path, removed, directory)
            retrained = retrain(pruned, directory, stage)
            models[criterion] = retrained
            val = test_miou(retrained, config["val_data"])
            test = test_miou(retrained, config["test_data"])
            count = total_parameters(load_model_def(pruned["model_def"]),
                                     config["num_classes"])
            results.append((stage, criterion, count, pruned_val, val, test))
            print(f"stage {stage} {criterion}: {count} parameters, validation mIoU "
                  f"{pruned_val:.2f} pruned -> {val:.2f} retrained, test {test:.2f}")
    print()
    print(f"removing {100 * args.fraction:g} % of every prunable layer per stage, "
          f"{config['retrain_iterations']} retraining steps; unpruned: {parameters} "
          f"parameters, validation {base_val:.2f}, test {base_test:.2f}")
    print(f"{'stage':>5} {'criterion':<11} {'parameters':>10} {'val pruned':>10} "
          f"{'val retrained':>13} {'test retrained':>14}")
    for stage, criterion, count, pruned_val, val, test in results:
        print(f"{stage:>5} {criterion:<11} {count:>10} {pruned_val:>10.2f} {val:>13.2f} "
              f"{test:>14.2f}")


def main(argv=None):
    return run_script(argv, "compress", DESCRIPTION, _work, add_arguments=add_arguments,
                      check=_check)


if __name__ == "__main__":
    sys.exit(run_main(main))
