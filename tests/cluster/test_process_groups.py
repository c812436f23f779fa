"""Process-group set-up from each launcher's environment, on two simulated nodes of this machine: bare Slurm
tasks (SLURM_* only), torchrun and DeepSpeed's launcher (launch/node.sh, no ssh) all end in the same group,
with every rank knowing its node; and a hung peer ends the wait after the collective timeout with a message, in
any process group (megaclone's layout groups and DeepSpeed's pipeline grid included)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from megaclone.cluster import COLLECTIVE_TIMEOUT_ENV, EXIT_PEER_FAILURE, SLURM_PORT_BASE, SLURM_PORT_SPAN

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "probe.py"
TIMEOUT = 180


def free_port(low: int = 1024, high: int = 65535) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if low <= port < high:
            return port


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the test itself may run under one)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
            "CROSS_RANK", "TORCHELASTIC_RUN_ID", COLLECTIVE_TIMEOUT_ENV)
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def records(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def wait_all(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    results = []
    for p in procs:
        stdout, _ = p.communicate(timeout=TIMEOUT)
        results.append((p.returncode, stdout))
    return results


def slurm_task(rank: int, out: Path, job_id: int, **extra: str) -> subprocess.Popen:
    """What srun --ntasks-per-node=1 would start on node `rank` of a 2-node job: no RANK, only SLURM_*."""
    env = clean_env(PROBE_OUT=str(out), SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID="0",
                    SLURM_NODEID=str(rank), SLURM_NNODES="2", SLURM_TASKS_PER_NODE="1(x2)",
                    SLURM_JOB_NODELIST="127.0.0.1,127.0.0.1", SLURM_JOB_ID=str(job_id), **extra)
    return subprocess.Popen([sys.executable, str(PROBE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def slurm_job_id() -> int:
    """A job id whose derived master port is free here."""
    return free_port(SLURM_PORT_BASE, SLURM_PORT_BASE + SLURM_PORT_SPAN) - SLURM_PORT_BASE + 7 * SLURM_PORT_SPAN


def test_bare_slurm_tasks(tmp_path: Path) -> None:
    job_id = slurm_job_id()
    extensions = tmp_path / "torch_extensions"  # where DeepSpeed would compile its CPU communication op
    results = wait_all([slurm_task(r, tmp_path, job_id, TORCH_EXTENSIONS_DIR=str(extensions)) for r in range(2)])
    assert all(code == 0 for code, _ in results), results
    assert not extensions.exists() and "built successfully" not in results[0][1]  # the op is neither built nor loaded
    for rank, record in enumerate(records(tmp_path, 2)):
        assert not record["shm_op_loaded"] and record["shm_buffers"] == []  # no 67 MB /dev/shm buffer per rank
        assert record["env"]["launcher"] == "slurm" and record["env"]["node_rank"] == rank
        assert record["torch_env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(20000 + job_id % 20000)}
        assert record["rank_sum"] == 1.0 and record["backend"] == "gloo"
        assert [n["ranks"] for n in record["report"]["nodes"]] == [[0], [1]]


def test_torchrun_two_nodes(tmp_path: Path) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
                               str(node), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                               str(port), str(PROBE)], env=clean_env(PROBE_OUT=str(tmp_path), PROBE_TP="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for node in range(2)]
    results = wait_all(procs)
    assert all(code == 0 for code, _ in results), results
    for rank, record in enumerate(records(tmp_path, 4)):
        env = record["env"]
        assert (env["launcher"], env["rank"], env["node_rank"], env["num_nodes"]) == ("torchrun", rank, rank // 2, 2)
        assert (env["local_rank"], env["local_world_size"]) == (rank % 2, 2)
        assert record["rank_sum"] == 6.0
        assert record["report"]["tp_inside_nodes"]
        assert record["lines"][1].startswith("  node 0 [") and record["lines"][1].endswith(
            "2 ranks: 0(tp0 pp0 dp0) 1(tp1 pp0 dp0)")


def test_deepspeed_launcher_per_node_without_ssh(tmp_path: Path) -> None:
    """launch/node.sh on each simulated node; one rank per node, so TP 2 must cross nodes, and the report says so."""
    port = free_port()
    env = clean_env(PROBE_OUT=str(tmp_path), PROBE_TP="2", PYTHON=sys.executable, TMPDIR=str(tmp_path))
    procs = [subprocess.Popen(["bash", str(REPO / "launch" / "node.sh"), "--nodes", "2", "--node-rank", str(node),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--procs-per-node", "1",
                               "--script", str(PROBE)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for node in range(2)]
    results = wait_all(procs)
    assert all(code == 0 for code, _ in results), results
    for rank, record in enumerate(records(tmp_path, 2)):
        env = record["env"]
        assert (env["launcher"], env["rank"], env["node_rank"], env["num_nodes"]) == ("deepspeed", rank, rank, 2)
        assert not record["report"]["tp_inside_nodes"]
        assert "tp_size=2 does not fit the 1 ranks of a node" in record["report"]["warnings"][0]


def test_hung_peer_ends_the_job_after_the_collective_timeout(tmp_path: Path) -> None:
    job_id = slurm_job_id()
    extra = {"PROBE_HANG_RANK": "1", COLLECTIVE_TIMEOUT_ENV: "4", "PROBE_CKPT": str(tmp_path / "ckpt")}
    procs = [slurm_task(r, tmp_path, job_id, **extra) for r in range(2)]
    try:
        while not (tmp_path / "rank0.json").exists() and procs[0].poll() is None:
            time.sleep(0.2)
        start = time.monotonic()
        output, _ = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
        assert procs[0].returncode == EXIT_PEER_FAILURE, output
        assert procs[1].poll() is None  # the hung peer is still there: the survivor did not wait for it
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert 3.5 < elapsed < 30, elapsed
    # It hung in the layout's pipeline group: every group made after the default one (megaclone's layout, DeepSpeed's
    # pipeline grid) has the collective timeout, not torch's 30-minute default.
    timeouts = json.loads((tmp_path / "groups0.json").read_text())
    assert len(timeouts) > 8 and set(timeouts) == {4.0}, timeouts
    assert "megaclone: rank 0 on node 0" in output and "lost contact with its peers" in output
    assert "Timed out" in output and "collective timeout (4 s, MEGACLONE_COLLECTIVE_TIMEOUT)" in output
    assert f"No complete checkpoint under {tmp_path / 'ckpt'}" in output
    assert "Traceback" not in output


def test_node_that_never_starts_ends_the_rendezvous_after_the_timeout(tmp_path: Path) -> None:
    """Rank 0 of a two-task job alone: it waits for the missing node only as long as the collective timeout."""
    proc = slurm_task(0, tmp_path, slurm_job_id(), **{COLLECTIVE_TIMEOUT_ENV: "3"})
    start = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == EXIT_PEER_FAILURE, output
    assert time.monotonic() - start < 60
    assert "megaclone: rank 0 on node 0" in output and "lost contact with its peers" in output
    assert not (tmp_path / "rank0.json").exists()
