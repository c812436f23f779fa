"""Two simulated nodes on this machine, each a launcher of 2 CPU ranks, training configs/tiny.yaml for real.

1. launch/node.sh on node 0 and node 1 (DeepSpeed's launcher, --no_ssh, master 127.0.0.1): TP=2 x DP=2 with
   node-local checkpoints every 5 steps; once step 10 is saved, node 1's launcher is killed. Node 0 must stop
   with the peer-failure message and status 75 within a bounded time, and the checkpoints stay usable.
2. The same two launchers resume each node's own copy of step 5 and repeat steps 6-10 bit for bit.
3. tools/gather_checkpoint.py merges the node copies of step 10; launch/multinode.sh (the hostfile launch,
   with stand-ins for pdsh and ssh that start each "node" here) widens it x2 at TP=2 x PP=2, logs the
   preservation error and saves on the shared filesystem.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import ShardReader, load_model, read_manifest, resolve_checkpoint
from megaclone.cluster import COLLECTIVE_TIMEOUT_ENV, EXIT_PEER_FAILURE, NODE_INVENTORY_NAME

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
LAUNCH_TIMEOUT = 420  # seconds per phase; ~60-90 s here with 4 ranks on 2 cores
FAILURE_BOUND = 60  # node 0 must be gone this long after node 1 died
COMMON = ["--config", TINY, "--tp", "2", "--set", "train.lr_decay_iters=20", "train.log_interval=1",
          "train.eval_interval=0", "parallel.node_local_checkpoints=true"]

# pdsh -S -f N -w host0,host1 CMD...: CMD runs "on" every host, in a fresh login environment as over ssh (only what
# DeepSpeed exports in CMD gets through); %n is the host's index (DeepSpeed's --node_rank).
FAKE_PDSH = f"""#!{sys.executable}
import os, subprocess, sys
args, hosts = sys.argv[1:], []
while args and args[0].startswith("-"):
    flag = args.pop(0)
    if flag in ("-f", "-w"):
        value = args.pop(0)
        hosts = value.split(",") if flag == "-w" else hosts
command = " ".join(args)
login = {{k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}}
procs = [subprocess.Popen(["bash", "-c", command.replace("%n", str(i))], env=login) for i in range(len(hosts))]
sys.exit(max(p.wait() for p in procs))
"""
# ssh [-o opt] [-p port] HOST CMD...: DeepSpeed's reachability check; run CMD here.
FAKE_SSH = f"""#!{sys.executable}
import subprocess, sys
args = sys.argv[1:]
while args[0] in ("-o", "-p"):
    args = args[2:]
sys.exit(subprocess.call(["bash", "-c", " ".join(args[1:])]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(tmp: Path, **extra: str) -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "PYTHON": sys.executable, "TMPDIR": str(tmp), COLLECTIVE_TIMEOUT_ENV: "60", **extra}


def start_node(node: int, port: int, args: list[str], log: Path, tmp: Path, **env: str) -> subprocess.Popen:
    """launch/node.sh for one simulated node, in its own session so that killing it kills the whole node."""
    cmd = ["bash", str(REPO / "launch" / "node.sh"), "--nodes", "2", "--node-rank", str(node), "--master-addr",
           "127.0.0.1", "--master-port", str(port), "--procs-per-node", "2", "--", *args]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=launch_env(tmp, **env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_node(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_nodes(args_of: list[list[str]], logs: list[Path], tmp: Path) -> None:
    port = free_port()
    procs = [start_node(n, port, args_of[n], logs[n], tmp) for n in range(2)]
    try:
        for n, proc in enumerate(procs):
            assert proc.wait(timeout=LAUNCH_TIMEOUT) == 0, f"node {n} failed:\n{logs[n].read_text()[-6000:]}"
    finally:
        for proc in procs:
            kill_node(proc)


def metrics(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Interrupted:
    tmp: Path
    data_prefix: Path
    run_dir: Path
    roots: list[Path]  # each node's own checkpoint root
    node0_status: int
    node0_output: str
    seconds_to_exit: float  # from killing node 1 to node 0's launcher exiting


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Interrupted:
    tmp = tmp_path_factory.mktemp("two_nodes")
    prefix = tiny_corpus
    run_dir, roots, logs = tmp / "run", [tmp / f"node{n}" / "ckpt" for n in range(2)], [tmp / "node0.log",
                                                                                           tmp / "node1.log"]
    port = free_port()
    procs = [start_node(n, port, [*COMMON, f"data.data_prefix={prefix}", "checkpoint.save_interval=5",
                                  "--train-iters", "100000", "--run-dir", str(run_dir), "--save", str(roots[n])],
                        logs[n], tmp) for n in range(2)]
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not all(latest(root) is not None and latest(root) >= "step_00000010" for root in roots):
            running = [p.poll() is None for p in procs]
            if not all(running) or time.monotonic() > deadline:
                pytest.fail(f"no step 10 checkpoint on both nodes (running: {running}):\n" +
                            "\n".join(log.read_text()[-4000:] for log in logs))
            time.sleep(0.05)
        os.killpg(procs[1].pid, signal.SIGKILL)  # node 1 dies: its launcher and both of its ranks
        killed = time.monotonic()
        status = procs[0].wait(timeout=FAILURE_BOUND)
        seconds = time.monotonic() - killed
    finally:
        for proc in procs:
            kill_node(proc)
    return Interrupted(tmp, prefix, run_dir, roots, status, logs[0].read_text(), seconds)


def test_node_failure_ends_the_job_with_a_message(interrupted: Interrupted) -> None:
    out = interrupted.node0_output
    assert interrupted.node0_status == EXIT_PEER_FAILURE, out[-4000:]
    assert interrupted.seconds_to_exit < FAILURE_BOUND
    assert "lost contact with its peers" in out and "rank 0 on node 0" in out
    ckpt = resolve_checkpoint(interrupted.roots[0])  # node 0's last commit: complete, and named in the message
    assert f"Last complete checkpoint: {ckpt}; resume with --load {interrupted.roots[0]}" in out
    assert read_manifest(ckpt).step >= 10
    # The start-up report: two nodes of two ranks, TP groups inside them.
    assert ("cluster: 2 node(s), 4 ranks, launcher deepspeed; layout TP 2 x PP 1 x DP 2; TP groups inside nodes; "
            "collective timeout 60 s") in out
    assert "2 ranks: 2(tp0 pp0 dp1) 3(tp1 pp0 dp1)" in out
    (start,) = metrics(interrupted.run_dir, "start")
    assert [n["ranks"] for n in start["cluster"]["nodes"]] == [[0, 1], [2, 3]]


def test_each_node_holds_only_its_own_ranks_files(interrupted: Interrupted) -> None:
    for node, root in enumerate(interrupted.roots):
        step_dir = root / "step_00000010"
        inventory = json.loads((step_dir / NODE_INVENTORY_NAME).read_text())
        assert (inventory["node"], inventory["num_nodes"], inventory["ranks"]) == (node, 2, [2 * node, 2 * node + 1])
        optim = sorted(p.name for p in (step_dir / "deepspeed").glob("*optim_states.pt"))
        assert optim == [f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt",
                         f"zero_pp_rank_{node}_mp_rank_01_optim_states.pt"]  # DP rank = node here
        # Every file the node holds is in its inventory, with its checksum.
        held = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
        assert sorted(inventory["files"]) == [h for h in held if h != NODE_INVENTORY_NAME]
        with ShardReader(step_dir) as reader:  # both TP shards of the weights: each node has a replica
            reader.verify()


def test_resume_reads_each_nodes_own_copy(interrupted: Interrupted) -> None:
    resumed = interrupted.tmp / "resumed"
    resumed.mkdir()
    args = [[*COMMON, f"data.data_prefix={interrupted.data_prefix}", "--train-iters", "10", "--run-dir",
             str(resumed / "run"), "--load", str(interrupted.roots[n] / "step_00000005"), "--save",
             str(resumed / f"node{n}")] for n in range(2)]
    run_nodes(args, [resumed / "node0.log", resumed / "node1.log"], interrupted.tmp)
    before = {r["step"]: r["loss"] for r in metrics(interrupted.run_dir, "train")}
    again = {r["step"]: r["loss"] for r in metrics(resumed / "run", "train")}
    assert sorted(again) == list(range(6, 11))
    assert again == {s: before[s] for s in range(6, 11)}  # bit for bit
    for n in range(2):  # the same fp32 weights as the interrupted run at step 10, on both nodes
        assert read_manifest(resumed / f"node{n}").files == read_manifest(interrupted.roots[0] / "step_00000010").files


@torch.no_grad()
def test_gathered_checkpoint_widens_through_a_hostfile_launch(interrupted: Interrupted) -> None:
    tmp = interrupted.tmp
    shared = tmp / "shared" / "ckpt"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gather_checkpoint.py"), "--output", str(shared),
                           "--step", "10", *map(str, interrupted.roots)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    step_dir = resolve_checkpoint(shared)
    assert step_dir.name == "step_00000010" and not (step_dir / NODE_INVENTORY_NAME).exists()
    assert len(list((step_dir / "deepspeed").glob("zero_pp_rank_*_optim_states.pt"))) == 4  # both nodes' shards
    small, cfg = load_model(shared)

    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, text in (("pdsh", FAKE_PDSH), ("ssh", FAKE_SSH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)
    hostfile = tmp / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    wide_run, wide_ckpt = tmp / "wide", tmp / "shared" / "wide"
    cmd = ["bash", str(REPO / "launch" / "multinode.sh"), "--hostfile", str(hostfile), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--", "--init-from", str(shared), "--hyperclone", "2", "--config", TINY,
           "--tp", "2", "--pp", "2", "--train-iters", "4", "--run-dir", str(wide_run), "--save", str(wide_ckpt),
           "--set", f"data.data_prefix={interrupted.data_prefix}", "train.eval_interval=2"]
    env = launch_env(tmp, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # MEGACLONE_COLLECTIVE_TIMEOUT reached the ranks through multinode.sh although "ssh" passes no environment.
    assert ("cluster: 2 node(s), 4 ranks, launcher deepspeed; layout TP 2 x PP 2 x DP 1; TP groups inside nodes; "
            "collective timeout 60 s") in proc.stdout
    (clone,) = metrics(wide_run, "clone")
    assert clone["preservation_rel_error"] <= 1e-4 and clone["factor"] == 2
    assert clone["wide_loss"] == pytest.approx(clone["small_loss"], rel=1e-5)
    assert sorted(r["step"] for r in metrics(wide_run, "train")) == [1, 2, 3, 4]
    (start,) = metrics(wide_run, "start")
    assert start["config"]["clone"]["init_from"] == str(shared)
    # Saved by both "nodes" on the shared filesystem: one checkpoint, weights of every (TP, PP) shard.
    manifest = read_manifest(wide_ckpt)
    assert (manifest.step, manifest.tp_size, manifest.pp_size) == (4, 2, 2)
    wide, wide_cfg = load_model(wide_ckpt)
    assert wide_cfg.hidden_size == 2 * cfg.hidden_size
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(wide(tokens)).all() and not torch.equal(wide(tokens), small(tokens))  # trained on
