"""Depth growth: which source block every target block copies, and which target tensors start at zero.

    zero        (lossless) the N - L new blocks are spread evenly between the source blocks: source block j
                is followed by floor((j+1)(N-L)/L) - floor(j(N-L)/L) new ones, each a copy of block j whose
                residual-branch output projections (attention out and MLP out, weights and biases) are zero.
                Both branches then return 0, so in a pre-norm residual stream the new block is the identity
                and the grown model computes the source's function.
    stack       G_stack: blocks [0..L-1, 0..L-1, ...]; N a multiple of L. Not function-preserving.
    interleave  each block repeated in place [0, 0, 1, 1, ...]; N a multiple of L. Not function-preserving.

The map runs on global block indices, so a target pipeline stage reads each block it copies from whichever
source stage held it. Depth composes with width: the grown model at the source width is an ordinary model,
and the width rules (megaclone.clone.rules) clone it tensor by tensor, reading each target tensor from the
source tensor `DepthPlan.source_of` names (a zeroed one reads nothing).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from megaclone.config import GROW_METHODS, CloneConfig, ConfigError, ModelConfig
from megaclone.spec import ParamSpec, in_block

ZEROED_ROLES = ("attn_out", "mlp_out")  # the residual-branch output projections an inserted `zero` block zeroes


@dataclass(frozen=True)
class DepthPlan:
    """Target block i copies source block `sources[i]`; `inserted[i]`: block i is new (not its source's first copy)."""

    method: str
    sources: tuple[int, ...]
    inserted: tuple[bool, ...]

    @property
    def num_layers(self) -> int:
        return len(self.sources)

    @property
    def grown(self) -> bool:
        return any(self.inserted)

    @property
    def preserving(self) -> bool:
        """The grown model computes the source's function (no growth, or the `zero` method)."""
        return not self.grown or self.method == "zero"

    def source_of(self, spec: ParamSpec) -> str | None:
        """The source parameter that target parameter `spec` copies, or None when it starts at zero."""
        if not 1 <= spec.layer <= self.num_layers:  # embedding, final norm, LM head: the same parameter
            return spec.name
        block = spec.layer - 1
        if self.inserted[block] and self.method == "zero" and spec.role in ZEROED_ROLES:
            return None
        return in_block(spec.name, self.sources[block])

    def to_dict(self) -> dict:
        """The manifest's record of the growth (provenance)."""
        return {"method": self.method, "source_layers": len(set(self.sources)), "num_layers": self.num_layers,
                "sources": list(self.sources), "inserted": [i for i, new in enumerate(self.inserted) if new]}


@functools.lru_cache(maxsize=64)
def plan_depth(num_layers: int, grow_layers: int, method: str) -> DepthPlan:
    """The block map from `num_layers` source blocks to `grow_layers` target blocks (0: no growth)."""
    L, N = num_layers, grow_layers or num_layers
    if method not in GROW_METHODS:
        raise ConfigError(f"clone.grow_method (--grow-method) = {method!r}: expected one of {GROW_METHODS}")
    if grow_layers and N <= L:
        raise ConfigError(f"clone.grow_layers (--grow-layers) = {N}: the target number of layers must exceed the "
                          f"source's {L} (model.num_layers of the source checkpoint)")
    if method in ("stack", "interleave") and N % L:
        raise ConfigError(f"--grow-method {method} repeats every source block equally: --grow-layers {N} must be a "
                          f"multiple of the source's {L} layers")
    if method == "stack":
        sources = tuple(i % L for i in range(N))
        return DepthPlan(method, sources, tuple(i >= L for i in range(N)))
    if method == "interleave":
        k = N // L
        return DepthPlan(method, tuple(i // k for i in range(N)), tuple(i % k > 0 for i in range(N)))
    sources, inserted = [], []
    for j in range(L):
        extra = (j + 1) * (N - L) // L - j * (N - L) // L
        sources += [j] * (1 + extra)
        inserted += [False] + [True] * extra
    return DepthPlan(method, tuple(sources), tuple(inserted))


def zero_block_refusal(cfg: ModelConfig) -> str | None:
    """Why a block whose residual-branch outputs are zero would not be the identity under `cfg`, or None.

    Pre-norm blocks (sequential or parallel residual) return x when both branches return 0. A post-norm block,
    y = norm(x + F(x)), returns norm(x), which is not x. A block with the norm on the branch output,
    y = x + norm(F(x)), returns x + norm(0): x for RMSNorm (0 / sqrt(eps) = 0, whatever its gain, 1 + w included)
    and for a LayerNorm without parameters, x + beta for an affine LayerNorm.
    """
    if cfg.norm_placement == "post":
        return "model.norm_placement='post': a post-norm block with zero branches returns norm(x), not x"
    if cfg.norm_placement == "branch" and cfg.norm == "layernorm" and cfg.norm_affine:
        return ("model.norm_placement='branch' with an affine LayerNorm: a zero branch output is normed to its bias, "
                "so the block adds beta to the stream")
    return None


def depth_plan(small_cfg: ModelConfig, clone_cfg: CloneConfig) -> DepthPlan:
    """The DepthPlan of a clone config on a source model, every constraint checked (ConfigError naming the flag)."""
    plan = plan_depth(small_cfg.num_layers, clone_cfg.grow_layers, clone_cfg.grow_method)
    reason = zero_block_refusal(small_cfg) if plan.grown and plan.method == "zero" else None
    if reason:
        raise ConfigError(f"--grow-method zero cannot preserve this model's function ({reason}); use --grow-method "
                          "stack or interleave")
    return plan


def deepen_model_config(small_cfg: ModelConfig, clone_cfg: CloneConfig) -> ModelConfig:
    """The source model grown to the target depth, at the source width."""
    return dataclasses.replace(small_cfg, num_layers=depth_plan(small_cfg, clone_cfg).num_layers)
