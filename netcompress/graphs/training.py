"""The training graph (train.py's): data, model, loss, Adam with
polynomial decay, saver and summaries, on one device or replicated; the
loop that runs it is netcompress/jobs/train.py."""

import tensorflow as tf

from common.errors import UserError
from dataset.pipeline import train_dataset
from netcompress.formats import checkpoints, description
from netcompress.formats.checkpoint_paths import checkpoint_prefix, latest_of_run
from netcompress.formats.palette import config_class_names
from netcompress.graphs.models import check_model_name, model_from_config
from netcompress.graphs.replicas import Replicas

tf1 = tf.compat.v1


def training_model(config):
    """``config`` with the model to train (netcompress/formats/description.py): the
    description of the checkpoint it resumes, which the config's model_def,
    mask and num_classes must equal when given; else that of `intialize`,
    whose model_def and masks must be the model's (num_classes may differ:
    its head is then not restored); else the config's files. Idempotent."""
    if config.get("checkpoint_model") is not None:
        return config
    directory, prefix = checkpoint_prefix(config["checkpoint"])
    given = (config.get("model_def"), config.get("mask"), config.get("num_classes"))
    latest = latest_of_run(directory, prefix)
    initialize = config.get("initialize")
    described = description.read_description(initialize) \
        if latest is None and initialize else None
    if latest is not None:
        found = description.checkpoint_model(latest, *given)
    elif described is not None:
        found = description.checkpoint_model(initialize, *given, head_may_differ=True,
                                             description=described)
    else:
        if given[0] is None or given[2] is None:
            missing = "model_def" if given[0] is None else "num_classes"
            raise UserError(f"{missing} is required to train a new model (it may be left "
                            f"out only when resuming, or with an intialize checkpoint that "
                            f"describes its model)")
        found = description.files_model(*given)
    check_model_name(config.get("model"), found.description)
    return dict(config, num_classes=found.num_classes, checkpoint_model=found)


def _end_learning_rate(config):
    """Where the polynomial decay ends (the original's 1e-4, README.md)."""
    end, start = config["end_learning_rate"], config["learning_rate"]
    if not 0 <= end <= start:
        raise UserError(f"'end_learning_rate' must be >= 0 and <= learning_rate ({start}), "
                        f"got {end}")
    return end


class TrainGraph:
    """The training graph: data, model, loss, optimizer, saver, summaries;
    on one device, or replicated (netcompress/graphs/replicas.py)."""

    def __init__(self, config, seed=None, dropout=True):
        """``dropout``: False only for tests comparing replica counts step
        for step."""
        end_learning_rate = _end_learning_rate(config)
        config = training_model(config)
        self.replicas = Replicas(config, workers=True)
        self.graph = tf.Graph()
        with self.graph.as_default(), self.replicas.scope():
            if seed is not None:
                tf1.set_random_seed(seed)
            self.model = model_from_config(config)
            self.model.dropout = dropout
            dataset = train_dataset(config["train_data"], config["batch_size"],
                                    config["height"], config["width"], config["num_classes"],
                                    flip=config["flip"], seed=seed)
            self.global_step = tf1.train.get_or_create_global_step()
            self.learning_rate = tf1.train.polynomial_decay(
                config["learning_rate"], self.global_step, config["max_iteration"],
                end_learning_rate=end_learning_rate, power=config["power"])
            optimizer = tf1.train.AdamOptimizer(self.learning_rate)
            self.data_initializer, step = self.replicas.run(
                dataset, replica_step(self.model, optimizer, self.global_step,
                                      config["batch_size"], self.replicas.count),
                train_ops=("train_op",))
            self.loss, self.data_loss = step["loss"], step["data_loss"]
            # Several replicas: the batch-norm updates are merged ops made in
            # every replica's build; run them all (docs/distribute.md).
            self.train_op = tf.group(step["train_op"],
                                     *tf1.get_collection(tf1.GraphKeys.UPDATE_OPS))
        with self.graph.as_default():
            # Saved with every checkpoint (netcompress/formats/description.py): one
            # plain variable outside the replicas' scope (never mirrored),
            # made after every seeded op (an op's seed follows the op count).
            found = config["checkpoint_model"]
            self.description = tf1.Variable(
                description.describe(found.model_def, found.masks, config["num_classes"],
                                     config["model"], config_class_names(config)),
                dtype=tf.string, trainable=False, name=description.KEY)
        with self.graph.as_default(), self.replicas.scope():
            self.model_variables = checkpoints.model_variables(self.graph)
            self.saved_variables = tf1.global_variables()
            self.restored_variables = [v for v in self.saved_variables
                                       if v is not self.description]
            # One op telling whether a checkpoint would be worth keeping (a
            # resume restores the Adam slots too).
            self.all_finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v))
                                             for v in self.saved_variables
                                             if v.dtype.base_dtype.is_floating])
            # Relative paths in the state file: a copied run folder stays whole.
            self.saver = tf1.train.Saver(max_to_keep=config["max_to_keep"],
                                         save_relative_paths=True)
            # A resume restores all but the description, which checkpoints
            # written before descriptions lack.
            self.resume_saver = tf1.train.Saver(self.restored_variables)
            tf1.summary.scalar("loss", self.loss)
            tf1.summary.scalar("data_loss", self.data_loss)
            tf1.summary.scalar("learning_rate", self.learning_rate)
            self.summaries = tf1.summary.merge_all()
            self.initializer = tf1.global_variables_initializer()
        self.graph.finalize()

def replica_step(model, optimizer, global_step, global_batch, count):
    """One replica's training step on its share of the batch. Its loss is its
    part of the global batch mean plus 1/count of the weight decay, and
    gradients are summed over replicas: the loss, weight decay and learning
    rate mean the same at any replica count (for one replica both factors
    are exactly 1)."""
    def step(images, labels):
        outputs = model.build(images, training=True, aux=True)
        share = tf.cast(tf.shape(images)[0], tf.float32) / global_batch
        data_loss = tf.reduce_mean(model.per_example_loss(outputs, labels)) * share
        loss = data_loss + model.weight_decay() * (1.0 / count)
        # The batch-norm updates run in the same step (TrainGraph groups them
        # with train_op); they do not depend on the gradient step, so no
        # control edges from every update to every gradient op (on two
        # replicas those edges cross devices: minutes to place the graph).
        train_op = optimizer.minimize(loss, global_step)
        return {"loss": loss, "data_loss": data_loss, "train_op": train_op}
    return step


