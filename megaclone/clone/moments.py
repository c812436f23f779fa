"""Adam's moments of a widened model, from the small model's, with the same clone maps as the weights.

At the cloned point every copy of a small unit sees the cloned activations, so (docs/design.md, "Carrying the
optimizer state")

    grad'[i'] = grad[pi(i')] / p        p = widening factor of the parameter's OUTPUT in the gradient sense

and Adam's moments carry over as m' = (m o pi) / p, v' = (v o pi) / p**2. Each role, with the value scale s
(the widened value is (small o pi) / s, summed over input copies for the diagonal variant) and p:

    role                          s    p    why
    qkv, attn_out, mlp_*          q    out  the linear rule; the upstream gradient of a widened output is g/p
    lm_head                       n    1    vocab is not widened: dL/dlogits is the small one
    embedding, pos_embedding      1    n    the output is the hidden width; when tied, the unembedding
                                            sees the final norm's output (z o pi)/n: also grad/n
    norm (gamma, beta), biases    1    out  an elementwise map on a widened axis
    final_norm, untied            1    n    like any norm
    final_norm, tied (folded 1/n) n    1    its output feeds E' whose rows are not divided: dL/dz' = dL/dz o pi

`copies` c is how many wide elements copy each small element (the product of the axis factors), so
||grad'||^2 = c / p^2 * ||grad||^2: the weight that turns a wide gradient norm into the small one's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megaclone.clone.plan import Index, axis_maps, clone_factors
from megaclone.clone.rules import LINEAR_ROLES, Reader, _check_against_small, gather_small
from megaclone.config import CloneConfig, ModelConfig
from megaclone.spec import ParamSpec, normalize_index

MOMENT_KINDS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class CarryFactors:
    """How one widened parameter relates to its small source, for the optimizer."""

    value_scale: int  # s: widened value = (small o pi) / s; its learning rate is lr / s, weight decay wd * s
    grad_scale: int  # p: widened gradient = (small gradient o pi) / p; Adam's eps becomes eps / p
    copies: int  # c: wide elements per small element

    @property
    def norm_weight(self) -> float:
        """p^2 / c: ||small grad||^2 = norm_weight * ||wide grad||^2 (at the cloned point and after it)."""
        return self.grad_scale ** 2 / self.copies


def carry_factors(wide_spec: ParamSpec, small_cfg: ModelConfig, n: int, m: int) -> CarryFactors:
    """The (s, p, c) of one widened parameter (see the module docstring for the derivation by role)."""
    factors = [amap.factor for amap in axis_maps(wide_spec, n, m)]
    copies = math.prod(factors)
    role = wide_spec.role
    if role in LINEAR_ROLES and not wide_spec.is_bias:  # axes (output, input)
        return CarryFactors(factors[1], factors[0], copies)
    if role in ("embedding", "pos_embedding"):  # axes (vocab | seq, hidden): the output is the hidden axis
        return CarryFactors(1, factors[1], copies)
    if role == "final_norm" and small_cfg.tied_embeddings:  # gamma', beta' = (. o pi) / n
        return CarryFactors(n, 1, copies)
    return CarryFactors(1, factors[0], copies)  # norms and biases: one widened axis, elementwise


def clone_moment(wide_spec: ParamSpec, small_cfg: ModelConfig, clone_cfg: CloneConfig, read: Reader,
                 index: Index = (), kind: str = "exp_avg") -> torch.Tensor:
    """The slice `index` of Adam's `kind` moment of one widened parameter, in fp32.

    `read(name, small_index)` returns a slice of the small parameter's moment (a global tensor, like the
    weights' reader). Calls it once, for the tight small range the slice copies. The variant and the noise of
    `clone_cfg` are not used: the relation is exact for symmetric clones, and diagonal ones with m = 1 or m = n,
    without noise; otherwise the copies' gradients differ and these moments are an estimate (docs/design.md,
    "The gradient relation").
    """
    if kind not in MOMENT_KINDS:
        raise ValueError(f"{wide_spec.name}: moment kind {kind!r}: expected one of {MOMENT_KINDS}")
    n, m = clone_factors(clone_cfg)
    _check_against_small(wide_spec, small_cfg, n, m)
    ranges = normalize_index(wide_spec.shape, index, wide_spec.name)
    wide_idx = [torch.arange(start, stop) for start, stop in ranges]
    p = carry_factors(wide_spec, small_cfg, n, m).grad_scale
    return gather_small(wide_spec.name, axis_maps(wide_spec, n, m), wide_idx, read, p if kind == "exp_avg" else p * p)
