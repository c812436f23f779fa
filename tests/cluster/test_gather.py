"""tools/gather_checkpoint.py: node-local copies merge into one complete checkpoint only when they belong together
and every file matches the checksum its node recorded; otherwise it fails naming the directory and writes nothing."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from megaclone.checkpoint import (
    CheckpointError,
    ShardReader,
    file_digest,
    load_full_state,
    resolve_checkpoint,
    write_weights_checkpoint,
)
from megaclone.cluster import NODE_INVENTORY_NAME, RankPlace, build_cluster_report, write_node_inventory
from megaclone.config import ModelConfig
from megaclone.spec import build_param_specs

REPO = Path(__file__).resolve().parents[2]
CFG = ModelConfig(vocab_size=64, vocab_multiple=64, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8)


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gather_checkpoint", REPO / "tools" / "gather_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gather = load_tool()


def node_copies(tmp: Path, step: int = 3) -> tuple[Path, list[Path]]:
    """A TP=2 checkpoint and two node-local copies of it: node n holds TP shard n and a file of its own rank."""
    generator = torch.Generator().manual_seed(0)
    state = {s.name: torch.randn(s.shape, generator=generator) for s in build_param_specs(CFG)}
    full = write_weights_checkpoint(tmp / "full", CFG, state, tp_size=2, pp_size=1, step=step)
    report = build_cluster_report([RankPlace(0, "a", 0, 0), RankPlace(1, "b", 1, 0)], "env", tp_size=1, pp_size=1)
    roots = []
    for node in range(2):
        root = tmp / f"node{node}"
        shutil.copytree(full.parent, root)
        step_dir = resolve_checkpoint(root)
        (step_dir / "weights" / f"tp{1 - node:02d}-pp00.safetensors").unlink()
        (step_dir / "deepspeed").mkdir()
        (step_dir / "deepspeed" / f"rank{node}.pt").write_bytes(bytes([node]) * 100)
        digests = {p.relative_to(step_dir).as_posix(): file_digest(p) for p in step_dir.rglob("*") if p.is_file()}
        write_node_inventory(step_dir, report, node, step, digests)
        roots.append(root)
    return full, roots


def test_gather_merges_the_node_copies(tmp_path: Path) -> None:
    full, roots = node_copies(tmp_path)
    out = gather.gather_checkpoint(roots, tmp_path / "shared")
    assert out == tmp_path / "shared" / "step_00000003" and resolve_checkpoint(tmp_path / "shared") == out
    held = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert held == ["deepspeed/rank0.pt", "deepspeed/rank1.pt", "manifest.json", "weights/tp00-pp00.safetensors",
                    "weights/tp01-pp00.safetensors"]
    assert not (out / NODE_INVENTORY_NAME).exists()
    with ShardReader(out) as reader:
        reader.verify()
    want, got = load_full_state(full), load_full_state(out)
    assert all(torch.equal(want[name], got[name]) for name in want)
    # Each node alone lacks a TP shard: only the gathered copy is complete.
    with pytest.raises(CheckpointError, match="missing shard file"), ShardReader(roots[0]) as reader:
        reader.verify()


def test_missing_node(tmp_path: Path) -> None:
    _, roots = node_copies(tmp_path)
    with pytest.raises(CheckpointError, match=r"node\(s\) \[1\] of 2 missing"):
        gather.gather_checkpoint(roots[:1], tmp_path / "shared")
    with pytest.raises(CheckpointError, match="both the copy of node 0"):
        gather.gather_checkpoint([roots[0], roots[0]], tmp_path / "shared")
    assert not (tmp_path / "shared").exists()


def test_corrupted_file_is_refused_and_nothing_is_committed(tmp_path: Path) -> None:
    _, roots = node_copies(tmp_path)
    (resolve_checkpoint(roots[1]) / "deepspeed" / "rank1.pt").write_bytes(bytes([7]) * 100)  # same size
    with pytest.raises(CheckpointError, match=r"checksum mismatch for .*node1/step_00000003/deepspeed/rank1.pt"):
        gather.gather_checkpoint(roots, tmp_path / "shared")
    assert list((tmp_path / "shared").iterdir()) == []  # no step directory, no `latest`, no temporary left


def test_copies_of_different_checkpoints_are_refused(tmp_path: Path) -> None:
    _, roots = node_copies(tmp_path / "a", step=3)
    _, other = node_copies(tmp_path / "b", step=4)
    with pytest.raises(CheckpointError, match=r"not copies of one checkpoint: their manifests differ in \['step'\]"):
        gather.gather_checkpoint([roots[0], other[1]], tmp_path / "shared")


def test_weight_file_held_by_no_node(tmp_path: Path) -> None:
    _, roots = node_copies(tmp_path)
    step_dir = resolve_checkpoint(roots[1])
    (step_dir / "weights" / "tp01-pp00.safetensors").unlink()
    inventory = step_dir / NODE_INVENTORY_NAME
    inventory.write_text(inventory.read_text().replace("weights/tp01-pp00.safetensors", "weights/gone"))
    with pytest.raises(CheckpointError, match="lists weights/tp01-pp00.safetensors, but no node holds"):
        gather.gather_checkpoint(roots, tmp_path / "shared")


def test_not_a_node_local_copy(tmp_path: Path) -> None:
    full, _ = node_copies(tmp_path)
    with pytest.raises(CheckpointError, match="is not a node-local checkpoint copy"):
        gather.gather_checkpoint([full], tmp_path / "shared")


def test_cli_error_exits_2(tmp_path: Path) -> None:
    """(tests/cluster/test_two_nodes.py runs the tool on a real run's node copies.)"""
    _, roots = node_copies(tmp_path)
    done = subprocess.run([sys.executable, str(REPO / "tools" / "gather_checkpoint.py"), "--output",
                           str(tmp_path / "shared"), "--step", "3", str(roots[0])], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "gather_checkpoint.py: error: node(s) [1] of 2 missing" in done.stderr
