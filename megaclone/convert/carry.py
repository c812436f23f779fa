"""`--optimizer carry`: the Adam state files travel with the weights through a conversion.

Each target rank's `optim/tpXX-ppYY.safetensors` is planned as one more file job whose tensors are the
weights' tensor jobs renamed `<name>.exp_avg` / `<name>.exp_avg_sq`, at the same global index ranges.
The executor reads them through `OptimStateReader` (the weights' ShardReader on the optim/ files) chunk
by chunk, so resharding the moments is the weights' slicing code; with `--hyperclone` each chunk is
`megaclone.clone.clone_moment` (m' = (m o pi)/p, v' = (v o pi)/p^2) instead of `clone_tensor`. Adam's
step count, the scheduler position and the data position are copied into the target manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megaclone.checkpoint import Manifest
from megaclone.checkpoint.optim_state import (
    MOMENT_KEYS,
    OptimStateReader,
    is_optim_file,
    make_optimizer_record,
    moment_name,
    optim_file,
)
from megaclone.clone import clone_moment
from megaclone.config import CloneConfig, ModelConfig
from megaclone.convert.jobs import SHARD_METADATA, ConvertError, FileJob, TensorJob
from megaclone.convert.writer import planned_file_bytes
from megaclone.spec import ParamSpec


def optim_file_job(weight_tensors: list[TensorJob], tp_rank: int, pp_rank: int) -> FileJob:
    """The optim/ file of one target rank: both moments of every weight tensor, same ranges, safetensors order."""
    tensors = sorted((TensorJob(moment_name(t.name, key), t.shape, t.ranges) for t in weight_tensors
                      for key in MOMENT_KEYS), key=lambda t: t.name.encode())
    size = planned_file_bytes([(t.name, t.shape) for t in tensors], SHARD_METADATA)
    return FileJob(optim_file(tp_rank, pp_rank), tp_rank, pp_rank, tuple(tensors), size)


def check_carry_source(source: Path, manifest: Manifest) -> None:
    """The source must have optimizer-state files, all present and matching their checksums."""
    if manifest.optimizer is None:
        raise ConvertError(f"--optimizer carry: {source} holds no optimizer state (its manifest has no 'optimizer' "
                           f"entry: a weight-only or older checkpoint); use --optimizer drop")
    with OptimStateReader(source) as reader:
        reader.verify()


def open_reader(rel: str, source: Path) -> Any:
    """The reader for a target file: OptimStateReader for optim/ files, None for weight files (the caller's)."""
    return OptimStateReader(source) if is_optim_file(rel) else None


def read_moment_chunk(reader: OptimStateReader, tensor_name: str, index: tuple[slice, ...],
                      source_cfg: ModelConfig, clone: CloneConfig | None,
                      wide_specs: dict[str, ParamSpec]) -> torch.Tensor:
    """Global slice `index` of a target moment tensor: resharded, or widened with clone_moment."""
    if clone is None:
        return reader.read(tensor_name, index)
    name, kind = tensor_name.rsplit(".", 1)
    return clone_moment(wide_specs[name], source_cfg, clone, lambda n, i: reader.read_moment(n, kind, i), index,
                        kind)


def carried_record(source: Manifest, digests: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The target manifest's `optimizer` entry: the source's step and schedule, the new files' digests."""
    files = {rel: d for rel, d in digests.items() if is_optim_file(rel)}
    if not files:
        return None
    assert source.optimizer is not None
    return make_optimizer_record(source.optimizer["step"], source.optimizer["scheduler"], files)
