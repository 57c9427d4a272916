"""Inference graphs: the model over one pass of a record file (evaluate,
the rank pass) and the gated graph (channel gates as inputs: the threshold
searches), with the pass loop they share."""

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dataset.pipeline import eval_dataset
from netcompress.formats import checkpoints
from netcompress.formats.checkpoint_paths import resolve_checkpoint
from netcompress.graphs import op_errors
from netcompress.graphs.metrics import ConfusionMatrix
from netcompress.graphs.models import model_from_config, with_checkpoint_model
from netcompress.graphs.replicas import Replicas

tf1 = tf.compat.v1


class InferenceGraph:
    """Model in inference mode over a single pass of ``data_path``.

    ``per_replica(model, images, labels)`` -> {name: tensor}: instead of the
    plain outputs, the graph computes these on every replica's share of each
    batch (netcompress/graphs/replicas.py; the config's replicas), summed over the
    replicas into ``results``. A replicated pass pads the last batch with
    all-zero examples, which must add nothing to those sums.

    ``fold_masks``: masked conv3 kernels held at the residual width and
    widened once at restore, not on every batch (evaluate; docs/deploy.md).

    ``data_path`` None: the record file is fed at each pass (``run_pass``'s
    ``data_path``), so that one graph and one restore serve passes over
    several files (compress.py's validation, then test, of one model)."""

    def __init__(self, config, data_path, aux=False, shard=None, per_replica=None,
                 fold_masks=False):
        config = with_checkpoint_model(config)
        self.model_def_path = config.get("model_def")
        self.data_path = data_path
        self.replicas = Replicas(config if per_replica else {})
        self.graph = tf.Graph()
        with self.graph.as_default(), self.replicas.scope():
            self.model = model_from_config(config, fold_masks=fold_masks)
            self.records = tf1.placeholder(tf.string, [], name="records") \
                if data_path is None else None
            dataset = eval_dataset(data_path if self.records is None else self.records,
                                   config["batch_size"], config["height"], config["width"],
                                   config["num_classes"], shard=shard,
                                   whole_batches=self.replicas.count > 1)
            if per_replica is None:
                iterator = tf1.data.make_initializable_iterator(dataset)
                self.data_initializer = iterator.initializer
                self.images, self.labels = iterator.get_next()
                self.outputs = self.model.build(self.images, training=False, aux=aux)
                self.predictions = tf.argmax(self.outputs.logits, axis=3,
                                             output_type=tf.int32)
                self.label_ids = tf.argmax(self.labels, axis=3, output_type=tf.int32)
            else:
                def step(images, labels):
                    return per_replica(self.model, images, labels)
                self.data_initializer, self.results = self.replicas.run(dataset, step)
            self.model_variables = checkpoints.model_variables(self.graph)

    def open_session(self, config):
        """A session with ``config``'s checkpoint restored (the caller closes it)."""
        # Resolved once: what was restored is what the caller reports.
        self.restored = resolve_checkpoint(config["checkpoint"])
        session = tf1.Session(graph=self.graph, config=self.replicas.session_config())
        try:
            self.restore(session, self.restored, self.model_def_path)
        except BaseException:
            session.close()
            raise
        return session

    def run_pass(self, config, fetches, handle, total, desc, progress=True, session=None,
                 data_path=None):
        """Run ``fetches`` on every batch of one pass over ``data_path`` (or
        the graph's), with a progress bar of ``total`` images, in ``session``
        (or one of its own, ``config``'s checkpoint restored).
        ``handle(fetched)`` returns the batch's image count and a progress
        note (or None)."""
        if session is None:
            with self.open_session(config) as own:
                return self.run_pass(config, fetches, handle, total, desc, progress, own,
                                     data_path)
        if self.records is None:
            if data_path not in (None, self.data_path):
                raise ValueError(f"this graph reads {self.data_path}, not {data_path}")
            data_path = self.data_path
        if self.data_initializer is not None:
            session.run(self.data_initializer,
                        {} if self.records is None else {self.records: data_path})
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress,
                   dynamic_ncols=True)
        with bar:  # closed (newline written) before any error message
            for fetched in iterate_batches(session, fetches, data_path):
                images, note = handle(fetched)
                bar.update(images)
                if note:
                    bar.set_postfix_str(note)

    def restore(self, session, checkpoint, model_def_path):
        # Kept: the rank pass's filter norms come from the values restored.
        self.restored_values = checkpoints.restore_model(
            session, checkpoint, self.model_variables, model_def_path, self.model)


class GatedGraph:
    """The model in inference mode over ``data_path``, re-readable (one
    initialisable pass per candidate), with a gate input per prunable group
    (ones unless fed). ``aux``: build the auxiliary heads, so that ``loss``
    is the loss the rank pass differentiates. Masks are folded (as in
    InferenceGraph): nothing here differentiates the kernels."""

    def __init__(self, config, data_path, aux=False):
        config = with_checkpoint_model(config)
        self.data_path = data_path
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.model = model_from_config(config, fold_masks=True)
            dataset = eval_dataset(data_path, config["batch_size"], config["height"],
                                   config["width"], config["num_classes"])
            self.iterator = tf1.data.make_initializable_iterator(dataset)
            images, labels = self.iterator.get_next()
            self.layers = [g.name for g in
                           self.model.architecture.prunable_groups(streams=True)]
            widths = self.model.widths
            self.gates = {name: tf1.placeholder_with_default(
                tf.ones([widths[name]]), [widths[name]], name=f"gate{i}")
                for i, name in enumerate(self.layers)}
            outputs = self.model.build(images, training=False, aux=aux, gates=self.gates)
            self.fetches = {
                "labels": tf.argmax(labels, axis=3, output_type=tf.int32),
                "predictions": tf.argmax(outputs.logits, axis=3, output_type=tf.int32),
                "loss": tf.reduce_sum(self.model.per_example_loss(outputs, labels)),
            }
            self.model_variables = checkpoints.model_variables(self.graph)

    def restore(self, session, checkpoint, model_def_path):
        checkpoints.restore_model(session, checkpoint, self.model_variables, model_def_path,
                                  self.model)

    def evaluate(self, session, removed, num_classes, bar=None, gate_values=None):
        """(ConfusionMatrix, mean per-example loss) with the channels
        ``removed`` ({layer: indices}) gated to zero; ``gate_values``
        ({layer: array}) feeds any other gate values."""
        feed = {self.gates[layer]: np.asarray(values, np.float32)
                for layer, values in (gate_values or {}).items()}
        for layer, indices in removed.items():
            gate = np.ones(self.model.widths[layer], np.float32)
            gate[np.asarray(indices, np.int64)] = 0.0
            feed[self.gates[layer]] = gate
        matrix, loss, examples = ConfusionMatrix(num_classes), 0.0, 0
        session.run(self.iterator.initializer)
        while True:
            try:
                with op_errors.reported(self.data_path, self.graph):
                    batch = session.run(self.fetches, feed)
            except tf.errors.OutOfRangeError:
                break
            matrix.update(batch["labels"], batch["predictions"])
            loss += float(batch["loss"])
            examples += batch["labels"].shape[0]
            if bar is not None:
                bar.update(1)
        return matrix, loss / max(examples, 1)


def iterate_batches(session, fetches, data_path):
    """Run ``fetches`` until the single-pass dataset is exhausted."""
    while True:
        try:
            with op_errors.reported(data_path, session.graph):
                batch = session.run(fetches)
        except tf.errors.OutOfRangeError:
            return
        yield batch
