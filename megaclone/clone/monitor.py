"""How far the copies of a clone have drifted apart: the symmetry monitor.

A clone uses its extra width only as fast as its copies diverge (docs/design.md, "Zero-sum noise"), so training
logs the mean cosine similarity between the copies of each output unit of the widened weights.
"""

from __future__ import annotations

import math

import torch

from megaclone.clone.plan import axis_factor, axis_map
from megaclone.spec import ParamSpec


def _local_range(spec: ParamSpec, dim: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    if spec.tp_axis == dim:
        return spec.tp_range(tp_rank, tp_size)
    return 0, spec.shape[dim]


def _whole_blocks(start: int, stop: int, unit: int, factor: int) -> tuple[int, int]:
    """Global small units [first, last) whose `factor` copies all lie in the wide range [start, stop)."""
    return -(-start // (unit * factor)), stop // (unit * factor)


@torch.no_grad()
def copy_similarity(tensor: torch.Tensor, spec: ParamSpec, n: int, m: int | None = None, tp_rank: int = 0,
                    tp_size: int = 1, align: bool = True, g: int | None = None) -> float:
    """Mean cosine similarity between the copies of each output unit (rows) of a widened tensor.

    `tensor` is the full widened tensor or this rank's TP slice of it (`spec` is the WIDE spec); only
    output units whose copies are all present count. 1.0 means the copies are identical (the wide
    model is still the small one in disguise). With `align`, output copy k is compared after rolling
    the copies of every input unit by k mod q, i.e. up to the permutation that swaps the copies on
    every axis together: a fresh diagonal clone then scores 1 like a symmetric one. NaN when there
    is nothing to compare: the output axis is not widened (lm_head, mlp_in with m=1) or no output unit
    has all its copies on this rank, so a monitor can skip NaN over any set of weights. With a groups factor
    g < n the copies of a qkv unit are its g group copies (the head copies inside a group are not compared).
    """
    m = n if m is None else m
    if tuple(tensor.shape) != spec.tp_shape(tp_size):
        raise ValueError(f"{spec.name}: tensor of shape {list(tensor.shape)} is not the TP slice of shape "
                         f"{list(spec.tp_shape(tp_size))} (tp_size={tp_size})")
    p = axis_factor(spec.axes[0], n, m, g)
    if p == 1:  # output axis not widened: no copies
        return math.nan
    x = tensor.detach().float()
    r0, r1 = _local_range(spec, 0, tp_rank, tp_size)
    unit0 = spec.axes[0].unit_size
    u0, u1 = _whole_blocks(r0, r1, unit0, p)
    if u1 <= u0:
        return math.nan
    x = x[u0 * p * unit0 - r0: u1 * p * unit0 - r0]
    x = x.reshape(u1 - u0, p, unit0, *x.shape[1:])  # [small units, copies, unit rows, input...]
    in_map = axis_map(spec, 1, n, m, g) if x.dim() == 4 else None
    q = in_map.factor if in_map is not None else 1
    if align and q > 1:
        c0, c1 = _local_range(spec, 1, tp_rank, tp_size)
        unit1 = in_map.unit_size
        b0, b1 = _whole_blocks(c0, c1, unit1, q)
        if b1 <= b0:
            return math.nan
        x = x[..., b0 * q * unit1 - c0: b1 * q * unit1 - c0]
        x = x.reshape(*x.shape[:3], b1 - b0, q, unit1)  # [units, copies, rows, input units, input copies, unit]
        x = torch.stack([x[:, k].roll(-(k % q), dims=3) for k in range(p)], dim=1)
    x = x.reshape(u1 - u0, p, -1)  # [small units, copies, flattened copy]
    x = x.double()
    norms = x.norm(dim=-1)  # [units, copies]
    sims = []
    for a in range(p):
        for b in range(a + 1, p):
            dot = (x[:, a] * x[:, b]).sum(-1)
            denom = norms[:, a] * norms[:, b]
            both_zero = (norms[:, a] == 0) & (norms[:, b] == 0)
            cos = torch.where(denom > 0, dot / denom.clamp_min(1e-300), torch.zeros_like(dot))
            sims.append(torch.where(both_zero, torch.ones_like(cos), cos))
    return float(torch.stack(sims).mean())
