"""Training loop (train.py): Adam, polynomial decay, resume, NaN guard."""

import math
import os

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dataset.pipeline import train_dataset
from netcompress import checkpoints, op_errors
from netcompress.errors import UserError
from netcompress.models import model_from_config

tf1 = tf.compat.v1

CHECKPOINT_BASENAME = "model.ckpt"


def checkpoint_prefix(checkpoint):
    """Config `checkpoint` (a prefix like runs/x/model.ckpt, or a directory)
    -> (directory, prefix)."""
    if checkpoint.endswith(os.sep) or os.path.isdir(checkpoint):
        directory = checkpoint.rstrip(os.sep) or os.sep
        return directory, os.path.join(directory, CHECKPOINT_BASENAME)
    return os.path.dirname(checkpoint) or ".", checkpoint


class TrainGraph:
    """The training graph: data, model, loss, optimizer, saver, summaries."""

    def __init__(self, config, seed=None):
        self.graph = tf.Graph()
        with self.graph.as_default():
            if seed is not None:
                tf1.set_random_seed(seed)
            self.model = model_from_config(config)
            dataset = train_dataset(config["train_data"], config["batch_size"],
                                    config["height"], config["width"], config["num_classes"],
                                    flip=config.get("flip", True), seed=seed)
            images, labels = tf1.data.make_one_shot_iterator(dataset).get_next()
            outputs = self.model.build(images, training=True, aux=True)
            self.data_loss = tf.reduce_mean(self.model.per_example_loss(outputs, labels))
            self.loss = self.data_loss + self.model.weight_decay()
            self.global_step = tf1.train.get_or_create_global_step()
            self.learning_rate = tf1.train.polynomial_decay(
                config["learning_rate"], self.global_step, config["max_iteration"],
                end_learning_rate=0.0, power=config["power"])
            optimizer = tf1.train.AdamOptimizer(self.learning_rate)
            with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
                self.train_op = optimizer.minimize(self.loss, self.global_step)
            self.model_variables = checkpoints.model_variables(self.graph)
            self.saver = tf1.train.Saver(max_to_keep=3)
            tf1.summary.scalar("loss", self.loss)
            tf1.summary.scalar("data_loss", self.data_loss)
            tf1.summary.scalar("learning_rate", self.learning_rate)
            self.summaries = tf1.summary.merge_all()
            self.initializer = tf1.global_variables_initializer()
        self.graph.finalize()


def _initialise(session, graph, config, directory, log):
    """Resume from the newest checkpoint in `directory`, else initialise
    (and restore what matches from `initialize`). Returns the start step."""
    latest = tf1.train.latest_checkpoint(directory) if os.path.isdir(directory) else None
    session.run(graph.initializer)
    if latest is not None:
        graph.saver.restore(session, latest)
        step = int(session.run(graph.global_step))
        log(f"resuming from {latest} at step {step}")
        return step
    if config.get("initialize"):
        restored, missing = checkpoints.restore_matching(session, config["initialize"],
                                                         graph.model_variables)
        log(f"initialised {len(restored)} of {len(graph.model_variables)} variables from "
            f"{config['initialize']}")
        if missing:
            log(f"{len(missing)} variables not restored (fresh initialisation):")
            for line in missing:
                log(f"  {line}")
    return 0


def train(config, log=print, seed=None, progress=True):
    """Train per config; returns a dict with the final step and loss history."""
    directory, prefix = checkpoint_prefix(config["checkpoint"])
    os.makedirs(directory, exist_ok=True)
    graph = TrainGraph(config, seed=seed)
    max_iteration, save_step = config["max_iteration"], config["save_step"]
    history, data_history = [], []
    with tf1.Session(graph=graph.graph) as session:
        step = _initialise(session, graph, config, directory, log)
        if step >= max_iteration:
            log(f"nothing to do: step {step} >= max_iteration {max_iteration}")
            return {"step": step, "losses": history, "data_losses": data_history,
                    "checkpoint": tf1.train.latest_checkpoint(directory)}
        writer = tf1.summary.FileWriter(directory, graph.graph)
        bar = tqdm(total=max_iteration, initial=step, desc="train", unit="step", mininterval=2,
                   disable=not progress, dynamic_ncols=True)
        try:
            while step < max_iteration:
                with op_errors.reported(config["train_data"], graph.graph):
                    _, loss, data_loss, learning_rate, summary = session.run(
                        [graph.train_op, graph.loss, graph.data_loss, graph.learning_rate,
                         graph.summaries])
                if not math.isfinite(loss):
                    last = tf1.train.latest_checkpoint(directory)
                    raise UserError(f"loss is {loss} at step {step + 1}: training stopped; last "
                                    f"good checkpoint: {last or 'none saved yet'} (lower "
                                    f"learning_rate?)")
                step += 1
                history.append(float(loss))
                data_history.append(float(data_loss))
                bar.update(1)
                if step % config["skip_step"] == 0 or step == max_iteration:
                    recent = slice(-config["skip_step"], None)
                    bar.set_postfix(loss=f"{np.mean(history[recent]):.4f}",
                                    data_loss=f"{np.mean(data_history[recent]):.4f}",
                                    lr=f"{learning_rate:.2e}")
                    writer.add_summary(summary, step)
                if step % save_step == 0 or step == max_iteration:
                    graph.saver.save(session, prefix, global_step=step)
        finally:
            bar.close()
            writer.close()
    log(f"saved {prefix}-{step}")
    return {"step": step, "losses": history, "data_losses": data_history,
            "checkpoint": f"{prefix}-{step}"}
