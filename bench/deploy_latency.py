"""Inference latency of the deployed forms: session graph vs SavedModel vs
TFLite (and ONNX), unpruned and pruned.

    python bench/deploy_latency.py [--model_def models/default.json] \
        [--height 192 --width 384 --batch 1 --runs 7 --fraction 0.5] [--onnx]

Three models, as bench/pruned_latency.py makes them: the model_def itself,
a variant with about --fraction of every prunable layer's channels removed,
residual conv3s included (so its graph holds residual masks), and the
"streams" variant: every prunable layer but the conv3s and every block's
residual stream lose about --fraction (no masks; docs/design.md, "Residual
streams"); --no_streams leaves it out. Each is
exported as export.py does (netcompress/jobs/export.py: serving graph, uint8 BGR
in, class map and probabilities out) and every form is timed in one
process, interleaved run by run so that machine noise hits them alike,
with the same thread count. Random weights and inputs (values do not change
the time). Prints the median latency of each and the ratios to the session
graph and to the unpruned model.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.runtime import graph_mode  # noqa: E402


def exported_forms(model_def, masks, num_classes, height, width, directory, threads, onnx,
                   fold_masks=True):
    """[(form name, run(images) callable)] of one model: session graph,
    SavedModel, TFLite and optionally ONNX, all from one random-weight session.
    ``fold_masks``: as serving.ServingGraph's."""
    import tensorflow as tf

    from models.model_def import save_masks, save_model_def
    from netcompress.formats.description import files_model
    from netcompress.jobs import export
    from netcompress.graphs import serving

    os.makedirs(directory)
    model_def_path = os.path.join(directory, "model_def.json")
    save_model_def(model_def, model_def_path)
    mask_path = None
    if masks:
        mask_path = os.path.join(directory, "mask.npy")
        save_masks(masks, mask_path)
    config = dict(model="AdapNet_pp", model_def=model_def_path, mask=mask_path,
                  num_classes=num_classes, height=height, width=width, atrous_path="auto",
                  # Random weights, no checkpoint: the model is the files'.
                  checkpoint_model=files_model(model_def_path, mask_path, num_classes))
    graph = serving.ServingGraph(config, fold_masks=fold_masks)
    with graph.graph.as_default():
        initializer = tf.compat.v1.variables_initializer(graph.variables)
    session_config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads,
                                              inter_op_parallelism_threads=threads)
    session = tf.compat.v1.Session(graph=graph.graph, config=session_config)
    session.run(initializer)
    saved_model = export.write_saved_model(graph, session,
                                           os.path.join(directory, export.SAVED_MODEL))
    tflite = os.path.join(directory, export.TFLITE)
    with open(tflite, "wb") as f:
        f.write(export.convert_tflite(saved_model))

    def session_run(images):
        return session.run([graph.class_map, graph.probabilities], {graph.images: images})
    forms = [("session graph", session_run),
             ("SavedModel", export.SavedModelRunner(saved_model, threads)),
             ("TFLite", export.TFLiteRunner(tflite, threads))]
    if onnx:
        path = os.path.join(directory, export.ONNX)
        with open(path, "wb") as f:
            f.write(export.convert_onnx(export.frozen_graph_def(graph, session)))
        forms.append(("ONNX", export.OnnxRunner(path, threads)))
    return forms


def main():
    from pruned_latency import add_timing_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser)
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="share of each prunable layer's channels removed in the pruned model")
    parser.add_argument("--round_to", type=int, default=8,
                        help="kept channel counts rounded up to a multiple of this")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads of every runtime (0 = all cores)")
    parser.add_argument("--onnx", action="store_true", help="time ONNX Runtime too")
    parser.add_argument("--no_streams", action="store_true",
                        help="leave out the variant with pruned residual streams")
    args = parser.parse_args()
    graph_mode()
    import numpy as np

    from models.model_def import load_model_def
    from netcompress.pruning_math.costs import inference_macs, total_parameters
    from pruned_latency import variant_plans

    threads = args.threads or os.cpu_count()
    model_def = load_model_def(args.model_def)
    # unpruned, masked conv3s, and (unless --no_streams) the stream variant.
    plans = [plan for plan in variant_plans(model_def, args.num_classes, [args.fraction],
                                            args.round_to, streams=not args.no_streams)
             if not plan[0].endswith("conv3 kept")]
    shape = [args.batch, args.height, args.width, 3]
    images = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
    runs = []  # (model, masks count, params, GMACs, form, run)
    with tempfile.TemporaryDirectory(prefix="deploy_latency-") as root:
        for index, (name, variant_def, masks) in enumerate(plans):
            print(f"exporting {name} ...", flush=True)
            forms = exported_forms(variant_def, masks, args.num_classes, args.height,
                                   args.width, os.path.join(root, str(index)), threads,
                                   args.onnx)
            params = total_parameters(variant_def, args.num_classes)
            macs = inference_macs(variant_def, args.num_classes, args.height, args.width,
                                  masks)
            for form, run in forms:
                for _ in range(args.warmup):
                    run(images)
                runs.append((name, len(masks), params, macs, form, run))
        times = [[] for _ in runs]
        for _ in range(args.runs):
            for index, entry in enumerate(runs):
                start = time.perf_counter()
                entry[-1](images)
                times[index].append(time.perf_counter() - start)

    print(f"\n{args.model_def}, {args.num_classes} classes, input {args.batch}x{args.height}x"
          f"{args.width} uint8, {threads} threads, {args.runs} timed runs each (median)")
    print(f"{'model':<16} {'params':>11} {'GMACs':>7} {'masks':>5} {'form':<14} {'ms':>9} "
          f"{'vs session':>10} {'vs unpruned':>11}")
    medians = {(entry[0], entry[4]): float(np.median(t)) for entry, t in zip(runs, times)}
    unpruned = plans[0][0]
    for name, masks, params, macs, form, _ in runs:
        latency = medians[(name, form)]
        print(f"{name:<16} {params:>11,} {macs / 1e9:>7.2f} {masks:>5} {form:<14} "
              f"{1e3 * latency:>9.1f} {latency / medians[(name, 'session graph')]:>10.3f} "
              f"{latency / medians[(unpruned, form)]:>11.3f}")


if __name__ == "__main__":
    main()
