"""Does pruning buy latency? FLOPs vs measured CPU inference time.

    python bench/pruned_latency.py [--model_def models/default.json] \
        [--height 192 --width 384 --batch 1 --runs 7 --fractions 0.25 0.5 0.75] \
        [--no_tflite]

Variants of one model_def: the model itself, and for each fraction f every
prunable layer with about f of its channels removed (kept counts rounded up
to --round_to), residual conv3s included (so residual masks are in the
graph: a masked conv3 runs with its kernel widened to the residual width).
For the largest fraction one more variant leaves the residual conv3s alone
(no masks), to show what the masks cost. Then, per fraction, the "streams"
variant: every prunable layer but the conv3s and every block's residual
stream lose about f of their channels (a conv3 follows its stream: no
masks; docs/design.md, "Residual streams"). The unpruned model and the
stream variants are also exported to TFLite (as export.py does: uint8 in,
class map and probabilities out) and timed the same way.

All variants are built and timed in one process, interleaved run by run so
that machine noise hits them alike; random weights and inputs (values do not
change the time). Prints each variant's parameters, inference GMACs,
median latency, the ratios to the unpruned model and
    efficiency = latency reduction / FLOPs reduction  (target >= 0.9, docs/deploy.md).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.runtime import graph_mode, quiet_tensorflow  # noqa: E402

TARGET_EFFICIENCY = 0.9


def variant_plans(model_def, num_classes, fractions, round_to, seed=0, streams=False):
    """(name, model_def, masks) per variant, pruned through the pruning library;
    ``streams``: the stream variants at the end."""
    import numpy as np

    from models.architecture import adapnet_pp, resolve_widths
    from netcompress.jobs.prune import plan_pruning

    architecture = adapnet_pp()
    groups = architecture.prunable_groups()
    widths = resolve_widths(model_def, num_classes, architecture)
    rng = np.random.default_rng(seed)
    # Scores (rank + 1) / width: threshold f + epsilon removes about f of the channels.
    scores = {g.name: (rng.permutation(widths[g.name]) + 1.0) / widths[g.name] for g in groups}
    variants = [("unpruned", model_def, {})]
    for fraction in fractions:
        plan = plan_pruning(model_def, {}, num_classes, scores, [g.name for g in groups],
                            fraction + 1e-9, round_to=round_to)
        variants.append((f"{fraction:.0%} removed", plan.model_def_after, plan.masks_after))
    if fractions:
        fraction = max(fractions)
        no_residual = [g.name for g in groups if not g.through_mask]
        plan = plan_pruning(model_def, {}, num_classes, scores, no_residual,
                            fraction + 1e-9, round_to=round_to)
        variants.append((f"{fraction:.0%}, conv3 kept", plan.model_def_after,
                         plan.masks_after))
    if streams:
        stream_groups = architecture.stream_groups()
        scores.update({g.name: (rng.permutation(widths[g.name]) + 1.0) / widths[g.name]
                       for g in stream_groups})
        layers = [g.name for g in architecture.prunable_groups(streams=True)
                  if not g.through_mask]
        for fraction in fractions:
            plan = plan_pruning(model_def, {}, num_classes, scores, layers,
                                fraction + 1e-9, round_to=round_to)
            variants.append((f"{fraction:.0%}, streams", plan.model_def_after,
                             plan.masks_after))
    return variants


class InferenceSession:
    def __init__(self, model_def, masks, num_classes, shape, threads):
        import tensorflow as tf

        from models.AdapNet_pp import AdapNet_pp

        tf1 = tf.compat.v1
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.images = tf1.placeholder(tf.float32, shape)
            outputs = AdapNet_pp(model_def, num_classes, masks).build(self.images)
            self.probabilities = outputs.probabilities
            initializer = tf1.global_variables_initializer()
        config = tf1.ConfigProto(intra_op_parallelism_threads=threads,
                                 inter_op_parallelism_threads=threads)
        self.session = tf1.Session(graph=self.graph, config=config)
        self.session.run(initializer)

    def run(self, images):
        start = time.perf_counter()
        self.session.run(self.probabilities, {self.images: images})
        return time.perf_counter() - start


def tflite_runs(variants, args, root):
    """(name, model_def, masks, 'tflite', run, uint8 images) of the unpruned
    model and the stream variants, exported as bench/deploy_latency.py does."""
    import numpy as np

    from deploy_latency import exported_forms

    threads = args.threads or os.cpu_count()
    shape = [args.batch, args.height, args.width, 3]
    images = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    runs = []
    for index, (name, variant_def, masks) in enumerate(variants):
        if name != "unpruned" and not name.endswith("streams"):
            continue
        print(f"exporting {name} to TFLite ...", flush=True)
        forms = dict(exported_forms(variant_def, masks, args.num_classes, args.height,
                                    args.width, os.path.join(root, str(index)), threads,
                                    onnx=False))
        runs.append((name, variant_def, masks, "tflite", forms["TFLite"], images))
    return runs


def add_timing_arguments(parser):
    """Model, input size and timing runs (shared with bench/deploy_latency.py)."""
    parser.add_argument("--model_def", default="models/default.json")
    parser.add_argument("--num_classes", type=int, default=12)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser)
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    parser.add_argument("--no_tflite", action="store_true",
                        help="time only the session graphs (no TFLite export)")
    parser.add_argument("--round_to", type=int, default=8,
                        help="kept channel counts rounded up to a multiple of this")
    parser.add_argument("--threads", type=int, default=0, help="TF threads (0 = all cores)")
    args = parser.parse_args()
    quiet_tensorflow()
    graph_mode()
    import numpy as np

    from models.model_def import load_model_def
    from netcompress.pruning_math.costs import inference_macs, total_parameters

    model_def = load_model_def(args.model_def)
    variants = variant_plans(model_def, args.num_classes, args.fractions, args.round_to,
                             streams=True)
    shape = [args.batch, args.height, args.width, 3]
    images = np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32)
    sessions = []
    for name, variant_def, masks in variants:
        print(f"building {name} ...", flush=True)
        session = InferenceSession(variant_def, masks, args.num_classes, shape, args.threads)
        sessions.append((name, variant_def, masks, "session", session.run, images))
    with tempfile.TemporaryDirectory(prefix="pruned_latency-") as root:
        if not args.no_tflite:
            sessions += tflite_runs(variants, args, root)
        for entry in sessions:
            for _ in range(args.warmup):
                entry[4](entry[5])
        times = [[] for _ in sessions]
        for _ in range(args.runs):
            for index, entry in enumerate(sessions):
                start = time.perf_counter()
                entry[4](entry[5])
                times[index].append(time.perf_counter() - start)

    print(f"\n{args.model_def}, input {args.batch}x{args.height}x{args.width}, "
          f"{args.runs} timed runs each (median), kept counts rounded to {args.round_to}")
    header = (f"{'variant':<22} {'form':<8} {'params':>11} {'GMACs':>8} {'masks':>5} "
              f"{'ms':>9} {'FLOPs ratio':>11} {'time ratio':>10} {'efficiency':>10}")
    print(header)
    base_macs = inference_macs(model_def, args.num_classes, args.height, args.width)
    base_time = {entry[3]: float(np.median(measured))
                 for entry, measured in zip(sessions, times) if entry[0] == "unpruned"}
    for (name, variant_def, masks, form, _, _), measured in zip(sessions, times):
        macs = inference_macs(variant_def, args.num_classes, args.height, args.width, masks)
        latency = float(np.median(measured))
        flops_ratio, time_ratio = macs / base_macs, latency / base_time[form]
        efficiency = (1 - time_ratio) / (1 - flops_ratio) if flops_ratio < 1 else float("nan")
        verdict = "" if flops_ratio >= 1 else (
            " ok" if efficiency >= TARGET_EFFICIENCY else " BELOW TARGET")
        print(f"{name:<22} {form:<8} {total_parameters(variant_def, args.num_classes):>11,} "
              f"{macs / 1e9:>8.2f} {len(masks):>5} {1e3 * latency:>9.1f} {flops_ratio:>11.3f} "
              f"{time_ratio:>10.3f} {efficiency:>10.2f}{verdict}")
    print(f"efficiency = (1 - time ratio) / (1 - FLOPs ratio); target >= {TARGET_EFFICIENCY}")


if __name__ == "__main__":
    main()
