"""Images/s for a training step (Adam) and for inference of a model_def;
with --replicas, of the training step on each number of replicas.

    python bench/train_throughput.py --model_def models/default.json \
        --height 384 --width 768 --batch 2 --steps 10
    python bench/train_throughput.py --replicas 1 2 --batch 8 [--gpus]

Random inputs, so only the network is timed. Replicas run on CPU devices
(the CPU's cores shared among them), or with --gpus on GPUs 0..N-1; the
batch is the global batch. Prints; asserts nothing.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.runtime import graph_mode, quiet_tensorflow  # noqa: E402


def time_runs(session, fetches, feed, steps, warmup=2):
    for _ in range(warmup):
        session.run(fetches, feed)
    start = time.perf_counter()
    for _ in range(steps):
        session.run(fetches, feed)
    return (time.perf_counter() - start) / steps


def random_batch(args):
    """Random BGR images and one-hot labels of the benchmark's batch."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = [args.batch, args.height, args.width]
    images = rng.uniform(0, 255, shape + [3]).astype(np.float32)
    labels = np.eye(args.num_classes, dtype=np.float32)[
        rng.integers(0, args.num_classes, shape)]
    return images, labels


def step_fetch(model, images, labels, mode):
    """What one session run fetches for a ``mode`` ('train': an Adam step
    with aux losses and weight decay; 'inference': the probabilities)."""
    import tensorflow as tf
    tf1 = tf.compat.v1
    if mode != "train":
        return model.build(images, training=False, aux=False).probabilities
    outputs = model.build(images, training=True, aux=True)
    loss = tf.reduce_mean(model.per_example_loss(outputs, labels)) + model.weight_decay()
    with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
        return tf1.train.AdamOptimizer(1e-4).minimize(loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_def", default="models/small.json")
    parser.add_argument("--mask", default=None)
    parser.add_argument("--num_classes", type=int, default=12)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--replicas", type=int, nargs="+", metavar="N",
                        help="time the training step on each of these replica counts")
    parser.add_argument("--gpus", action="store_true",
                        help="with --replicas: one replica per GPU instead of CPU devices")
    args = parser.parse_args()
    quiet_tensorflow()
    graph_mode()
    if args.replicas:
        return replica_scaling(args)
    import tensorflow as tf

    from models.AdapNet_pp import AdapNet_pp
    from models.model_def import load_masks, load_model_def
    from netcompress.pruning_math.costs import total_parameters

    tf1 = tf.compat.v1
    model_def = load_model_def(args.model_def)
    masks = load_masks(args.mask)
    images, labels = random_batch(args)
    shape = list(images.shape[:3])
    results = {}
    for mode in ("train", "inference"):
        graph = tf.Graph()
        with graph.as_default():
            x = tf1.placeholder(tf.float32, shape + [3])
            y = tf1.placeholder(tf.float32, shape + [args.num_classes])
            model = AdapNet_pp(model_def, args.num_classes, masks)
            fetch = step_fetch(model, x, y, mode)
            with tf1.Session() as session:
                session.run(tf1.global_variables_initializer())
                results[mode] = time_runs(session, fetch, {x: images, y: labels}, args.steps)
    params = total_parameters(model_def, args.num_classes)
    print(f"model_def {args.model_def}: {params / 1e6:.2f} M parameters, input "
          f"{args.height}x{args.width}, batch {args.batch}")
    for mode, seconds in results.items():
        print(f"{mode:>9}: {args.batch / seconds:8.2f} images/s ({1000 * seconds:.1f} ms/batch)")
    print(f"inference/train speed ratio: {results['train'] / results['inference']:.2f}")


def replica_scaling(args):
    """Images/s of a replicated training step (netcompress/graphs/replicas.py) per
    replica count, all measured in this run."""
    import tensorflow as tf

    from models.model_def import load_masks, load_model_def
    from netcompress.graphs.replicas import Replicas
    from netcompress.graphs.training import replica_step

    tf1 = tf.compat.v1
    images, labels = random_batch(args)
    rates = {}
    for count in args.replicas:
        if args.batch % count:
            raise SystemExit(f"--batch {args.batch} is not a multiple of {count} replicas")
        gpu_id = ",".join(str(i) for i in range(count)) if args.gpus else "-1"
        replicas = Replicas({"replicas": count, "gpu_id": gpu_id})
        graph = tf.Graph()
        with graph.as_default(), replicas.scope():
            from models.AdapNet_pp import AdapNet_pp
            model = AdapNet_pp(load_model_def(args.model_def), args.num_classes,
                               load_masks(args.mask))
            dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
            global_step = tf1.train.get_or_create_global_step()
            step = replica_step(model, tf1.train.AdamOptimizer(1e-4), global_step,
                                args.batch, count)
            data_initializer, results = replicas.run(dataset, step, train_ops=("train_op",))
            train_op = tf.group(results["train_op"],
                                *tf1.get_collection(tf1.GraphKeys.UPDATE_OPS))
            initializer = tf1.global_variables_initializer()
        with tf1.Session(graph=graph, config=replicas.session_config()) as session:
            session.run(initializer)
            if data_initializer is not None:
                session.run(data_initializer)
            rates[count] = args.batch / time_runs(session, train_op, None, args.steps)
    device = "GPUs" if args.gpus else "CPU devices"
    print(f"model_def {args.model_def}, input {args.height}x{args.width}, global batch "
          f"{args.batch}, replicas on {device}")
    base = rates[args.replicas[0]]
    for count, rate in rates.items():
        print(f"{count} replica(s): {rate:8.2f} images/s ({rate / count:.2f} per replica), "
              f"x{rate / base:.2f} of {args.replicas[0]}")


if __name__ == "__main__":
    main()
