"""What a conversion plan is made of: a file job per target file, a tensor job per tensor in it, and the error
for a user's mistake. A module of its own, below the planner (`plan`), the executor (`run`) and the optimizer-state
path (`carry`), which all build or read jobs, so that none of them imports another to get them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SHARD_METADATA = {"format": "pt"}  # what save_weight_shard writes, so files hash the same either way
Range = tuple[int, int]


class ConvertError(ValueError):
    """A user's mistake in a conversion request (output exists, no disk space, unsupported option)."""


@dataclass(frozen=True)
class TensorJob:
    """One tensor of a target file: its global name, stored (TP-local) shape, and global index ranges."""

    name: str
    shape: tuple[int, ...]
    ranges: tuple[Range, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 4


@dataclass(frozen=True)
class FileJob:
    """One target weight file: the unit a worker owns, written in `tensors` order (safetensors' order)."""

    rel: str
    tp_rank: int
    pp_rank: int
    tensors: tuple[TensorJob, ...]
    size: int  # exact bytes on disk, header included
