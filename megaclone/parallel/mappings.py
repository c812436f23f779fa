"""Autograd-aware tensor-parallel collectives, named for what they do to the activation.

copy_to_tp_region      forward: identity      backward: all-reduce   (enters a column-parallel layer)
reduce_from_tp_region  forward: all-reduce    backward: identity     (leaves a row-parallel layer)
gather_from_tp_region  forward: all-gather    backward: split        (last dim)
scatter_to_tp_region   forward: split         backward: all-gather   (last dim)
sum_over_tp_region     forward: all-reduce    backward: all-reduce   (a statistic of a split axis that every rank
                                                                      uses, e.g. a norm's over all heads)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaclone.parallel.layout import TPGroup


def _all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=tp.group)
    return x


def _split_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    return x.chunk(tp.size, dim=-1)[tp.rank].contiguous()


def _gather_last(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x.clone(), tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _gather_last(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.tp), None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _split_last(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.tp), None


class _SumOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return _all_reduce(x.clone(), tp)

    @staticmethod
    def backward(ctx, grad):
        # every rank's output depends on every rank's input, and each rank's grad covers only its own use of it
        return _all_reduce(grad.clone(), ctx.tp), None


def copy_to_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _CopyToTP.apply(x, tp)


def reduce_from_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ReduceFromTP.apply(x, tp)


def gather_from_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _GatherFromTP.apply(x, tp)


def scatter_to_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _ScatterToTP.apply(x, tp)


def sum_over_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return x if tp.size == 1 else _SumOverTP.apply(x, tp)
