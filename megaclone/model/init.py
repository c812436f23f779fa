"""Initialise a model's (local) parameters from the parameter-spec table.

Values come from the counter-based generator keyed by (seed, global name, global index), so a TP
shard holds exactly the matching slice of the TP=1 weights, for any layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megaclone.config import ModelConfig
from megaclone.rng import counter_normal
from megaclone.spec import NORM_ROLES, ParamSpec, build_param_specs

_OUTPUT_ROLES = ("attn_out", "mlp_out")  # scaled by 1/sqrt(2 L), as in GPT-2


def init_value(spec: ParamSpec, cfg: ModelConfig, seed: int, tp_rank: int = 0, tp_size: int = 1) -> torch.Tensor:
    """The initial value of the TP shard `tp_rank` of parameter `spec`."""
    shape = spec.tp_shape(tp_size)
    if spec.role in NORM_ROLES:  # the identity: gain 1 (stored as 0 when the gain is 1 + weight), bias 0
        return torch.ones(shape) if not (spec.is_bias or cfg.norm_unit_offset) else torch.zeros(shape)
    if spec.is_bias:
        return torch.zeros(shape)
    std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if spec.role in _OUTPUT_ROLES else cfg.init_std
    return counter_normal(seed, spec.name, spec.shape, spec.tp_slices(tp_rank, tp_size)) * std


@torch.no_grad()
def init_params(params: dict[str, nn.Parameter], cfg: ModelConfig, seed: int, tp_rank: int = 0,
                tp_size: int = 1) -> None:
    """Fill `params` (global name -> local parameter) from the spec table."""
    specs = {s.name: s for s in build_param_specs(cfg)}
    for name, param in params.items():
        param.copy_(init_value(specs[name], cfg, seed, tp_rank, tp_size))


@torch.no_grad()
def load_global_params(params: dict[str, nn.Parameter], full: dict[str, torch.Tensor], cfg: ModelConfig,
                       tp_rank: int = 0, tp_size: int = 1) -> None:
    """Copy this rank's TP slice of each full (global) tensor in `full` into `params`."""
    specs = {s.name: s for s in build_param_specs(cfg)}
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, param in params.items():
        param.copy_(full[name][specs[name].tp_slices(tp_rank, tp_size)])
