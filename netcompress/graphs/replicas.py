"""One step on several devices with tf.distribute (docs/distribute.md).

A config's ``gpu_id: '0,1'`` runs one replica per listed GPU, ``replicas: N``
(with no GPU listed) N replicas on CPU logical devices; ``batch_size`` is the
global batch, split evenly. One replica is the plain single-device graph: no
strategy at all. Several machines: each worker process is started with its
``TF_CONFIG`` (cluster and task, as TensorFlow defines it) and runs
MultiWorkerMirroredStrategy, one replica per worker (or per listed GPU of it);
the first worker (index 0) is the chief, the only one that writes.

The step function of a replicated graph returns per-replica values: losses
and rank sums are summed over the replicas (a replica's share of a mean is
already divided by the global batch), operations grouped.
"""

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time

import tensorflow as tf

from common.errors import UserError, error_text, message_lines
from netcompress.settings.config import listed_gpus, setting_defaults

tf1 = tf.compat.v1

# Seconds a worker waits for the others' servers: a train config's
# worker_timeout; a ranking worker waits as long as its default.
WORKER_TIMEOUT = setting_defaults("train")["worker_timeout"]
# A peer whose server refuses connections this long, while this worker's
# step waits, has died: TensorFlow may wait for it forever (PeerWatch).
PEER_GRACE = 10.0
PEER_INTERVAL = 2.0
PEER_EXIT = 1  # as a failed op (netcompress/graphs/op_errors.py)


def _with_process_options(config):
    """``config`` with the process's tf.config Grappler switch, which a Session
    made without a config takes by itself (the tests turn Grappler off)."""
    if tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer"):
        config.graph_options.rewrite_options.disable_meta_optimizer = True
    return config


def _visible_gpus():
    from tensorflow.python.client import device_lib

    return [d.name for d in device_lib.list_local_devices() if d.device_type == "GPU"]


def cluster_task():
    """(cluster, task index) from TF_CONFIG when it names several workers,
    else None."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        return None
    try:
        spec = json.loads(text)
        workers, task = spec["cluster"]["worker"], spec["task"]
        index = int(task["index"])
        if not isinstance(workers, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UserError("TF_CONFIG is not {\"cluster\": {\"worker\": [HOST:PORT, ...]}, "
                        "\"task\": {\"type\": \"worker\", \"index\": I}}") from None
    if not isinstance(task, dict) or task.get("type") != "worker" \
            or not 0 <= index < len(workers):
        raise UserError(f"TF_CONFIG task {str(task)[:80]} is not one of the "
                        f"{len(workers)} workers")
    for number, address in enumerate(workers):
        host_and_port(address, number)
    return (spec["cluster"], index) if len(workers) > 1 else None


def host_and_port(address, number):
    """(host, port) of TF_CONFIG's worker ``number``; a UserError unless it
    is HOST:PORT (an IPv6 host in brackets)."""
    text = address if isinstance(address, str) else ""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536 \
            or any(c.isspace() for c in text):
        raise UserError(f"TF_CONFIG worker {number} address {str(address)[:80]!r} is not "
                        f"HOST:PORT (e.g. localhost:12345)")
    return host, int(port)


def wait_for_workers(workers, index, timeout, interval=0.5):
    """Wait until every other worker's server accepts connections; a
    UserError naming the first one still missing after ``timeout`` seconds
    (MultiWorkerMirroredStrategy would wait for it forever, silently)."""
    deadline = time.monotonic() + timeout
    for number, address in enumerate(workers):
        if number == index:
            continue
        host, port = host_and_port(address, number)
        while True:
            try:
                with socket.create_connection((host, port), timeout=interval):
                    break
            except OSError:
                if time.monotonic() >= deadline:
                    raise UserError(f"worker {number} ({address}) did not start within "
                                    f"{timeout:g} s (this is worker {index}): start every "
                                    f"worker TF_CONFIG lists, or raise worker_timeout"
                                    ) from None
                time.sleep(interval)


_REMOTE_TASK = re.compile(r"remote target /job:worker/replica:\d+/task:(\d+)")


def whole_cause(exc, limit=1500):
    """A TensorFlow error's own lines, on one line: all of them (a dead
    peer's cause is on the second and later ones), without the graph
    context and stack traces TensorFlow adds."""
    cause = " ".join(" ".join(message_lines(exc)).split()) or "no message"
    if len(cause) > limit:
        cause = cause[:limit] + " ..."
    return f"{type(exc).__name__}: {cause}"


class PeerFailure(UserError):
    """Another worker died: not the config's fault; exit status 1, as a
    failed op (netcompress/graphs/op_errors.py)."""

    exit_status = PEER_EXIT


class PeerWatch:
    """The other workers during training (docs/distribute.md): a worker
    that dies is named in one line, with TensorFlow's cause when a step
    fails, or (a step that would wait for it forever) after its server has
    refused connections for ``grace`` seconds while the step waits."""

    def __init__(self, workers, index, interval=PEER_INTERVAL, grace=PEER_GRACE,
                 give_up=None):
        """``give_up(message)``: what ends the process from the watch
        thread (tests replace it); default: the message, then exit."""
        self.workers, self.index = workers, index
        self.interval, self.grace = interval, grace
        self.give_up = give_up or _exit_with
        self.stopped = lambda: "training stopped"
        self._run = None  # the number of the collective run in progress
        self._runs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
        self._thread.start()

    def dead_peer(self, timeout=1.0):
        """(number, address) of the first other worker whose server does not
        accept a connection, else None."""
        for number, address in enumerate(self.workers):
            if number == self.index:
                continue
            try:
                with socket.create_connection(host_and_port(address, number),
                                              timeout=timeout):
                    pass
            except OSError:
                return number, address
        return None

    def message(self, number, cause):
        try:
            stopped = self.stopped()
        except Exception:  # noqa: BLE001 -- a damaged state file must not hide the worker
            stopped = "training stopped"
        return (f"worker {number} ({self.workers[number]}) stopped during training (this "
                f"is worker {self.index}): {cause}; {stopped}")

    def failure(self, exc):
        """A UserError naming the worker behind ``exc`` (an op error of a
        collective run) with its whole cause; None when no other worker is
        named by it or found dead."""
        remote = [int(n) for n in _REMOTE_TASK.findall(error_text(exc))]
        remote = [n for n in remote if n != self.index and n < len(self.workers)]
        number = remote[0] if remote else (self.dead_peer() or (None,))[0]
        if number is None:
            return None
        return PeerFailure(self.message(number, whole_cause(exc)))

    @contextlib.contextmanager
    def collective(self):
        """Around session runs that wait for the other workers."""
        self._runs += 1
        self._run = self._runs
        try:
            yield
        except tf.errors.OpError as exc:
            if isinstance(exc, tf.errors.OutOfRangeError):
                raise
            failure = self.failure(exc)
            if failure is None:
                raise
            raise failure from None
        finally:
            self._run = None

    def _watch(self):
        down = None  # (peer, since when, the run then waiting)
        while not self._stop.wait(self.interval):
            peer = self.dead_peer(timeout=self.interval)
            run = self._run
            if peer is None or run is None:
                down = None
            elif down is None or down[0] != peer or down[2] != run:
                down = (peer, time.monotonic(), run)
            elif time.monotonic() - down[1] >= self.grace and self._run == run:
                self.give_up(self.message(peer[0], f"its server has refused connections for "
                                                   f"{self.grace:g} s while this worker's step "
                                                   f"waits for it (its own output says why)"))
                return

    def close(self):
        self._stop.set()
        self._thread.join()


def _exit_with(message):
    """End the process from the watch thread: the main thread is blocked in
    TensorFlow, which would wait for the dead worker forever. Checkpoints
    are whole (a save's temporary files are removed by the next run)."""
    sys.stderr.write(f"\nerror: {message}\n")
    sys.stderr.flush()
    os._exit(PEER_EXIT)


class Replicas:
    """How a config's step runs: ``count`` replicas, on GPUs or CPU devices,
    in this process or (TF_CONFIG) over several worker processes."""

    def __init__(self, config, workers=False):
        """``workers``: run over the worker processes TF_CONFIG names
        (training only; ranking on several machines is --shard/--merge)."""
        self.count = config.get("replicas") or 1
        self.on_gpus = len(listed_gpus(config.get("gpu_id", ""))) > 1
        self.strategy = None
        self.target, self.chief, self._config = "", True, None
        self.watch = None
        cluster = cluster_task() if workers else None
        if cluster is not None:
            self._start_worker(config, *cluster)
            return
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

    def _start_worker(self, config, cluster, index):
        """This process as worker ``index`` of ``cluster``: a server for the
        others to reach, and the Session on it (docs/distribute.md)."""
        if config.get("replicas") and config["replicas"] > 1 and not self.on_gpus:
            raise UserError("with TF_CONFIG each worker runs one replica (or one per GPU "
                            "listed in gpu_id): drop replicas")
        self.strategy = tf1.distribute.experimental.MultiWorkerMirroredStrategy()
        self.count = self.strategy.num_replicas_in_sync
        if config["batch_size"] % self.count:
            raise UserError(f"batch_size {config['batch_size']} (the global batch) must be "
                            f"a multiple of the {self.count} replicas of the cluster")
        self._config = self.strategy.update_config_proto(_with_process_options(tf1.ConfigProto()))
        server = tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name="worker",
                                      task_index=index, config=self._config, start=True)
        timeout = config.get("worker_timeout", WORKER_TIMEOUT)
        if not timeout > 0:
            raise UserError(f"worker_timeout must be a positive number of seconds, got "
                            f"{timeout}")
        wait_for_workers(cluster["worker"], index, timeout)
        self.target, self.chief = server.target, index == 0
        self.watch = PeerWatch(cluster["worker"], index)

    def collective(self, stopped=None):
        """Around session runs that wait for the other workers: a worker that
        dies meanwhile is a one-line error naming it (``PeerWatch``), ending
        with ``stopped()``."""
        if self.watch is None:
            return contextlib.nullcontext()
        if stopped is not None:
            self.watch.stopped = stopped
        return self.watch.collective()

    def close(self):
        """Stop watching the other workers (the end of training)."""
        if self.watch is not None:
            self.watch.close()
            self.watch = None

    def scope(self):
        """Variables created under it are mirrored (a no-op for one replica)."""
        if self.strategy is None:
            return tf1.distribute.get_strategy().scope()
        return self.strategy.scope()

    def session_config(self):
        """The Session's devices: N CPU devices for CPU replicas."""
        if self._config is not None:
            return self._config
        if self.strategy is None or self.on_gpus:
            return None
        return _with_process_options(
            tf1.ConfigProto(device_count={"CPU": self.count}, allow_soft_placement=True))

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
