"""ZeRO-1/2's gradient norm without DeepSpeed's per-tensor Python loop, and all-reduces over one rank skipped.

DeepSpeed 0.19's `scaled_global_norm` takes one `vector_norm` per gradient tensor in a Python loop (two `.to`
calls each) and all-reduces every group's partial norm over the data-parallel group, also when that group is a
single rank; the gradient all-reduce of the backward epilogue is issued at DP=1 too. For small models that is a
visible share of the step (docs/performance.md, "CPU training throughput"). Both shortcuts change no number:

- `group_norms` computes each group's norm as DeepSpeed's `get_grad_norm_direct` does (the same tensors, the same
  fp64 per-tensor norms, summed in the same order), without a converted fp64 copy of every gradient and the
  per-tensor device and dtype look-ups;
- an all-reduce over a group of one rank is the identity, so `skip_single_rank_all_reduce` returns at once.

`install_grad_norm` puts the norm on the engine's ZeRO optimizer; carry runs pass per-group weights (the norm the
small model would see, megaclone.train.carry).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch


def skip_single_rank_all_reduce() -> None:
    """Make `deepspeed.comm.all_reduce` return at once for a group of one rank (once per process)."""
    import deepspeed.comm as ds_dist

    inner = ds_dist.all_reduce
    if getattr(inner, "skips_single_rank", False):
        return

    @functools.wraps(inner)
    def all_reduce(tensor: torch.Tensor, op: Any = ds_dist.ReduceOp.SUM, group: Any = None, async_op: bool = False,
                   *args: Any, **kwargs: Any) -> Any:
        if not async_op and ds_dist.get_world_size(group) == 1:
            return None  # SUM, AVG, MAX, ... of one tensor is that tensor
        return inner(tensor, op, group, async_op, *args, **kwargs)

    all_reduce.skips_single_rank = True  # type: ignore[attr-defined]
    ds_dist.all_reduce = all_reduce


def _counted_gradients(zero: Any, group: int) -> list[torch.Tensor]:
    """The gradients `get_grad_norm_direct` counts: no ZeRO padding, no pipeline replicas, TP-replicated ones on
    TP rank 0 only."""
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter

    grads = (g for g in zero.averaged_gradients[group] if not getattr(g, "_zero_padding", False))
    return [g for g, p in zip(grads, zero.params_in_partition[group])
            if not (hasattr(p, PIPE_REPLICATED) and p.ds_pipe_replicated)
            and (is_model_parallel_parameter(p) or zero.model_parallel_rank == 0)]


def group_norms(zero: Any) -> list[torch.Tensor]:
    """Each parameter group's gradient L2 norm over all DP and TP ranks, -1 where it is inf or NaN: DeepSpeed's
    `get_grad_norm_direct` for every group, bit for bit."""
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    dtype = get_norm_dtype()  # fp64 where the device has it: DeepSpeed accumulates the norms in it
    out = []
    for i in range(len(zero.bit16_groups)):
        grads = _counted_gradients(zero, i)
        if grads:  # dtype=: accumulate in fp64 as DeepSpeed does, without a converted copy of every gradient
            total = torch.stack([torch.linalg.vector_norm(g, 2.0, dtype=dtype) for g in grads]).pow(2.0).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32, device=zero.device)
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=zero.dp_process_group)
        zero._model_parallel_all_reduce(tensor=total, op=ds_dist.ReduceOp.SUM)
        total = total.pow(1.0 / 2.0)
        mask_nan_or_inf_with_val_inplace(total, device=zero.device)
        out.append(total)
    return out


def install_grad_norm(engine: Any, combine: Callable[[Any, list[torch.Tensor]], torch.Tensor] | None = None) -> bool:
    """Replace the ZeRO-1/2 optimizer's `scaled_global_norm` (what clipping and the logged grad_norm use) with
    `group_norms` combined by `combine(zero, norms)` (default: DeepSpeed's own L2 combination). Returns False,
    changing nothing, for engines without that optimizer or with CPU offload or MoE layers (other code paths)."""
    from deepspeed.runtime.utils import combine_grad_norm_groups
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or zero.cpu_offload or zero.has_moe_layers:
        return False

    def scaled_global_norm(self: Any, norm_type: int = 2) -> torch.Tensor:
        assert norm_type == 2, "only the L2 norm is supported"
        norms = group_norms(self)
        return combine_grad_norm_groups(norms) if combine is None else combine(self, norms)

    zero.scaled_global_norm = types.MethodType(scaled_global_norm, zero)
    return True
