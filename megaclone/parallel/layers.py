"""Tensor-parallel layers. Each says which axis of its weight it splits across the TP group.

Weights are created empty at their local (per-rank) shape; values come from the parameter-spec
table (`megaclone.model.init`) or a checkpoint, so a layer never decides its own initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclone.parallel.layout import TPGroup
from megaclone.parallel.mappings import copy_to_tp_region, reduce_from_tp_region, sum_over_tp_region


def _mark_split(param: nn.Parameter, dim: int) -> None:
    # DeepSpeed's gradient-norm code counts split parameters on every TP rank, replicated ones once.
    param.tensor_model_parallel = True
    param.partition_dim = dim


def _divide(size: int, tp: TPGroup, what: str) -> int:
    if size % tp.size:
        raise ValueError(f"{what}={size} is not divisible by tp_size={tp.size}")
    return size // tp.size


class VocabParallelEmbedding(nn.Module):
    """Embedding split along the vocabulary: rank r holds rows [r*V/t, (r+1)*V/t)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        per_rank = _divide(num_embeddings, tp, "padded vocabulary")
        self.vocab_start = tp.rank * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))
        if tp.size > 1:
            _mark_split(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # [batch, seq, hidden]
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(out, self.tp)


class ColumnParallelLinear(nn.Module):
    """y = xA^T + b with A split along its output axis; the output stays split (no gather)."""

    def __init__(self, input_size: int, output_size: int, tp: TPGroup, bias: bool = True):
        super().__init__()
        self.tp = tp
        local = _divide(output_size, tp, "output size")
        self.weight = nn.Parameter(torch.empty(local, input_size))
        self.bias = nn.Parameter(torch.empty(local)) if bias else None
        if tp.size > 1:
            _mark_split(self.weight, 0)
            if self.bias is not None:
                _mark_split(self.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp_region(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = xA^T + b with A split along its input axis; partial outputs are summed over TP ranks."""

    def __init__(self, input_size: int, output_size: int, tp: TPGroup, bias: bool = True):
        super().__init__()
        self.tp = tp
        local = _divide(input_size, tp, "input size")
        self.weight = nn.Parameter(torch.empty(output_size, local))
        self.bias = nn.Parameter(torch.empty(output_size)) if bias else None  # replicated
        if tp.size > 1:
            _mark_split(self.weight, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:  # nothing to sum: the bias goes into the matmul (one addmm, as nn.Linear)
            return F.linear(x, self.weight, self.bias)
        y = reduce_from_tp_region(F.linear(x, self.weight), self.tp)  # the bias is added once, after the sum
        return y if self.bias is None else y + self.bias


class ColumnParallelNorm(nn.Module):
    """LayerNorm or RMSNorm over features that a column-parallel layer split (OLMo-2's QK-norm over all heads).

    Rank r holds its slice of the features and of the weight (and bias); the sums behind the mean and the
    variance are added up over the TP group, so every rank normalises with the statistics of the whole axis.
    Computed in fp32. `unit_offset`: the gain is 1 + weight (Gemma's convention).
    """

    def __init__(self, size: int, tp: TPGroup, eps: float, rms: bool, affine: bool = True, unit_offset: bool = False):
        super().__init__()
        self.tp, self.size, self.eps, self.rms, self.unit_offset = tp, size, eps, rms, unit_offset
        local = _divide(size, tp, "normalized size")
        self.weight = nn.Parameter(torch.empty(local)) if affine else None
        self.bias = nn.Parameter(torch.empty(local)) if affine and not rms else None
        if tp.size > 1:
            for p in (self.weight, self.bias):
                if p is not None:
                    _mark_split(p, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.rms:
            mean_sq = sum_over_tp_region(xf.square().sum(-1, keepdim=True), self.tp) / self.size
            y = xf * torch.rsqrt(mean_sq + self.eps)
        else:
            sums = sum_over_tp_region(torch.stack([xf.sum(-1), xf.square().sum(-1)], dim=-1), self.tp) / self.size
            mean = sums[..., :1]
            y = (xf - mean) * torch.rsqrt(sums[..., 1:] - mean.square() + self.eps)
        if self.weight is not None:
            y = y * (1.0 + self.weight.float() if self.unit_offset else self.weight.float())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)
