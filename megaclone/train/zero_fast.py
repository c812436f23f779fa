"""DeepSpeed ZeRO-1/2 steps without work that changes no number: the gradient norm without DeepSpeed's per-tensor
Python loop, and no communication or copies over a data-parallel group of one rank.

DeepSpeed 0.19 spends a visible share of a small model's step (docs/performance.md, "CPU training throughput") on
work whose result is known in advance. Every shortcut here leaves every number as DeepSpeed computes it
(tests/train/test_zero_fast.py compares norms and training histories bit for bit):

- `group_norms` computes each group's norm as DeepSpeed's `get_grad_norm_direct` does (the same tensors, the same
  fp64 per-tensor norms, summed in the same order), without a converted fp64 copy of every gradient and the
  per-tensor device and dtype look-ups;
- an all-reduce over a group of one rank is the identity, so `skip_single_rank_all_reduce` returns at once;
- the backward epilogue flattens each gradient bucket, divides it by the DP size, all-reduces it and copies it
  back into the gradients: over one rank (and in the gradients' own dtype) that is the identity, and
  `install_engine_shortcuts` skips it;
- after every step ZeRO re-points each parameter at its slice of the flat buffer ("probably not needed", its
  comment says); the shortcut re-points only parameters that no longer view their slice.

`install_grad_norm` puts the norm on the engine's ZeRO optimizer; carry runs pass per-group weights (the norm the
small model would see, megaclone.train.carry).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def skip_muon_import() -> None:
    """Answer DeepSpeed's "is this optimizer a Muon?" without importing its Muon optimizer (once per process).

    `deepspeed.initialize` and ZeRO's optimizer import that module only to ask `isinstance(optimizer,
    MuonWithAuxAdam)`; the import pulls in torch's inductor compiler, 1.5 s of a quiet start-up here (4-5 s
    under load), for an optimizer megaclone never builds. A stand-in module whose class nothing is an instance
    of gives the same answers. Nothing happens when the module is already imported.
    """
    if MUON_MODULE in sys.modules:
        return
    stand_in = types.ModuleType(MUON_MODULE, "megaclone.train.zero_fast: DeepSpeed's Muon is never used here")
    stand_in.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
    sys.modules[MUON_MODULE] = stand_in


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


def _zero_optimizer(engine: Any) -> Any:
    """The engine's ZeRO-1/2 optimizer when it takes the code paths patched here, else None."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or zero.cpu_offload or zero.has_moe_layers:
        return None
    return zero


def install_grad_norm(engine: Any, combine: Callable[[Any, list[torch.Tensor]], torch.Tensor] | None = None) -> bool:
    """Replace the ZeRO-1/2 optimizer's `scaled_global_norm` (what clipping and the logged grad_norm use) with
    `group_norms` combined by `combine(zero, norms)` (default: DeepSpeed's own L2 combination). Returns False,
    changing nothing, for engines without that optimizer or with CPU offload or MoE layers (other code paths)."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    zero = _zero_optimizer(engine)
    if zero is None:
        return False

    def scaled_global_norm(self: Any, norm_type: int = 2) -> torch.Tensor:
        assert norm_type == 2, "only the L2 norm is supported"
        norms = group_norms(self)
        return combine_grad_norm_groups(norms) if combine is None else combine(self, norms)

    zero.scaled_global_norm = types.MethodType(scaled_global_norm, zero)
    return True


def _allreduce_and_copy(self: Any, small_bucket: list[torch.Tensor], communication_data_type: torch.dtype,
                        rank: int | None = None, log: Any = None, divide: bool = True, process_group: Any = None,
                        output_bucket: list[torch.Tensor | None] | None = None) -> None:
    """DeepSpeed's `allreduce_and_copy`, returning at once where it would reduce over one rank: dividing by 1,
    an all-reduce of one tensor and copying the values back onto themselves change nothing. Not where the
    bucket is cast to another communication dtype (that round trip rounds) or added to partition buffers."""
    from deepspeed import comm as ds_dist

    group = self.dp_process_group if process_group is None else process_group
    if (ds_dist.get_world_size(group=group) == 1 and self.sequence_parallel_size == 1
            and all(t.dtype == communication_data_type for t in small_bucket)
            and (output_bucket is None or all(o is None for o in output_bucket))):
        return
    type(self).allreduce_and_copy(self, small_bucket, communication_data_type, rank, log, divide, process_group,
                                  output_bucket)


def _update_model_bit16_weights(self: Any, group: int) -> None:
    """DeepSpeed's method, run only when some parameter of the group no longer views its slice of the flat
    buffer (after `.data` was replaced, or the buffer moved); otherwise it would set every `.data` to itself."""
    flat = self.bit16_groups_flat[group]
    base, size = flat.data_ptr(), flat.element_size()
    ordered = self.round_robin_bit16_groups[group]
    in_place = all(p.data_ptr() == base + offset * size and p.shape == meta.shape
                   for p, meta, offset in zip(ordered, self.round_robin_bit16_meta[group],
                                              self.round_robin_bit16_offsets[group]))
    if not (in_place and all(p is ordered[j]
                             for p, j in zip(self.bit16_groups[group], self.round_robin_bit16_indices[group]))):
        type(self)._update_model_bit16_weights(self, group)


# Each shortcut replaces one DeepSpeed method: (its parameters, the optimizer attributes the shortcut reads).
# Installed only where DeepSpeed's method has exactly these parameters (0.19; setup.cfg allows older releases).
_SHORTCUTS: dict[str, tuple[Callable[..., None], list[str], list[str]]] = {
    "allreduce_and_copy": (
        _allreduce_and_copy,
        ["self", "small_bucket", "communication_data_type", "rank", "log", "divide", "process_group", "output_bucket"],
        ["dp_process_group", "sequence_parallel_size"]),
    "_update_model_bit16_weights": (
        _update_model_bit16_weights, ["self", "group_index"],
        ["bit16_groups", "bit16_groups_flat", "round_robin_bit16_groups", "round_robin_bit16_meta",
         "round_robin_bit16_offsets", "round_robin_bit16_indices"]),
}


def install_engine_shortcuts(engine: Any) -> list[str]:
    """Put the two step shortcuts of the module docstring on the engine's ZeRO-1/2 optimizer; returns the names
    of the methods replaced (none for other optimizers: ZeRO-0 and 3, CPU offload, MoE)."""
    zero = _zero_optimizer(engine)
    if zero is None:
        return []
    installed = []
    for name, (shortcut, params, attrs) in _SHORTCUTS.items():
        original = getattr(type(zero), name, None)
        if original is not None and list(inspect.signature(original).parameters) == params \
                and all(hasattr(zero, a) for a in attrs):
            setattr(zero, name, types.MethodType(shortcut, zero))
            installed.append(name)
    return installed
