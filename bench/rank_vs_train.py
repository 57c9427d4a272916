"""Time of the ranking pass against a training step and the original method.

    python bench/rank_vs_train.py --model_def models/default.json \\
        --height 192 --width 384 --batch 2 --steps 5

On random data (held in graph variables, so no input pipeline is timed), each
in its own graph and session with freshly initialised weights:

- train:    one Adam step (batch-norm batch statistics, aux losses, weight decay);
- rank:     one session run of the ranking pass (netcompress.jobs.rank), fetching
            only the per-layer batch sums;
- original: the original code's way, two session runs per batch, one fetching
            every ranked activation z and one fetching every dC/dz to numpy,
            reduced to the same sums in numpy.

Steps of the three are timed in interleaved rounds (other processes' load
hits each alike); prints the median time per image of each and the ratios
rank/train and original/rank.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.runtime import graph_mode, quiet_tensorflow  # noqa: E402

quiet_tensorflow()
graph_mode()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.AdapNet_pp import AdapNet_pp  # noqa: E402
from models.model_def import load_model_def  # noqa: E402
from netcompress.jobs.rank import BatchTaylorSums, ranked_convs  # noqa: E402

tf1 = tf.compat.v1
WARMUP_STEPS = 2


def random_batch(args):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.batch, args.height, args.width, 3)).astype(np.float32)
    label_ids = rng.integers(0, args.num_classes, (args.batch, args.height, args.width))
    labels = np.eye(args.num_classes, dtype=np.float32)[label_ids]
    # Variables, not constants: the optimiser must not fold the data away.
    return (tf1.Variable(images, trainable=False, name="bench_images"),
            tf1.Variable(labels, trainable=False, name="bench_labels"))


def train_step(model, images, labels):
    outputs = model.build(images, training=True, aux=True)
    loss = tf.reduce_mean(model.per_example_loss(outputs, labels)) + model.weight_decay()
    with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
        train_op = tf1.train.AdamOptimizer(1e-4).minimize(loss)

    def run(session):
        session.run(train_op)
    return run


def rank_step(model, images, labels):
    batch_sums = BatchTaylorSums(model, model.build(images, training=False, aux=True), labels)

    def run(session):
        return session.run(batch_sums.fetches)
    return run


def original_step(model, images, labels):
    """Activations and gradients fetched by two runs, reduced in numpy."""
    outputs = model.build(images, training=False, aux=True)
    loss = tf.reduce_sum(model.per_example_loss(outputs, labels))
    z_tensors = [outputs.pre_norm[conv.scope] for conv in ranked_convs(model.architecture)]
    gradients = tf.gradients(loss, z_tensors)

    def run(session):
        activations = session.run(z_tensors)
        derivatives = session.run(gradients)
        sums = []
        for z, dz in zip(activations, derivatives):
            t = (z * dz).mean(axis=(1, 2))
            sums.append((np.abs(t).sum(axis=0), t.sum(axis=0)))
        return sums
    return run


def start_session(build_step, model_def, args):
    """A session with ``build_step``'s graph initialised and warmed up, and
    the function running one step in it."""
    graph = tf.Graph()
    with graph.as_default():
        images, labels = random_batch(args)
        model = AdapNet_pp(model_def, args.num_classes)
        run = build_step(model, images, labels)
        initializer = tf1.global_variables_initializer()
    graph.finalize()
    session = tf1.Session(graph=graph)
    session.run(initializer)
    for _ in range(WARMUP_STEPS):
        run(session)
    return session, run


def median_seconds_per_image(steps, args):
    """Steps timed in interleaved rounds, so that load from other processes
    hits every method alike; the median step per image of each."""
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, (session, run) in steps.items():
            start = time.perf_counter()
            run(session)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) / args.batch for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_def", default="models/default.json")
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each (after 2 warm-up steps)")
    parser.add_argument("--num_classes", type=int, default=12)
    args = parser.parse_args(argv)
    model_def = load_model_def(args.model_def)
    print(f"{args.model_def}, {args.height}x{args.width}, batch {args.batch}, "
          f"{args.steps} timed steps, {os.cpu_count()} CPUs, "
          f"GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    steps = {name: start_session(build_step, model_def, args)
             for name, build_step in (("train", train_step), ("rank", rank_step),
                                      ("original", original_step))}
    times = median_seconds_per_image(steps, args)
    for name, (session, _) in steps.items():
        session.close()
        print(f"{name:>8}: {1000 * times[name]:9.1f} ms/image (median of {args.steps})")
    print(f"rank / train:    {times['rank'] / times['train']:.2f}")
    print(f"original / rank: {times['original'] / times['rank']:.2f}")


if __name__ == "__main__":
    main()
