"""Adam state files beside the weights: `optim/tpXX-ppYY.safetensors`, read slice by slice at any layout.

A file holds, for every parameter its weight file stores, `<name>.exp_avg` and `<name>.exp_avg_sq` in
fp32 with the same TP-local slice as the weight (DP-gathered, so the ZeRO stage and DP size of the run
that wrote it do not matter). The manifest's optional `optimizer` record holds Adam's step count, the
LR scheduler position and these files' digests. Because the moments are sliced exactly like the
weights, every resharding path (elastic resume, tools/reshard_expand.py) reuses the weights' code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megaclone.checkpoint.manifest import CheckpointError
from megaclone.checkpoint.shards import ShardReader, layout_file_digests, save_weight_shard

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
OPTIM_DIR = "optim"


def optim_file(tp_rank: int, pp_rank: int) -> str:
    """Path of a rank's optimizer-state file relative to the step directory."""
    return f"{OPTIM_DIR}/tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def is_optim_file(rel: str) -> bool:
    return rel.startswith(OPTIM_DIR + "/")


def moment_name(name: str, key: str) -> str:
    """`<global parameter name>.<exp_avg | exp_avg_sq>`: the tensor name inside an optimizer-state file."""
    if key not in MOMENT_KEYS:
        raise ValueError(f"optimizer state key {key!r}: expected one of {list(MOMENT_KEYS)}")
    return f"{name}.{key}"


def save_optim_shard(path: str | Path, moments: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Save {name: {exp_avg, exp_avg_sq}} (TP-local slices) as one fp32 safetensors file, atomically."""
    flat = {}
    for name, state in moments.items():
        missing = sorted(set(MOMENT_KEYS) - set(state))
        if missing:
            raise ValueError(f"save_optim_shard({path}): parameter {name} lacks optimizer state {missing}")
        for key in MOMENT_KEYS:
            flat[moment_name(name, key)] = state[key]
    return save_weight_shard(path, flat)


def optim_file_digests(ckpt_dir: str | Path, tp_size: int, pp_size: int) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of every optimizer-state file of a layout (all must exist)."""
    return layout_file_digests(ckpt_dir, tp_size, pp_size, optim_file, "optimizer-state file")


def make_optimizer_record(step: int, scheduler: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `optimizer` entry: Adam's step count, the scheduler state (JSON) and the files' digests."""
    record = {"step": int(step), "scheduler": dict(scheduler), "files": dict(files)}
    check_optimizer_record(record, "optimizer record")
    return record


def check_optimizer_record(d: Any, where: str) -> None:
    """Raise CheckpointError naming `where` unless `d` is a well-formed `optimizer` entry."""
    if not isinstance(d, dict) or not {"step", "scheduler", "files"} <= set(d):
        raise CheckpointError(f"{where}: 'optimizer' must be a mapping with keys ['step', 'scheduler', 'files'], "
                              f"got {d!r}")
    if not isinstance(d["step"], int) or d["step"] < 0:
        raise CheckpointError(f"{where}: optimizer.step must be an integer >= 0, got {d['step']!r}")
    scheduler = d["scheduler"]
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("last_epoch"), int):
        raise CheckpointError(f"{where}: optimizer.scheduler must be a mapping with an integer 'last_epoch', "
                              f"got {scheduler!r}")
    if not isinstance(d["files"], dict):
        raise CheckpointError(f"{where}: optimizer.files must be a mapping of relative path -> digest")
    for rel, entry in d["files"].items():
        if not is_optim_file(rel) or ".." in Path(rel).parts:
            raise CheckpointError(f"{where}: optimizer.files[{rel!r}] must be a path under {OPTIM_DIR}/")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{where}: optimizer.files[{rel!r}] must be {{'sha256': hex, 'bytes': int}}, "
                                  f"got {entry!r}")


class OptimStateReader(ShardReader):
    """Reads slices of Adam moments from a checkpoint of any layout, exactly as ShardReader reads weights.

    `read_moment(name, key, index)` returns the slice `index` of the global fp32 moment tensor; `read`
    takes the stored tensor name (`moment_name(name, key)`). Only the files overlapping a slice are opened.
    """

    file_kind = "optimizer-state file"
    files_key = "optimizer.files"

    def __init__(self, ckpt_path: str | Path):
        super().__init__(ckpt_path)
        record = self.manifest.optimizer
        if record is None:
            raise CheckpointError(f"checkpoint {self.path} holds no optimizer state (its manifest has no "
                                  f"'optimizer' entry): it can only start a fresh optimizer")
        self.files = dict(record["files"])
        self.step: int = int(record["step"])
        self.scheduler: dict[str, Any] = dict(record["scheduler"])
        self.param_specs = self.specs
        self.specs = {moment_name(name, key): dataclasses.replace(spec, name=moment_name(name, key))
                      for name, spec in self.param_specs.items() for key in MOMENT_KEYS}

    def file_for(self, tp_rank: int, pp_rank: int) -> str:
        return optim_file(tp_rank, pp_rank)

    def read_moment(self, name: str, key: str, index: tuple[slice, ...] | slice = ()) -> torch.Tensor:
        if name not in self.param_specs:
            raise CheckpointError(f"parameter {name!r} is not in checkpoint {self.path}")
        return self.read(moment_name(name, key), index)
