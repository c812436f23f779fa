"""HyperCloning rules by parameter role: one widened tensor slice from the small slice it needs.

    linear weights (qkv, attn_out, mlp_in, mlp_gate_up, mlp_out, project_in, project_out, lm_head)
                          W'[i', j'] = W[pi(i'), pi(j')] / q       q = factor of the input axis (1)
    embedding, position   E'[v, j'] = E[v, pi(j')]                  no scaling (token embedding: / sqrt(n)
                                                                    when it is scaled by sqrt(hidden), Gemma)
    norms, biases         gamma o pi, beta o pi, b o pi             no scaling (QK-norm: over groups)
    tied fold             project_out, else the final norm, / c     the tied unembedding would need E'/c,
                          (gain 1 + w: (1 + w o pi) / c - 1)        c = n / a (`plan.tied_fold`)
    untied clone          lm_head' = (E o pi) / n                   a tied model with nowhere to fold
    diagonal variant      weights with both axes widened: output copy k reads only input copy k mod q,
                          with weight W; the other blocks are zero
    noise                 zero-sum over the q input copies (megaclone.clone.noise)
    depth growth          each target tensor is cloned from the source tensor its block copies, a zeroed
                          projection of an inserted block is zero (megaclone.clone.depth)

Everything is indexed with global indices, so a slice is computed identically whatever the layout.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from megaclone.clone.depth import DepthPlan, depth_plan
from megaclone.clone.noise import noise_applies, noise_scale, zero_sum_noise
from megaclone.clone.plan import (
    AxisMap,
    Index,
    axis_maps,
    clone_factors,
    embedding_divisor,
    groups_factor,
    small_spec_of,
    tied_fold,
)
from megaclone.config import CloneConfig, ModelConfig
from megaclone.spec import ParamSpec, normalize_index, param_name, spec_table

LINEAR_ROLES = ("qkv", "attn_out", "mlp_in", "mlp_gate_up", "mlp_out", "project_in", "project_out", "lm_head")
Reader = Callable[[str, Index], torch.Tensor]  # read(small_name, small_index) -> that slice of the small tensor


@functools.lru_cache(maxsize=8)
def _spec_table_of(cfg_fields: tuple) -> Mapping[str, ParamSpec]:
    return MappingProxyType(spec_table(ModelConfig(*cfg_fields)))


def small_spec_table(small_cfg: ModelConfig) -> Mapping[str, ParamSpec]:
    """spec_table(small_cfg), built once per config (ModelConfig is mutable, so keyed by its field values).

    Every chunk `clone_tensor` computes is checked against it; rebuilding it cost about 0.6 ms a chunk.
    """
    return _spec_table_of(tuple(getattr(small_cfg, f.name) for f in dataclasses.fields(small_cfg)))


def source_name(wide_spec: ParamSpec, small_cfg: ModelConfig) -> str:
    """The small parameter a widened one copies: the same name, except the lm_head of a clone that unties a tied
    model, which is built from the token embedding."""
    if wide_spec.role == "lm_head" and small_cfg.tied_embeddings:
        return param_name("embedding")
    return wide_spec.name


def _check_against_small(wide_spec: ParamSpec, small_cfg: ModelConfig, n: int, m: int, g: int | None = None) -> str:
    """The small name to read (`source_name`), after checking its shape against the widened spec."""
    name = source_name(wide_spec, small_cfg)
    small = small_spec_table(small_cfg).get(name)
    want = small_spec_of(wide_spec, n, m, g, small_cfg.head_size)
    # an untying clone's lm_head reads the embedding: the same axes under another name, role and layer
    fits = small is not None and (small == want if name == wide_spec.name else small.axes == want.axes)
    if not fits:
        got = "absent" if small is None else f"shape {list(small.shape)}"
        raise ValueError(f"{wide_spec.name}: a x{n} (ffn x{m}) clone of shape {list(wide_spec.shape)} needs a small "
                         f"parameter of shape {list(want.shape)} ({name}); the small model config has it {got}")
    return name


def fold_divisor(wide_spec: ParamSpec, small_cfg: ModelConfig, n: int) -> float:
    """The divisor a widened tensor takes on top of its role's rule: a for the token embedding (Gemma's sqrt(n)),
    c = n / a for the tensor that takes the tied fold (`plan.tied_fold`), 1 otherwise."""
    a = embedding_divisor(small_cfg, n)
    if wide_spec.role == "embedding":
        return a
    if wide_spec.role == tied_fold(small_cfg) != "lm_head":
        return n / a
    return 1


@dataclass(frozen=True)
class TensorPlan:
    """How one target tensor is built: the source tensor it copies (None: zero) and the clone map of each axis."""

    source: str | None
    maps: list[AxisMap]
    n: int
    m: int


def plan_tensor(wide_spec: ParamSpec, small_cfg: ModelConfig, clone_cfg: CloneConfig) -> TensorPlan:
    """Check the target tensor against the source model (grown to the target depth) and return its plan."""
    n, m = clone_factors(clone_cfg)
    g = groups_factor(clone_cfg)
    depth: DepthPlan = depth_plan(small_cfg, clone_cfg)
    deep_cfg = dataclasses.replace(small_cfg, num_layers=depth.num_layers) if depth.grown else small_cfg
    name = _check_against_small(wide_spec, deep_cfg, n, m, g)
    source = depth.source_of(wide_spec) if name == wide_spec.name else name  # an untying clone's lm_head: E
    return TensorPlan(source, axis_maps(wide_spec, n, m, g, small_cfg.head_size), n, m)


def uses_diagonal(wide_spec: ParamSpec, maps: list[AxisMap], variant: str) -> bool:
    """The diagonal rule applies to linear weights whose output and input axes are both widened."""
    return (variant == "diagonal" and wide_spec.role in LINEAR_ROLES and not wide_spec.is_bias
            and len(maps) == 2 and maps[0].copies > 1 and maps[1].factor > 1)


def gather_small(name: str, maps: list, wide_idx: list[torch.Tensor], read: Reader,
                 divisor: float = 1) -> torch.Tensor:
    """out[i'] = small[pi(i')] / divisor in fp32 for the wide indices `wide_idx`, reading the small tensor `name` once.

    The read is the tight contiguous small range the indices copy, so a target shard reads only the small
    units its copies come from. The division runs on the small slice, before the gather: the same values
    as dividing the gathered ones, on a fraction of the elements. Shared by the weights' and the Adam
    moments' rules.
    """
    if any(len(w) == 0 for w in wide_idx):
        return torch.zeros([len(w) for w in wide_idx])
    small_idx = [amap.small_index(w) for amap, w in zip(maps, wide_idx)]
    lows = [int(s.min()) for s in small_idx]
    small_index = tuple(slice(lo, int(s.max()) + 1) for lo, s in zip(lows, small_idx))
    small = read(name, small_index)
    want = tuple(sl.stop - sl.start for sl in small_index)
    if tuple(small.shape) != want:
        raise ValueError(f"{name}: read({name!r}, {small_index}) returned shape {list(small.shape)}, "
                         f"expected {list(want)}")
    out = small.detach().to(dtype=torch.float32, device="cpu")
    if divisor != 1:
        out = out / divisor
    for dim, (s, lo) in enumerate(zip(small_idx, lows)):
        out = out.index_select(dim, s - lo)  # gather along this axis: wide element <- small element pi(i')
    return out


def clone_tensor(wide_spec: ParamSpec, small_cfg: ModelConfig, clone_cfg: CloneConfig, read: Reader,
                 index: Index = ()) -> torch.Tensor:
    """The slice `index` (step-1 slices) of one widened global tensor, in fp32.

    Calls `read(name, small_index)` once, for the tight contiguous small range the slice copies
    (a target TP shard reads exactly the small units its copies come from, nothing else). `name` is the source
    tensor: the target's own name, or its source block's under depth growth; a zeroed tensor reads nothing.
    """
    plan = plan_tensor(wide_spec, small_cfg, clone_cfg)
    ranges = normalize_index(wide_spec.shape, index, wide_spec.name)
    if plan.source is None:  # a zeroed projection of an inserted block: nothing to read
        return torch.zeros([stop - start for start, stop in ranges])
    maps, source = plan.maps, plan.source
    wide_idx = [torch.arange(start, stop) for start, stop in ranges]
    c = fold_divisor(wide_spec, small_cfg, plan.n)
    if wide_spec.role not in LINEAR_ROLES or wide_spec.is_bias:  # embeddings, norms, biases: copies, divided by c
        if c != 1 and small_cfg.norm_unit_offset and wide_spec.role == "final_norm" and not wide_spec.is_bias:
            return (1 + gather_small(source, maps, wide_idx, read)) / c - 1  # the gain 1 + w is what is divided
        return gather_small(source, maps, wide_idx, read, c)
    q = maps[1].factor
    diagonal = uses_diagonal(wide_spec, maps, clone_cfg.variant)
    noisy = clone_cfg.noise_db is not None and noise_applies(wide_spec, q)
    if not diagonal and not noisy:  # the plain linear rule W[pi(i'), pi(j')] / q
        return gather_small(source, maps, wide_idx, read, q * c)
    out = gather_small(source, maps, wide_idx, read)
    if out.numel() == 0:
        return out
    if diagonal:
        copy_out = maps[0].copy_index(wide_idx[0]) % q
        copy_in = maps[1].copy_index(wide_idx[1])
        mask = copy_out.unsqueeze(1) == copy_in.unsqueeze(0)  # [rows, cols]
        signal = torch.where(mask, out, torch.zeros_like(out))
    else:
        signal = out / q
    if noisy:
        scale = noise_scale(float(clone_cfg.noise_db), q, diagonal)
        signal += zero_sum_noise(wide_spec, int(clone_cfg.seed), maps[1], ranges[0], ranges[1], out.abs(), scale)
    return signal if c == 1 else signal / c
