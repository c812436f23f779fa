"""A node that hangs (SIGSTOP: alive, holding its sockets, never answering) ends the job like a dead one does.

Two simulated nodes of 2 CPU ranks each (launch/node.sh, as in test_two_nodes.py) train configs/tiny.yaml at
TP=2 x DP=2 with a 10 s collective timeout; once a checkpoint is committed, node 1 is stopped. Node 0's ranks wait
in the data-parallel all-reduce, a group megaclone makes after the default one: they must give up after the
timeout plus a few seconds, naming the last complete checkpoint, and node 0 must exit 75.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from megaclone.checkpoint import resolve_checkpoint
from megaclone.cluster import EXIT_PEER_FAILURE
from tests.cluster.test_two_nodes import COLLECTIVE_TIMEOUT_ENV, TINY, free_port, kill_node, latest, start_node

TIMEOUT_S = 10
GIVE_UP_BOUND_S = TIMEOUT_S + 5  # node 0's ranks print why and exit (measured: 10.1 s after the stop)
# ... and its DeepSpeed launcher notices (it polls once a second), ends the node's other rank and exits with the
# rank's status: measured 16 s after the stop at load average 20 on 2 cores, once 20.7 s.
EXIT_BOUND_S = 30
START_BOUND_S = 300  # launching 4 ranks on a busy 2-core machine


def test_stopped_node_ends_the_job_within_the_timeout(tmp_path: Path, tiny_corpus: Path) -> None:
    root = tmp_path / "ckpt"
    args = ["--config", TINY, "--tp", "2", "--train-iters", "100000", "--run-dir", str(tmp_path / "run"),
            "--save", str(root), "--set", f"data.data_prefix={tiny_corpus}", "checkpoint.save_interval=1",
            "checkpoint.keep_last=2", "train.eval_interval=0"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    port = free_port()
    procs = [start_node(n, port, args, logs[n], tmp_path, **{COLLECTIVE_TIMEOUT_ENV: str(TIMEOUT_S)})
             for n in range(2)]
    try:
        deadline = time.monotonic() + START_BOUND_S
        while latest(root) is None:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                "\n".join(log.read_text()[-3000:] for log in logs)
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGSTOP)  # node 1 hangs: its launcher and both ranks
        stopped, noticed = time.monotonic(), None
        while procs[0].poll() is None and time.monotonic() < stopped + EXIT_BOUND_S + 30:
            if noticed is None and "lost contact" in logs[0].read_text():
                noticed = time.monotonic() - stopped  # a rank gave up (printed before it exits)
            time.sleep(0.05)
        status, seconds = procs[0].poll(), time.monotonic() - stopped
    finally:
        for proc in procs:
            kill_node(proc)  # SIGKILL ends stopped processes too
    out = logs[0].read_text()
    assert status == EXIT_PEER_FAILURE, out[-4000:]
    assert noticed is not None and TIMEOUT_S - 1 < noticed < GIVE_UP_BOUND_S, (noticed, seconds)
    assert seconds < EXIT_BOUND_S, (noticed, seconds)
    assert "lost contact with its peers" in out and f"collective timeout ({TIMEOUT_S} s" in out
    assert f"Last complete checkpoint: {resolve_checkpoint(root)}; resume with --load {root}." in out
