"""The Slurm template, rendered for 2 nodes x 8 GPUs and run by bash under stand-ins for srun and scontrol: one
DeepSpeed launcher per node, with the node's rank, the first node as master, the same port and world everywhere,
and pretrain.py's arguments passed through intact; rendered with --requeue, a job whose node failed puts itself
back in the queue and resumes from its own --save root."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from megaclone.cluster import expand_hostlist, slurm_master_port

REPO = Path(__file__).resolve().parents[2]
RENDER = REPO / "launch" / "render_slurm.py"
JOB_ID = 987654
PRETRAIN_ARGS = ["--config", "configs/gpt-1.3b.yaml", "--tp", "8", "--save", "/shared/ckpt dir",
                 "--set", "train.lr=3e-4", "data.data_prefix=/shared/data/corpus"]

# srun: run the command once per node of the allocation, as Slurm would, with that task's variables.
FAKE_SRUN = f"""#!{sys.executable}
import json, os, subprocess, sys
args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
with open(os.path.join(os.environ["RECORD_DIR"], "srun.json"), "w") as f:
    json.dump({{"options": opts, "command": args}}, f)
nodes = int(os.environ["SLURM_JOB_NUM_NODES"])
procs = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i),
                                      "SLURM_LOCALID": "0", "SLURM_NTASKS": str(nodes), "SLURM_NNODES": str(nodes),
                                      "SLURM_GPUS_ON_NODE": "8"}}) for i in range(nodes)]
sys.exit(max(p.wait() for p in procs))
"""
FAKE_SCONTROL = f"""#!{sys.executable}
import os, sys
sys.path.insert(0, {str(REPO)!r})
from megaclone.cluster import expand_hostlist
if sys.argv[1] == "requeue":
    with open(os.path.join(os.environ["RECORD_DIR"], "requeued"), "a") as f:
        f.write(sys.argv[2] + "\\n")
    sys.exit(0)
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(expand_hostlist(sys.argv[3])))
"""
# The interpreter node.sh starts DeepSpeed's launcher with: record what it was given instead.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
argv = sys.argv[1:]
hostfile = open(argv[argv.index("--hostfile") + 1]).read()
keys = ("MASTER_ADDR", "MASTER_PORT", "MEGACLONE_COLLECTIVE_TIMEOUT", "NUM_NODES", "PROCS_PER_NODE", "SLURM_NODEID")
record = {{"argv": argv, "hostfile": hostfile, "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keys}}}}
node = argv[argv.index("--node_rank") + 1]
with open(os.path.join(os.environ["RECORD_DIR"], f"launcher-{{node}}.json"), "w") as f:
    json.dump(record, f)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))  # what the node's training ended with
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def render(tmp_path: Path, *options: str, args: list[str] = PRETRAIN_ARGS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), *options, "--", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def run_job(job: Path, records: Path, **env: str) -> subprocess.CompletedProcess:
    """bash JOB as Slurm would run it on nodes gpu07 and gpu08, with stand-ins for srun, scontrol and the launcher."""
    bin_dir = records.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    records.mkdir(exist_ok=True)
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    _executable(bin_dir / "python-stub", FAKE_PYTHON)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(records),
           "PYTHON": str(bin_dir / "python-stub"), "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_NUM_NODES": "2", "TMPDIR": str(records.parent), **env}
    return subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=60)


def test_rendered_for_two_nodes_of_eight_gpus(tmp_path: Path) -> None:
    job = tmp_path / "job.sbatch"
    done = render(tmp_path, "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--time", "2:00:00",
                  "--collective-timeout", "300", "--output", str(job))
    assert done.returncode == 0, done.stderr
    script = job.read_text()
    assert "{{" not in script and os.access(job, os.X_OK)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=megaclone", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                          "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --time=2:00:00",
                          "#SBATCH --output=logs/%x-%j.out", "#SBATCH --partition=gpu"]

    records = tmp_path / "records"
    run = run_job(job, records)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (records / "requeued").exists()  # rendered without --requeue
    assert f"master gpu07:{slurm_master_port(JOB_ID)}" in run.stdout

    srun = json.loads((records / "srun.json").read_text())
    assert {"--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"} <= set(srun["options"])
    assert srun["command"][:2] == ["bash", str(REPO / "launch" / "node.sh")]
    launchers = sorted(records.glob("launcher-*.json"))
    assert [p.name for p in launchers] == ["launcher-0.json", "launcher-1.json"]
    for node, path in enumerate(launchers):
        record = json.loads(path.read_text())
        argv = record["argv"]
        i = argv.index(str(REPO / "launch" / "pretrain.py"))
        assert argv[:2] == ["-m", "deepspeed.launcher.runner"]
        assert argv[i + 1:] == PRETRAIN_ARGS  # quoting survived: "/shared/ckpt dir" is one argument
        flags = argv[2:i]
        assert flags[flags.index("--node_rank") + 1] == str(node) and "--no_ssh" in flags
        assert flags[flags.index("--master_addr") + 1] == "gpu07"
        assert flags[flags.index("--master_port") + 1] == str(slurm_master_port(JOB_ID))
        assert record["hostfile"].splitlines() == ["node0 slots=8", "node1 slots=8"]
        assert record["cwd"] == str(tmp_path.resolve())  # relative paths refer to where the job was rendered
        assert record["env"] == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(slurm_master_port(JOB_ID)),
                                 "MEGACLONE_COLLECTIVE_TIMEOUT": "300", "NUM_NODES": "2", "PROCS_PER_NODE": "8",
                                 "SLURM_NODEID": str(node)}
    assert expand_hostlist("gpu[07-08]")[0] == "gpu07"


def test_requeue_after_a_node_failure_resumes_from_the_save_root(tmp_path: Path) -> None:
    """--requeue 2: Slurm may requeue the job, and the job requeues itself when a node failed (exit 75), at most
    twice; every start runs the same command, whose --load is its --save root (docs/cluster.md)."""
    job = tmp_path / "job.sbatch"
    done = render(tmp_path, "--nodes", "2", "--gpus-per-node", "8", "--requeue", "2", "--output", str(job))
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --requeue" in job.read_text().splitlines()
    for restart, status, requeued in ((0, 75, True), (1, 75, True), (2, 75, False), (0, 1, False), (0, 0, False)):
        records = tmp_path / f"records-{restart}-{status}"
        run = run_job(job, records, FAKE_EXIT=str(status), SLURM_RESTART_COUNT=str(restart))
        assert run.returncode == status, run.stdout + run.stderr
        assert (records / "requeued").is_file() == requeued, (restart, status)
        if requeued:
            assert (records / "requeued").read_text() == f"{JOB_ID}\n"
            assert f"requeueing job {JOB_ID} (restart {restart} of 2)" in run.stdout
        argv = json.loads((records / "launcher-1.json").read_text())["argv"]
        assert argv[argv.index(str(REPO / "launch" / "pretrain.py")) + 1:] == [*PRETRAIN_ARGS, "--load",
                                                                               "/shared/ckpt dir"]


@pytest.mark.parametrize("args, message", [
    (["--config", "c.yaml"], "--requeue needs --save DIR"),
    (["--save", "/ckpt", "--load", "/other"], "--requeue: --load /other must be the --save root /ckpt"),
])
def test_requeue_needs_to_resume_its_own_saves(tmp_path: Path, args: list[str], message: str) -> None:
    done = render(tmp_path, "--nodes", "2", "--gpus-per-node", "8", "--requeue", "1", "--output",
                  str(tmp_path / "job.sbatch"), args=args)
    assert done.returncode == 2 and message in done.stderr
    assert list(tmp_path.iterdir()) == []
    assert render(tmp_path, "--nodes", "2", "--gpus-per-node", "8", "--requeue", "1",
                  args=["--save=/ckpt", "--load", "/ckpt/"]).returncode == 0  # the same root, spelled otherwise


@pytest.mark.parametrize("options, message", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes=0 must be >= 1"),
    (["--nodes", "2", "--gpus-per-node", "8", "--time", "soon"], "--time='soon'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--partition", "a b"], "--partition='a b'"),
    (["--nodes", "2", "--gpus-per-node", "8", "--template", "missing.sbatch"], "missing.sbatch does not exist"),
])
def test_bad_options_exit_2_and_write_nothing(tmp_path: Path, options: list[str], message: str) -> None:
    done = render(tmp_path, *options, "--output", str(tmp_path / "job.sbatch"))
    assert done.returncode == 2 and message in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_node_sh_refuses_incomplete_arguments(tmp_path: Path) -> None:
    node_sh = str(REPO / "launch" / "node.sh")
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}
    for args, message in ((["--nodes", "2", "--master-addr", "h", "--procs-per-node", "2"], "--node-rank"),
                          (["--nodes", "2", "--node-rank", "2", "--master-addr", "h", "--procs-per-node", "2"],
                           "--node-rank=2 must be < the number of nodes (2)"),
                          (["--nodes", "2", "--node-rank", "0", "--procs-per-node", "2"], "--master-addr"),
                          (["--nodes", "2", "--node-rank", "0", "--master-addr", "h"], "--procs-per-node"),
                          (["--hostfile", "nope", "--node-rank", "0", "--master-addr", "h"], "nope does not exist")):
        done = subprocess.run(["bash", node_sh, *args, "--", "--config", "x"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
