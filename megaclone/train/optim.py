"""AdamW parameter groups from the spec table and the warmup + cosine learning-rate schedule.

The schedule is a `LambdaLR` built by DeepSpeed on its own (possibly ZeRO-wrapped) optimizer, so
DeepSpeed steps it with the optimizer and saves it in its checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from megaclone.config import ModelConfig, TrainConfig
from megaclone.spec import NORM_ROLES, spec_table


def build_param_groups(params: dict[str, nn.Parameter], cfg: ModelConfig, train: TrainConfig) -> list[dict]:
    """Two AdamW groups: weight decay on matrices and embeddings, none on norms and biases.

    `params` maps global names (see `global_named_parameters`) to this rank's parameters; the role
    comes from the spec table, never from the parameter's name.
    """
    specs = spec_table(cfg)
    decay, no_decay = [], []
    for name, param in params.items():
        spec = specs[name]
        (no_decay if spec.is_bias or spec.role in NORM_ROLES else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict], train: TrainConfig) -> torch.optim.AdamW:
    """torch's AdamW over `groups` (fused on CUDA): no DeepSpeed op compilation, same math on CPU and GPU."""
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.adam_eps,
                             fused=fused or None)


def build_optimizer(params: dict[str, nn.Parameter], cfg: ModelConfig, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the run's parameter groups (decay on matrices and embeddings only)."""
    return adamw(build_param_groups(params, cfg, train), train)


def lr_factor(train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of `train.lr` after `step` optimizer steps: linear warmup, then cosine to `min_lr`.

    Warmup reaches the peak at step `warmup_iters - 1` (step 0 already trains, at lr / warmup_iters);
    the cosine ends at `lr_decay_iters` (default: `train_iters`) and stays at min_lr after it.
    """
    warmup = train.warmup_iters
    decay = train.lr_decay_iters if train.lr_decay_iters is not None else train.train_iters
    floor = train.min_lr / train.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if decay <= warmup or step >= decay:
            return floor if step >= decay else 1.0
        progress = (step - warmup) / (decay - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_lr_scheduler(train: TrainConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A callable DeepSpeed applies to the optimizer it actually steps (ZeRO wraps ours)."""
    factor = lr_factor(train)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
