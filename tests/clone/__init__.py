"""Shared helpers of the clone tests: tiny small models with randomised weights, norms and biases."""

from __future__ import annotations

import torch

from megaclone.config import ModelConfig
from megaclone.model import ReferenceGPT
from megaclone.spec import NORM_ROLES, build_param_specs, stages_of

ARCHS = {
    "mha-gelu-ln-rope-bias-tied": dict(),
    "gqa-swiglu-rms-learned-nobias-untied": dict(activation="swiglu", norm="rmsnorm", position="learned",
                                                 bias=False, tied_embeddings=False, num_query_groups=2),
    "mqa-gelu-ln-rope-untied": dict(num_query_groups=1, tied_embeddings=False),
}
# The options of the imported families (docs/hf.md), one architecture per clone rule they add.
FAMILY_ARCHS = {
    # OPT-350m: post-norm without a final norm, ReLU, positions at offset 2, a narrower tied embedding with
    # project_in / project_out (the tied fold goes into project_out)
    "opt350-post-relu-proj-tied": dict(activation="relu", norm_placement="post", final_norm=False,
                                       position="learned", position_offset=2, embed_size=8),
    # OLMo: LayerNorm without parameters and tied embeddings: nowhere to fold, the clone unties
    "olmo-plainln-swiglu-tied": dict(activation="swiglu", norm_affine=False, bias=False),
    # OLMo-2: RMSNorm on each branch's output, QK-norm over all heads, GQA
    "olmo2-branch-qknorm-gqa-untied": dict(activation="swiglu", norm="rmsnorm", norm_placement="branch",
                                           qk_norm=True, bias=False, tied_embeddings=False, num_query_groups=2),
    # Gemma: sqrt(hidden) embedding scale with a tied unembedding, gain 1 + w, GeGLU, head size 8 != 16 / 4
    "gemma-geglu-offset-scaled-tied": dict(activation="geglu", norm="rmsnorm", norm_unit_offset=True,
                                           scale_embeddings=True, head_size=8, bias=False, num_query_groups=2),
}


def small_config(arch: str, **kw) -> ModelConfig:
    base = dict(vocab_size=50, vocab_multiple=16, hidden_size=16, num_layers=2, num_heads=4, max_seq_len=8)
    base.update(ARCHS[arch] if arch in ARCHS else FAMILY_ARCHS[arch])
    base.update(kw)
    return ModelConfig(**base)


def random_small_state(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights like a trained model's: embedding-dominated residual stream, non-trivial attention and
    norms and biases away from ones/zeros, so that every cloning rule changes the logits if it is wrong."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for spec in build_param_specs(cfg):
        r = torch.randn(spec.shape, generator=g)
        if spec.role in NORM_ROLES:
            v = 0.2 * r if spec.is_bias else 1.0 + 0.2 * r
        elif spec.is_bias:
            v = 0.2 * r
        elif spec.role in ("embedding", "pos_embedding"):
            v = r
        elif spec.role in ("attn_out", "mlp_out"):
            v = 0.5 * r / spec.shape[1] ** 0.5
        else:
            v = r / spec.shape[1] ** 0.5
        state[spec.name] = v
    return state


def dict_reader(state: dict[str, torch.Tensor], log: list | None = None):
    """A `read(name, index)` over full tensors that records every request in `log`."""
    def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if log is not None:
            log.append((name, tuple(index)))
        return state[name][index]
    return read


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> ReferenceGPT:
    model = ReferenceGPT(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


def assemble(cfg: ModelConfig, shards: dict[tuple[int, int], dict[str, torch.Tensor]], tp_size: int,
             pp_size: int) -> dict[str, torch.Tensor]:
    """Full tensors from per-(tp_rank, pp_rank) shards; every element must be covered, and the copies
    of a parameter on several stages (the tied embedding) must agree bit for bit."""
    full: dict[str, torch.Tensor] = {}
    for spec in build_param_specs(cfg):
        stages = stages_of(spec, cfg, pp_size)
        assert stages, spec.name
        per_stage = []
        for pp in stages:
            t = torch.full(spec.shape, float("nan"))
            for tp in range(tp_size):
                t[spec.tp_slices(tp, tp_size)] = shards[(tp, pp)][spec.name]
            assert not t.isnan().any(), f"{spec.name}: not covered at tp={tp_size} pp={pp_size}"
            per_stage.append(t)
        for other in per_stage[1:]:
            assert bit_equal(other, per_stage[0]), spec.name
        full[spec.name] = per_stage[0]
        extra = [n for (tp, pp), s in shards.items() for n in s if pp not in stages and n == spec.name]
        assert not extra, f"{spec.name} present on stages outside {stages}"
    return full


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == torch.float32 and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
