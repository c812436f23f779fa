"""Adam's moments of a widened model, from the small model's, with the same clone maps as the weights.

At the cloned point every copy of a small unit sees the cloned activations, so (docs/design.md, "Carrying the
optimizer state")

    grad'[i'] = grad[pi(i')] / p        p = widening factor of the parameter's OUTPUT in the gradient sense

and Adam's moments carry over as m' = (m o pi) / p, v' = (v o pi) / p**2. Each role, with the value scale s
(the widened value is (small o pi) / s, summed over input copies for the diagonal variant) and p:

    role                          s      p      why
    qkv, attn_out, mlp_*,         q      out    the linear rule; the upstream gradient of a widened output is g/p
    project_in, project_out
    lm_head                       n      1      vocab is not widened: dL/dlogits is the small one
    embedding                     a      n/a    E' = (E o pi)/a (a = sqrt(n) when scaled by sqrt(hidden), Gemma,
                                                else 1); the block input x' = x o pi gets dL/dx o pi / n, times
                                                sqrt(n d) / sqrt(d) when scaled; when tied, the unembedding
                                                sees the folded output (z o pi)/c, c = n/a: also grad/(n/a)
    pos_embedding                 1      n      the output is the hidden width
    norm (gamma, beta), biases    1      out    an elementwise map on a widened axis (QK-norm: groups)
    final_norm, untied            1      n      like any norm
    tied fold target (/c):        s c    a      its output feeds E' = (E o pi)/a, so dL/dz' = (dL/dz o pi)/a
    final_norm or project_out                   (`megaclone.clone.plan.tied_fold`)

A clone that unties a tied model (no parametric final norm, no project_out) has no carry rule: the small
embedding's moments mix the gradients of its two uses, which the wide model keeps apart.

`copies` c is how many wide elements copy each small element (the product of the axis factors), so
||grad'||^2 = c / p^2 * ||grad||^2: the weight that turns a wide gradient norm into the small one's.

Depth growth: the grown model at the source width is an ordinary model whose optimizer state is the source's
for every copied tensor (a target block carries its source block's moments) and zero for the zeroed output
projections of inserted blocks; the rules above then widen that state. Exact continuation cannot hold for an
inserted block: at step 0 its zeroed projections get a nonzero gradient at once, with no history behind it.
A groups factor g < n is refused: a qkv weight's k and v rows would have p = g, its q rows p = n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megaclone.clone.plan import Index, axis_maps, clone_factors, embedding_divisor, groups_factor, grown_model_config
from megaclone.clone.rules import LINEAR_ROLES, Reader, fold_divisor, gather_small, plan_tensor
from megaclone.config import CloneConfig, ModelConfig
from megaclone.spec import ParamSpec, build_param_specs, normalize_index

MOMENT_KINDS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class CarryFactors:
    """How one widened parameter relates to its small source, for the optimizer."""

    value_scale: float  # s: widened value = (small o pi) / s; its learning rate is lr / s, weight decay wd * s
    grad_scale: float  # p: widened gradient = (small gradient o pi) / p; Adam's eps becomes eps / p
    copies: int  # c: wide elements per small element

    @property
    def norm_weight(self) -> float:
        """p^2 / c: ||small grad||^2 = norm_weight * ||wide grad||^2 (at the cloned point and after it)."""
        return self.grad_scale ** 2 / self.copies


def _exact(x: float) -> float:
    """An integral factor as an int, so group names and settings read s2, not s2.0."""
    return int(x) if float(x).is_integer() else x


def carry_factors(wide_spec: ParamSpec, small_cfg: ModelConfig, n: int, m: int) -> CarryFactors:
    """The (s, p, c) of one widened parameter (see the module docstring for the derivation by role)."""
    if wide_spec.role == "lm_head" and small_cfg.tied_embeddings:
        raise ValueError(f"{wide_spec.name}: the x{n} clone unties the tied embedding (the model has no parametric "
                         "final norm or project_out to fold 1/n into), and the small embedding's Adam moments mix "
                         "the gradients of both its uses: they cannot be carried; use the fresh optimizer")
    factors = [amap.factor for amap in axis_maps(wide_spec, n, m)]
    copies = math.prod(factors)
    role = wide_spec.role
    if role in LINEAR_ROLES and not wide_spec.is_bias:  # axes (output, input)
        s, p = factors[1], factors[0]
    elif role in ("embedding", "pos_embedding"):  # axes (vocab | seq, hidden): the output is the hidden axis
        s, p = 1, factors[1]
    else:  # norms and biases: one widened axis, elementwise
        s, p = 1, factors[0]
    a, c = embedding_divisor(small_cfg, n), fold_divisor(wide_spec, small_cfg, n)
    if role == "embedding":
        s, p = a, p / a
    elif c != 1:  # the tied fold target: value / c, its output feeds E' = (E o pi) / a
        s, p = s * c, a
    return CarryFactors(_exact(s), _exact(p), copies)


def _check_groups_carried(clone_cfg: CloneConfig, n: int, where: str = "") -> None:
    if groups_factor(clone_cfg) != n:
        raise ValueError(f"{where}Adam's moments cannot be carried with --hyperclone-groups {groups_factor(clone_cfg)} "
                         f"< --hyperclone {n} (k, v and q rows scale differently)")


def check_carry_possible(small_cfg: ModelConfig, clone_cfg: CloneConfig) -> None:
    """Raise ValueError, before any work, when the moments of this clone cannot be carried (`carry_factors`)."""
    n, m = clone_factors(clone_cfg)
    _check_groups_carried(clone_cfg, n)
    for spec in build_param_specs(grown_model_config(small_cfg, clone_cfg)):
        carry_factors(spec, small_cfg, n, m)


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
    plan = plan_tensor(wide_spec, small_cfg, clone_cfg)
    _check_groups_carried(clone_cfg, plan.n, f"{wide_spec.name}: ")
    p = carry_factors(wide_spec, small_cfg, plan.n, plan.m).grad_scale  # refuses an untying clone
    ranges = normalize_index(wide_spec.shape, index, wide_spec.name)
    if plan.source is None:  # a zeroed projection of an inserted block starts without history
        return torch.zeros([stop - start for start, stop in ranges])
    wide_idx = [torch.arange(start, stop) for start, stop in ranges]
    return gather_small(plan.source, plan.maps, wide_idx, read, p if kind == "exp_avg" else p * p)
