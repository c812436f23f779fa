"""Adam state files beside the weights: `optim/tpXX-ppYY.safetensors`, read slice by slice at any layout.

A file holds, for every parameter its weight file stores, `<name>.exp_avg` and `<name>.exp_avg_sq` in
fp32 with the same TP-local slice as the weight (DP-gathered, so the ZeRO stage and DP size of the run
that wrote it do not matter). The manifest's optional `optimizer` record holds Adam's step count, the
LR scheduler position and these files' digests. Because the moments are sliced exactly like the
weights, every resharding path (elastic resume, tools/reshard_expand.py) reuses the weights' code.

The record is validated where every manifest is read, so `OPTIM_DIR`, `is_optim_file` and
`check_optimizer_record` are defined in `checkpoint.manifest` (which this module's reader builds on and
therefore cannot be imported by) and exported from here with the rest of the format.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from megaclone.checkpoint.manifest import OPTIM_DIR, CheckpointError, check_optimizer_record, is_optim_file
from megaclone.checkpoint.shards import ShardReader, layout_file_digests, save_weight_shard

__all__ = ["MOMENT_KEYS", "OPTIM_DIR", "OptimStateReader", "check_optimizer_record", "is_optim_file",
           "make_optimizer_record", "moment_name", "optim_file", "optim_file_digests", "save_optim_shard"]

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


def optim_file(tp_rank: int, pp_rank: int) -> str:
    """Path of a rank's optimizer-state file relative to the step directory."""
    return f"{OPTIM_DIR}/tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


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
