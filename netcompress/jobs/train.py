"""Training loop (train.py): resume, run, save, NaN guard; the graph it runs
(Adam, polynomial decay) is netcompress/graphs/training.py."""

import contextlib
import functools
import math
import os
import re
import shutil
import socket
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from common import files, outputs
from netcompress.formats import checkpoints
from netcompress.graphs import op_errors
from netcompress.formats.checkpoint_paths import STATE_FILE, checkpoint_prefix, \
    input_checkpoint_files, latest_of_run
from common.errors import UserError, error_line, one_line
from netcompress.graphs.training import TrainGraph

tf1 = tf.compat.v1


def check_resumable(latest, graph):
    """The checkpoint to resume holds every variable of the training graph
    (model, Adam slots, global step) with the same shapes; its description
    (if any; training_model compared it) is not restored."""
    shapes = checkpoints.checkpoint_shapes(latest)
    for variable in graph.restored_variables:
        name = checkpoints.checkpoint_key(variable.name)
        want = tuple(variable.shape.as_list())
        if shapes.get(name) != want:
            found = "missing" if name not in shapes else f"{list(shapes[name])} there"
            raise UserError(f"cannot resume from {latest}: it is not a training checkpoint "
                            f"of this model ({name} {list(want)} is {found}); give an empty "
                            f"or new checkpoint directory (to start from its weights, set "
                            f"intialize: {latest})")


def check_paths(config, directory):
    """Before any work: the checkpoint directory can be written and nothing
    the run writes replaces an input."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"checkpoint {config['checkpoint']!r}: {directory!r} is a file, not "
                        f"a directory")
    inputs = {key: [config[key]] for key in ("train_data", "model_def", "mask")
              if config.get(key)}
    inputs["intialize"] = input_checkpoint_files(config.get("initialize"))
    outputs.check_outputs({"checkpoint": [os.path.join(directory, STATE_FILE)]},
                          inputs)
    if not 1 <= config["max_to_keep"]:
        raise UserError(f"max_to_keep must be at least 1, got {config['max_to_keep']}")


def _initialise(session, graph, config, directory, prefix, log):
    """Resume from the newest checkpoint in `directory`, else initialise
    (and restore what matches from `initialize`). Returns the start step."""
    latest = latest_of_run(directory, prefix)
    session.run(graph.initializer)
    if latest is not None:
        check_resumable(latest, graph)
        try:
            graph.resume_saver.restore(session, latest)
        except (ValueError, tf.errors.OpError) as exc:
            # check_resumable read the index; the data file may still be cut short.
            raise UserError(f"cannot resume from {latest}: it is damaged ({_reason(exc)}); "
                            f"give a new checkpoint directory (to start from an older "
                            f"checkpoint of the run, set intialize to it)") from None
        step = int(session.run(graph.global_step))
        log(f"resuming from {latest} at step {step}")
        if config.get("initialize"):
            # A resume restores every variable; say so rather than ignore the
            # setting silently (docs/errors.md).
            log(f"warning: intialize {config['initialize']} is not used: resuming restores "
                f"every variable from {latest} (to start from intialize, give an empty or "
                f"new checkpoint directory)")
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


class EventsWriter:
    """A TensorBoard events file written in this thread: a failed write (disk
    full) raises here, once, where tf1.summary.FileWriter's writer thread
    printed a traceback per event (docs/errors.md)."""

    def __init__(self, path, graph=None):
        from tensorflow.core.util import event_pb2

        self._event = event_pb2.Event
        self.path = path
        self._writer = tf.io.TFRecordWriter(path)
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))
        if graph is not None:
            self._write(self._event(wall_time=time.time(),
                                    graph_def=graph.as_graph_def().SerializeToString()))

    def add_summary(self, summary, step):
        """``summary``: a serialised Summary (what a session run of a merged
        summary op returns)."""
        event = self._event(wall_time=time.time(), step=int(step))
        event.summary.ParseFromString(summary)
        self._write(event)

    def _write(self, event):
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def close(self):
        # Every event was flushed as written: a failure here loses nothing.
        with contextlib.suppress(OSError, tf.errors.OpError):
            self._writer.close()


def _events_path(directory):
    """A new events file name, as TensorBoard looks for them."""
    return os.path.join(directory, f"events.out.tfevents.{int(time.time())}."
                                   f"{socket.gethostname()}.{os.getpid()}")


def summary_writer(config, directory, graph):
    """The TensorBoard writer; the graph only when the config asks
    (``write_graph``): it can be far larger than the model (README.md), and
    retraining stages never ask."""
    path = _events_path(directory)
    try:
        return EventsWriter(path, graph if config.get("write_graph") else None)
    except (OSError, tf.errors.OpError) as exc:
        raise UserError(f"cannot write TensorBoard events {path}: {_reason(exc)}") from None


def _saver_leftovers(directory, prefix):
    """What killed saves of this run left in ``directory`` (TensorFlow's
    Saver writes none of it through common/files.py): temporary files of a
    save (``PREFIX-STEP.data-*.tempstate*``, ``.index.tempstate*``), the
    part files of a sharded save (``PREFIX-STEP_temp*/``), the state file's
    ``checkpoint.tmp*``, and ``.data`` files without their ``.index`` (a
    save killed before its index, a rotation killed after it): no reader
    can open any of them (docs/outputs.md)."""
    step = re.escape(os.path.basename(prefix)) + r"-\d+"
    patterns = [re.compile(step + r"\.(data-\d{5}-of-\d{5}|index)\.tempstate\d*"),
                re.compile(step + r"_temp(_[0-9a-f]{32})?"),
                re.compile(re.escape(STATE_FILE) + r"\.tmp[0-9a-f]{32}")]
    data = re.compile(f"({step})" + r"\.data-\d{5}-of-\d{5}")
    found = []
    for name in sorted(os.listdir(directory)):
        orphan = data.fullmatch(name)
        if any(p.fullmatch(name) for p in patterns) or (
                orphan and not os.path.exists(os.path.join(directory,
                                                           orphan.group(1) + ".index"))):
            found.append(os.path.join(directory, name))
    return found


@contextlib.contextmanager
def _run_directory(directory, prefix, chief, log):
    """The checkpoint directory, locked for this run when it writes there
    (the chief): another training run into it is refused, and what killed
    runs left there is removed first (docs/outputs.md)."""
    files.make_directory(directory)
    if not chief:
        yield
        return
    busy = (f"checkpoint directory {directory} is in use by another training run (it "
            f"holds the directory's lock): wait for it to end, or give another checkpoint "
            f"directory")
    with files.directory_lock(directory, busy) as locked:
        if locked:
            files.remove_leftovers(directory)
            leftovers = _saver_leftovers(directory, prefix)
            for path in leftovers:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    files.remove_quietly(path)
            if leftovers:
                log(f"removed {len(leftovers)} leftover file(s) of an interrupted save in "
                    f"{directory} ({os.path.basename(leftovers[0])}"
                    f"{', ...' if len(leftovers) > 1 else ''})")
        yield


def _stopped(directory, prefix):
    """What a failure mid-training ends its message with."""
    last = latest_of_run(directory, prefix)
    return f"training stopped; last good checkpoint: {last or 'none saved yet'}"


def _diverged(what, directory, prefix):
    return UserError(f"{what}: {_stopped(directory, prefix)} (lower learning_rate?)")


def _save_if_finite(session, graph, directory, prefix, step, write=True):
    """Save only finite variables (batch-norm statistics included): the
    newest checkpoint is then always a good one, whatever max_to_keep
    rotates away."""
    if not session.run(graph.all_finite):
        raise _diverged(f"variables are not finite after step {step}", directory, prefix)
    if write:
        try:
            # No .meta graph: every reader rebuilds the graph from the
            # model_def, and serialising the training graph at every save
            # cost more than the save itself (docs/outputs.md).
            graph.saver.save(session, prefix, global_step=step, write_meta_graph=False)
        except (OSError, ValueError, tf.errors.OpError) as exc:
            # Disk full, the directory gone or made unwritable (docs/errors.md).
            raise UserError(f"cannot write checkpoint {prefix}-{step}: {_reason(exc)}; "
                            f"{_stopped(directory, prefix)}") from None


def _reason(exc):
    """An OS or TensorFlow error in one line: its errno text, or TensorFlow's
    own message without the graph-execution frame around it."""
    if getattr(exc, "strerror", None):
        return exc.strerror
    return error_line(exc) if isinstance(exc, tf.errors.OpError) else one_line(exc)


def train(config, log=print, seed=None, progress=True, dropout=True):
    """Train per config; returns a dict with the final step and loss history.
    ``dropout``: False only for tests (TrainGraph)."""
    directory, prefix = checkpoint_prefix(config["checkpoint"])
    check_paths(config, directory)
    graph = TrainGraph(config, seed=seed, dropout=dropout)
    max_iteration, save_step = config["max_iteration"], config["save_step"]
    history, data_history = [], []
    replicas = graph.replicas
    # Several workers: one that dies is named in one line (netcompress/graphs/replicas.py).
    collective = functools.partial(replicas.collective, lambda: _stopped(directory, prefix))
    with contextlib.ExitStack() as stack:
        stack.callback(replicas.close)
        stack.enter_context(_run_directory(directory, prefix, replicas.chief, log))
        with collective():
            session = stack.enter_context(tf1.Session(replicas.target, graph=graph.graph,
                                                      config=replicas.session_config()))
            step = _initialise(session, graph, config, directory, prefix, log)
            if graph.data_initializer is not None:
                session.run(graph.data_initializer)
        if step >= max_iteration:
            log(f"nothing to do: step {step} >= max_iteration {max_iteration}")
            return {"step": step, "losses": history, "data_losses": data_history,
                    "checkpoint": tf1.train.latest_checkpoint(directory)}
        # Several workers: only the chief writes (they share the directory).
        writer = summary_writer(config, directory, graph.graph) if replicas.chief else None
        bar = tqdm(total=max_iteration, initial=step, desc="train", unit="step", mininterval=2,
                   disable=not progress, dynamic_ncols=True)
        try:
            while step < max_iteration:
                with op_errors.reported(config["train_data"], graph.graph), collective():
                    _, loss, data_loss, learning_rate, summary = session.run(
                        [graph.train_op, graph.loss, graph.data_loss, graph.learning_rate,
                         graph.summaries])
                if not math.isfinite(loss):
                    raise _diverged(f"loss is {loss} at step {step + 1}", directory, prefix)
                step += 1
                history.append(float(loss))
                data_history.append(float(data_loss))
                bar.update(1)
                if step % config["skip_step"] == 0 or step == max_iteration:
                    recent = slice(-config["skip_step"], None)
                    bar.set_postfix(loss=f"{np.mean(history[recent]):.4f}",
                                    data_loss=f"{np.mean(data_history[recent]):.4f}",
                                    lr=f"{learning_rate:.2e}")
                    if writer is not None:
                        try:
                            writer.add_summary(summary, step)
                        except (OSError, tf.errors.OpError) as exc:
                            raise UserError(f"cannot write TensorBoard events {writer.path}: "
                                            f"{_reason(exc)}; {_stopped(directory, prefix)}"
                                            ) from None
                if step % save_step == 0 or step == max_iteration:
                    _save_if_finite(session, graph, directory, prefix, step,
                                    write=replicas.chief)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
    log(f"saved {prefix}-{step}")
    return {"step": step, "losses": history, "data_losses": data_history,
            "checkpoint": f"{prefix}-{step}"}
