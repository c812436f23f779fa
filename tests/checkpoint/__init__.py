"""Shared helpers for the checkpoint tests: tiny configs, random full states, layouts."""

from __future__ import annotations

import torch

from megaclone.config import ModelConfig, ParallelConfig
from megaclone.model import ReferenceGPT, init_params
from megaclone.rng import counter_normal

ARCHS = {
    "tied-gelu-layernorm-rope-bias": dict(),
    "untied-swiglu-rmsnorm-learned-nobias-gqa": dict(activation="swiglu", norm="rmsnorm", position="learned",
                                                     bias=False, tied_embeddings=False, num_query_groups=2),
    "tied-swiglu-layernorm-mqa": dict(activation="swiglu", num_query_groups=1),
    "untied-gelu-layernorm-learned": dict(tied_embeddings=False, position="learned"),
}
LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 3)]  # (tp_size, pp_size)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, vocab_multiple=32, hidden_size=32, num_layers=3, num_heads=4, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


def fits(cfg: ModelConfig, tp: int, pp: int) -> bool:
    try:
        ParallelConfig(tp_size=tp, pp_size=pp, zero_stage=0).validate(cfg)
    except ValueError:
        return False
    return True


def random_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full tensors by global name: init_params, plus noise on norms and biases so no tensor is constant."""
    model = ReferenceGPT(cfg)
    params = dict(model.named_parameters())
    init_params(params, cfg, seed)
    return {name: (p.detach() + 0.1 * counter_normal(seed + 1, name, tuple(p.shape))).clone()
            for name, p in params.items()}
