"""Images/s of each atrous-conv path, with oneDNN off and on, in one run.

    python bench/atrous_paths.py [--steps 5] [--full 384x768x1] [--small 64x128x8]

For the full (models/default.json) and small (models/small.json) network,
times a training step (Adam, aux losses) and inference with the atrous convs
computed natively (Conv2D with dilations) and by space-to-batch
(models/atrous.py). TF_ENABLE_ONEDNN_OPTS is read when TensorFlow loads, so
each setting runs in a child process; within one, the paths of one model and
mode are timed in interleaved rounds (the median is printed), so load from
other processes hits both alike. A path without gradient kernels on this
machine (native, oneDNN off, on CPU) prints "no kernel". Random data held in
graph variables: only the network is timed. Prints; asserts nothing.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_throughput import step_fetch  # noqa: E402

MODEL_DEFS = {"full": "models/default.json", "small": "models/small.json"}
ONEDNN_SETTINGS = ("0", "1")
WARMUP_STEPS = 2


def parse_size(text):
    height, width, batch = (int(v) for v in text.lower().split("x"))
    return height, width, batch


def build_step(model_def, num_classes, size, path, mode):
    """A graph + session whose run() does one step of ``mode``."""
    import numpy as np
    import tensorflow as tf

    from models.AdapNet_pp import AdapNet_pp

    tf1 = tf.compat.v1
    height, width, batch = size
    graph = tf.Graph()
    with graph.as_default():
        rng = np.random.default_rng(0)
        images = tf1.Variable(rng.uniform(0, 255, (batch, height, width, 3))
                              .astype(np.float32), trainable=False)
        ids = rng.integers(0, num_classes, (batch, height, width))
        labels = tf1.Variable(np.eye(num_classes, dtype=np.float32)[ids], trainable=False)
        model = AdapNet_pp(model_def, num_classes, atrous_path=path)
        fetch = step_fetch(model, images, labels, mode)
        if mode != "train":
            fetch = tf.reduce_sum(fetch)  # time the network, not the copy out
        initializer = tf1.global_variables_initializer()
    session = tf1.Session(graph=graph)
    session.run(initializer)
    return session, fetch


def worker(args):
    """Child process: one oneDNN setting; prints one JSON line per result."""
    from common.runtime import graph_mode
    graph_mode()
    import tensorflow as tf

    from models import atrous
    from models.model_def import load_model_def

    native_ok = atrous.native_gradients_available()
    sizes = {"full": parse_size(args.full), "small": parse_size(args.small)}
    for name, path in MODEL_DEFS.items():
        model_def = load_model_def(os.path.join(REPO, path))
        for mode in ("train", "inference"):
            runs = {}
            for atrous_path in atrous.PATHS:
                if mode == "train" and atrous_path == atrous.NATIVE and not native_ok:
                    continue
                session, fetch = build_step(model_def, args.num_classes, sizes[name],
                                            atrous_path, mode)
                try:
                    for _ in range(WARMUP_STEPS):
                        session.run(fetch)
                except tf.errors.InvalidArgumentError:
                    session.close()
                    continue
                runs[atrous_path] = (session, fetch, [])
            for _ in range(args.steps):  # interleaved rounds
                for session, fetch, times in runs.values():
                    start = time.perf_counter()
                    session.run(fetch)
                    times.append(time.perf_counter() - start)
            batch = sizes[name][2]
            for atrous_path in atrous.PATHS:
                result = {"model": name, "mode": mode, "path": atrous_path,
                          "images_per_s": None}
                if atrous_path in runs:
                    session, _, times = runs[atrous_path]
                    times.sort()
                    result["images_per_s"] = batch / times[len(times) // 2]
                    session.close()
                print(json.dumps(result), flush=True)
    print(json.dumps({"auto": atrous.resolve_path(atrous.AUTO),
                      "native_gradients": native_ok}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--full", default="384x768x1", metavar="HxWxBATCH",
                        help="input size and batch of the full network")
    parser.add_argument("--small", default="64x128x8", metavar="HxWxBATCH",
                        help="input size and batch of the small network")
    parser.add_argument("--num_classes", type=int, default=12)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows, autos = [], {}
    for setting in ONEDNN_SETTINGS:
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="2")
        command = [sys.executable, os.path.abspath(__file__), "--worker",
                   "--steps", str(args.steps), "--full", args.full, "--small", args.small,
                   "--num_classes", str(args.num_classes)]
        output = subprocess.run(command, env=env, check=True, capture_output=True,
                                text=True, cwd=REPO).stdout
        for line in output.splitlines():
            if not line.startswith("{"):
                continue
            record = json.loads(line)
            if "auto" in record:
                autos[setting] = record
            else:
                rows.append(dict(record, onednn=setting))
    print(f"images/s (median of {args.steps} interleaved rounds); full {args.full}, "
          f"small {args.small} (HxWxbatch)")
    print(f"{'model':<6} {'mode':<10} {'oneDNN':>6} {'native':>10} {'space_to_batch':>15} "
          f"{'s2b/native':>11}")
    by_key = {}
    for row in rows:
        by_key.setdefault((row["model"], row["mode"], row["onednn"]), {})[row["path"]] = \
            row["images_per_s"]
    for (model, mode, setting), speeds in by_key.items():
        native, s2b = speeds.get("native"), speeds.get("space_to_batch")
        ratio = f"{s2b / native:11.2f}" if native and s2b else f"{'-':>11}"
        show = (lambda v: f"{v:10.2f}" if v else f"{'no kernel':>10}")
        print(f"{model:<6} {mode:<10} {setting:>6} {show(native)} {show(s2b):>15} {ratio}")
    for setting, record in autos.items():
        print(f"oneDNN {setting}: native gradient kernels "
              f"{'present' if record['native_gradients'] else 'missing'}; "
              f"auto picks {record['auto']}")


if __name__ == "__main__":
    main()
