"""The parallel layout: TP x PP x DP degrees, this rank's coordinates and its process groups.

Validated once and built once, then passed down; no module globals. Ranks are ordered like
DeepSpeed's `PipeModelDataParallelTopology` (axes pipe, data, model): TP is the fastest-varying
axis, so TP groups are consecutive ranks and stay inside a node whenever tp_size divides the
number of ranks per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from megaclone.config import ParallelConfig


@dataclass(frozen=True)
class TPGroup:
    """What a tensor-parallel layer needs to know: its group, size and position."""

    group: dist.ProcessGroup | None = None
    size: int = 1
    rank: int = 0


@dataclass
class Layout:
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    model_group: dist.ProcessGroup | None = None  # TP x PP ranks holding one model replica

    @property
    def tp(self) -> TPGroup:
        return TPGroup(self.tp_group, self.tp_size, self.tp_rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def global_rank(self, tp_rank: int, pp_rank: int, dp_rank: int) -> int:
        return (pp_rank * self.dp_size + dp_rank) * self.tp_size + tp_rank

    def describe(self) -> str:
        return (f"world={self.world_size} = TP {self.tp_size} x PP {self.pp_size} x DP {self.dp_size}; "
                f"rank {self.rank} is tp={self.tp_rank} pp={self.pp_rank} dp={self.dp_rank}")

    # DeepSpeed's `mpu` interface (used for gradient clipping and data-parallel groups).
    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size * self.pp_size

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.model_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size


def build_layout(cfg: ParallelConfig) -> Layout:
    """Create the process groups for `cfg` on an initialised default group (or a 1-rank layout)."""
    if not (dist.is_available() and dist.is_initialized()):
        cfg.validate(world_size=1)
        if cfg.tp_size * cfg.pp_size != 1:
            raise ValueError(f"parallel.tp_size={cfg.tp_size} x pp_size={cfg.pp_size} needs a distributed launch")
        return Layout()
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg.validate(world_size=world)
    tp, pp = cfg.tp_size, cfg.pp_size
    dp = world // (tp * pp)
    layout = Layout(tp_size=tp, pp_size=pp, dp_size=dp, rank=rank, world_size=world,
                    tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp))
    # Every rank creates every group, in the same order (a torch.distributed requirement).
    for p in range(pp):
        for d in range(dp):
            ranks = [layout.global_rank(t, p, d) for t in range(tp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                layout.tp_group = group
    for p in range(pp):
        for t in range(tp):
            ranks = [layout.global_rank(t, p, d) for d in range(dp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                layout.dp_group = group
    for d in range(dp):
        for t in range(tp):
            ranks = [layout.global_rank(t, p, d) for p in range(pp)]
            group = dist.new_group(ranks)
            if rank in ranks:
                layout.pp_group = group
    for d in range(dp):
        ranks = [layout.global_rank(t, p, d) for p in range(pp) for t in range(tp)]
        group = dist.new_group(ranks)
        if rank in ranks:
            layout.model_group = group
    return layout
