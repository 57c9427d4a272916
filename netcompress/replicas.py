"""One step on several devices with tf.distribute (docs/distribute.md).

A config's ``gpu_id: '0,1'`` runs one replica per listed GPU, ``replicas: N``
(with no GPU listed) N replicas on CPU logical devices; ``batch_size`` is the
global batch, split evenly. One replica is the plain single-device graph: no
strategy at all.

The step function of a replicated graph returns per-replica values: losses
and rank sums are summed over the replicas (a replica's share of a mean is
already divided by the global batch), operations grouped.
"""

import tensorflow as tf

from common.errors import UserError
from netcompress.config import listed_gpus

tf1 = tf.compat.v1


def _visible_gpus():
    from tensorflow.python.client import device_lib

    return [d.name for d in device_lib.list_local_devices() if d.device_type == "GPU"]


class Replicas:
    """How a config's step runs: ``count`` replicas, on GPUs or CPU devices."""

    def __init__(self, config):
        self.count = config.get("replicas") or 1
        self.on_gpus = len(listed_gpus(config.get("gpu_id", ""))) > 1
        self.strategy = None
        if self.count == 1:
            return
        if self.on_gpus:
            found = _visible_gpus()
            if len(found) < self.count:
                raise UserError(f"gpu_id {config['gpu_id']!r} lists {self.count} GPUs but "
                                f"TensorFlow sees {len(found)}: check the ids (nvidia-smi) "
                                f"and that the CUDA build of TensorFlow is installed")
            devices = [f"/gpu:{i}" for i in range(self.count)]
            cross_device_ops = None  # NCCL, MirroredStrategy's choice for GPUs
        else:
            if config.get("gpu_id") != "-1" and _visible_gpus():
                raise UserError(f"replicas: {self.count} runs on CPU devices, but this "
                                f"machine has GPUs: list one GPU per replica in gpu_id "
                                f"(e.g. '0,1'), or set gpu_id: -1 to use the CPU")
            devices = [f"/cpu:{i}" for i in range(self.count)]
            cross_device_ops = tf.distribute.ReductionToOneDevice(reduce_to_device="/cpu:0")
        self.strategy = tf1.distribute.MirroredStrategy(devices,
                                                        cross_device_ops=cross_device_ops)

    def scope(self):
        """Variables created under it are mirrored (a no-op for one replica)."""
        if self.strategy is None:
            return tf1.distribute.get_strategy().scope()
        return self.strategy.scope()

    def session_config(self):
        """The Session's devices: N CPU devices for CPU replicas."""
        if self.strategy is None or self.on_gpus:
            return None
        return tf1.ConfigProto(device_count={"CPU": self.count}, allow_soft_placement=True)

    def run(self, dataset, step, train_ops=()):
        """``step(images, labels)`` -> {name: tensor or op} on each replica's
        share of every batch of ``dataset`` (global batches). Returns
        (data initializer or None, {name: value}): the ops named in
        ``train_ops`` grouped over replicas, every other value summed."""
        if self.strategy is None:
            images, labels = tf1.data.make_one_shot_iterator(dataset).get_next()
            return None, step(images, labels)
        iterator = self.strategy.make_dataset_iterator(dataset)
        per_replica = self.strategy.experimental_run(lambda inputs: step(*inputs), iterator)
        results = {}
        for name, value in per_replica.items():
            if name in train_ops:
                results[name] = self.strategy.group(value)
            else:
                results[name] = self.strategy.reduce(tf.distribute.ReduceOp.SUM, value,
                                                     axis=None)
        return iterator.initializer, results
