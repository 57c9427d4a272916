"""Do residual masks cost inference time? Masked model vs the unmasked model
of the same MACs, with the masked kernels widened on every run (before) and
folded at restore (now).

    python bench/mask_folding.py [--model_def models/default.json] \
        [--height 192 --width 384 --batch 1 --runs 7 --fraction 0.75] [--tflite]

Three models from one model_def, each with about --fraction of every
prunable layer's channels removed (random scores, as in
bench/pruned_latency.py):
- unmasked: the residual conv3s left whole (no masks);
- masked, per run: the residual conv3s pruned too (masks), their narrow
  kernels widened to the residual width on every run, as the training graph
  does (and as the serving graph did before folding);
- masked, folded: the same model as the serving graph builds it now
  (ServingGraph(fold_masks=True)): the widened kernels are variables,
  filled once at restore.
A masked conv3 runs at the residual width, so the three have the same MACs;
the masked ones have fewer parameters. Each is exported as export.py does
(bench/deploy_latency.py: uint8 BGR in, class map and probabilities out) and
timed as the session graph (predict.py, evaluate.py) and the SavedModel
(and TFLite with --tflite), interleaved run by run in one process so that
machine noise hits them alike (each round in another order). Random
weights and inputs. Prints the median latency of each and its ratio to the
unmasked model in the same form.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.runtime import graph_mode, quiet_tensorflow  # noqa: E402


def mask_variants(model_def, num_classes, fraction, round_to, seed=0):
    """[(name, model_def, masks, fold_masks)]: unmasked, masked per run,
    masked folded; pruned through the pruning library with random scores."""
    import numpy as np

    from models.architecture import adapnet_pp, resolve_widths
    from netcompress.jobs.prune import plan_pruning

    groups = adapnet_pp().prunable_groups()
    widths = resolve_widths(model_def, num_classes, adapnet_pp())
    rng = np.random.default_rng(seed)
    # Scores (rank + 1) / width: threshold f + epsilon removes about f of the channels.
    scores = {g.name: (rng.permutation(widths[g.name]) + 1.0) / widths[g.name] for g in groups}
    unmasked = [g.name for g in groups if not g.through_mask]
    plans = [plan_pruning(model_def, {}, num_classes, scores, layers, fraction + 1e-9,
                          round_to=round_to)
             for layers in (unmasked, unmasked + [g.name for g in groups if g.through_mask])]
    assert plans[1].masks_after and not plans[0].masks_after
    return [("unmasked", plans[0].model_def_after, {}, True),
            ("masked, per run", plans[1].model_def_after, plans[1].masks_after, False),
            ("masked, folded", plans[1].model_def_after, plans[1].masks_after, True)]


def main():
    from pruned_latency import add_timing_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser)
    parser.add_argument("--fraction", type=float, default=0.75,
                        help="share of each prunable layer's channels removed")
    parser.add_argument("--round_to", type=int, default=8,
                        help="kept channel counts rounded up to a multiple of this")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of every runtime (0 = all cores)")
    parser.add_argument("--tflite", action="store_true", help="time TFLite too")
    args = parser.parse_args()
    quiet_tensorflow()
    graph_mode()
    import numpy as np

    from deploy_latency import exported_forms
    from models.model_def import load_model_def
    from netcompress.pruning_math.costs import inference_macs, total_parameters

    threads = args.threads or os.cpu_count()
    model_def = load_model_def(args.model_def)
    variants = mask_variants(model_def, args.num_classes, args.fraction, args.round_to)
    shape = [args.batch, args.height, args.width, 3]
    images = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    forms = ("session graph", "SavedModel") + (("TFLite",) if args.tflite else ())
    runs = []  # (variant, masks, params, MACs, form, run)
    with tempfile.TemporaryDirectory(prefix="mask_folding-") as root:
        for index, (name, variant_def, masks, fold) in enumerate(variants):
            print(f"exporting {name} ...", flush=True)
            exported = exported_forms(variant_def, masks, args.num_classes, args.height,
                                      args.width, os.path.join(root, str(index)), threads,
                                      onnx=False, fold_masks=fold)
            params = total_parameters(variant_def, args.num_classes)
            macs = inference_macs(variant_def, args.num_classes, args.height, args.width,
                                  masks)
            for form, run in exported:
                if form not in forms:
                    continue
                for _ in range(args.warmup):
                    run(images)
                runs.append((name, len(masks), params, macs, form, run))
        times = [[] for _ in runs]
        for round_index in range(args.runs):
            # Each round starts at another entry: no form always follows the same one.
            for offset in range(len(runs)):
                index = (round_index + offset) % len(runs)
                start = time.perf_counter()
                runs[index][-1](images)
                times[index].append(time.perf_counter() - start)

    print(f"\n{args.model_def}, {args.num_classes} classes, input {args.batch}x{args.height}x"
          f"{args.width} uint8, about {args.fraction:.0%} of every prunable layer removed, "
          f"{threads} threads, {args.runs} timed runs each (median)")
    print(f"{'model':<16} {'params':>11} {'GMACs':>7} {'masks':>5} {'form':<14} {'ms':>9} "
          f"{'vs unmasked':>11}")
    medians = {(entry[0], entry[4]): float(np.median(t)) for entry, t in zip(runs, times)}
    for name, masks, params, macs, form, _ in sorted(runs, key=lambda e: forms.index(e[4])):
        latency = medians[(name, form)]
        print(f"{name:<16} {params:>11,} {macs / 1e9:>7.3f} {masks:>5} {form:<14} "
              f"{1e3 * latency:>9.2f} {latency / medians[('unmasked', form)]:>11.3f}")


if __name__ == "__main__":
    main()
