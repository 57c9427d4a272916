"""Training on two worker processes (MultiWorkerMirroredStrategy, TF_CONFIG
each, on loopback) steps like one replica of the whole batch. Its own module,
so that the suite's second worker process runs it beside test_replicas.py."""

import json
import os
import shutil
import socket
import re
import signal
import subprocess
import sys
import time

import pytest

import test_replicas
from helpers import REPO
from test_replicas import GRADIENT_TOLERANCE, relative_l2, step_gradients, train_run

# test_replicas.py's module fixture (records, configs, the step-1 checkpoint),
# built again for this module.
workspace = test_replicas.workspace


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for handle in sockets:
        handle.bind(("localhost", 0))
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


@pytest.mark.slow
def test_two_worker_processes_train_like_one_replica_of_the_whole_batch(workspace):
    """Both resume the same step-1 checkpoint and take one step: two worker
    processes of 4 images each, and one replica of 8 in this process. The
    first loss is the same (synchronised batch norm is batch norm), the
    step's gradient within the tolerance of two in-process replicas against
    one (test_replicas.py); only the chief writes."""
    root = workspace["root"]
    shutil.copytree(root / "init", root / "single")
    one = train_run(workspace, "single", 1, 2)
    shutil.copytree(root / "init", root / "workers")
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "tests", "worker_train.py"),
             workspace["train_config"], f"checkpoint={root / 'workers' / 'model.ckpt'}",
             "max_iteration=2", "max_to_keep=5"],
            env=dict(os.environ, TF_CONFIG=json.dumps(task)), cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [process.communicate(timeout=900) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, errors) in zip(processes, outputs):
        assert process.returncode == 0, errors[-3000:]
    losses = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    print("workers:", losses, "one replica:", one["losses"])
    assert losses[0] == losses[1]
    assert abs(losses[0][0] - one["losses"][0]) <= 1e-5 * one["losses"][0]
    gradients = step_gradients(root / "single", 2), step_gradients(root / "workers", 2)
    difference = relative_l2(*gradients, list(gradients[0]))
    print("gradient of step 2, workers against one replica:", difference)
    assert difference < GRADIENT_TOLERANCE
    assert len([name for name in os.listdir(root / "workers")
                if name.startswith("events.")]) == 2  # the init run's and the chief's


@pytest.mark.slow
# The later-step kill (a failed collective op, its cause kept) costs 90 s more;
# test_faults checks its message from the error a killed peer really raised.
@pytest.mark.parametrize("when", ["first step",
                                  pytest.param("later step", marks=pytest.mark.long)])
def test_a_worker_killed_during_training_is_named_by_the_other(workspace, when):
    """train.py on two workers; worker 1 is killed (SIGKILL) once the chief
    has started its first step (TensorFlow would then wait for it forever:
    the peer watch ends it), or after two checkpoints (a collective op fails:
    its whole cause is kept). The chief ends in one line naming worker 1."""
    run = workspace["root"] / f"killed {when}"
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    processes = []
    for index in range(2):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "train.py"), "-c", workspace["train_config"],
             "--checkpoint", str(run / "model.ckpt"), "--max_iteration", "1000",
             "--save_step", "1000" if when == "first step" else "1"],
            env=dict(os.environ, TF_CONFIG=json.dumps(task)), cwd=REPO, text=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    sign = "events.out" if when == "first step" else "model.ckpt-2.index"
    try:
        deadline = time.monotonic() + 900
        while not (run.is_dir() and any(n.startswith(sign) for n in os.listdir(run))):
            assert time.monotonic() < deadline and processes[0].poll() is None
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, errors = processes[0].communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for process in processes:
            process.kill()
    lines = [line for line in errors.splitlines() if line.startswith("error:")]
    print(when, f"{waited:.1f} s:", lines)
    assert processes[0].returncode == 1 and len(lines) == 1, errors[-3000:]
    assert waited < 60  # the watch's 10 s grace and 2 s checks
    assert re.fullmatch(re.escape(f"error: worker 1 ({cluster['worker'][1]}) stopped during "
                                  f"training (this is worker 0): ") + r".+; training stopped; "
                        r"last good checkpoint: .+", lines[0])
    if when == "later step":
        assert "remote target /job:worker/replica:0/task:1" in lines[0]
        assert lines[0].endswith(f"{run}/model.ckpt-" + lines[0].rsplit("-", 1)[1])
