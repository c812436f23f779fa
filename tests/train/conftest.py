"""Shared fixtures of the training tests: real `deepspeed` launches of launch/pretrain.py on CPU.

Launches are slow (seconds each), so one session-scoped run trains the tiny small checkpoint (TP=2, on
the default corpus it builds) and every other launch reuses its token shards and its checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = ROOT / "launch" / "pretrain.py"
TINY = ROOT / "configs" / "tiny.yaml"
LAUNCH_TIMEOUT = 300  # seconds; a tiny run takes ~15 s, the first on a fresh machine also builds DeepSpeed's shm op


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a launcher sets for its ranks; a test process must never pass its own on to a new launch.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CROSS_RANK", "CROSS_SIZE", "NODE_RANK", "GROUP_RANK")


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process calls of launch/pretrain.py's main() export torch's rank variables: undo that after each test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def launch(args: list[str], num_procs: int = 2, timeout: int = LAUNCH_TIMEOUT,
           check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N launch/pretrain.py ARGS` (plain `python` for one process); output captured.

    The `deepspeed` command is `python -m deepspeed.launcher.runner`; calling the module pins this interpreter.
    """
    if num_procs == 1:
        cmd = [sys.executable, str(PRETRAIN), *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs), "--master_port",
               str(_free_port()), str(PRETRAIN), *args]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{output}")
    return proc


def metrics(run_dir: Path, kind: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir, "train")}


@dataclass(frozen=True)
class SmallRun:
    run_dir: Path
    ckpt: Path  # checkpoint root
    data_prefix: Path  # token shards the run built; later launches reuse them

    def data_args(self) -> list[str]:
        return ["--set", f"data.data_prefix={self.data_prefix}"]


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    """configs/tiny.yaml at TP=2 for 30 steps, checkpoints every 15: the source of every cloning test."""
    run_dir = tmp_path_factory.mktemp("small")
    ckpt = run_dir / "ckpt"
    launch(["--config", str(TINY), "--tp", "2", "--run-dir", str(run_dir), "--save", str(ckpt),
            "--set", "checkpoint.save_interval=15"])
    return SmallRun(run_dir, ckpt, run_dir / "data" / "corpus")
