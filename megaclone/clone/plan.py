"""The clone map: which small element every widened element copies, and which small slice a target needs.

On every widened axis, new unit u' copies small unit u' // factor with the offset inside the unit
kept, and u' % factor is its copy index (copies adjacent, "interleaved", docs/design.md, "The clone map"). A unit
is `Axis.unit_size` elements: a whole query group's rows [q heads, k, v] for qkv, one FFN row, or the
two rows [gate_u, up_u] of the unit-interleaved SwiGLU weight. Copying whole units therefore widens
gate and up with the same map without any regrouping. Because copies are adjacent, a contiguous range
of widened units (a target TP shard) needs one contiguous range of small units.

Factors: n widens the hidden size and the query heads, m the FFN (default n), g the query groups (KV heads,
default n; g divides n). With g < n each new group g' copies small group g' // g and holds r = n / g copies of
its query heads, copy-major: its qkv unit is [r x (the small group's q rows), k, v] (`GroupRowsMap`), and its
attention-output columns are r copies of the small group's columns, so they are n adjacent copies of each
small group's column block (a plain AxisMap with the small unit). Wide head j' of a group computes small head
j' % (heads per group) with the group's copied k and v: the attention pattern of the small head. QK-norm over all
heads follows: q_norm has the attention output's map (n copies of every small q element, so the norm over the
n H hd q rows sees n copies of each small row: the same statistics), k_norm the plain map with factor g (g copies
of each k row among the g G hd).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from megaclone.clone.depth import deepen_model_config
from megaclone.config import CloneConfig, ModelConfig
from megaclone.spec import Axis, ParamSpec, normalize_index, param_name

VARIANTS = ("symmetric", "diagonal")
Index = tuple[slice, ...]


def _check_factor(value: object, flag: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{flag}={value!r}: expected an integer >= {minimum}")
    return int(value)


def _check_groups(n: int, g: int | None) -> int:
    g = n if g is None else _check_factor(g, "--hyperclone-groups", 1)
    if n % g:
        raise ValueError(f"--hyperclone-groups={g} must divide --hyperclone={n} (each new group holds n / g copies "
                         "of its query heads)")
    return g


def widen_model_config(cfg: ModelConfig, n: int, m: int | None = None, g: int | None = None) -> ModelConfig:
    """The config of the n-times wider clone: hidden, heads (and a separate embedding width) times n, FFN times m
    and groups times g (both default n).

    The head size is kept, so the softmax scale and RoPE do not change; vocabulary, layers, norms and
    positions are unchanged. A tied model with nowhere to fold the unembedding's 1/n (`tied_fold`) is untied.
    """
    n = _check_factor(n, "--hyperclone", 1)
    m = n if m is None else _check_factor(m, "--hyperclone-ffn", 1)
    g = _check_groups(n, g)
    tied = cfg.tied_embeddings and (n == 1 or tied_fold(cfg) != "lm_head")  # n = 1: nothing to fold
    if cfg.tied_embeddings and not tied:
        warnings.warn("the clone unties the embeddings: the model has no parametric final norm and no project_out "
                      "to fold the tied unembedding's 1/n into, so the wide model gets its own lm_head (E o pi) / n",
                      stacklevel=2)
    return dataclasses.replace(cfg, hidden_size=n * cfg.hidden_size, num_heads=n * cfg.num_heads,
                               num_query_groups=g * cfg.num_query_groups, head_size=cfg.head_size,
                               ffn_size=m * cfg.ffn_size, tied_embeddings=tied,
                               embed_size=None if cfg.embed_size is None else n * cfg.embed_size)


def tied_fold(cfg: ModelConfig) -> str | None:
    """The role whose clone takes the tied unembedding's rescale (docs/design.md, "Model options of imported families").

    A tied E' serves both ends: the input needs E' = (E o pi) / a (a = `embedding_divisor`), the output then sums
    n copies and gives n / a times the logits. The last map before the unembedding divides by c = n / a instead:
    project_out when the model has it, else the final norm's gain and bias; with neither (OLMo's norm has no
    parameters) the clone is untied and "lm_head" is built from the embedding. None for an untied model.
    """
    if not cfg.tied_embeddings:
        return None
    if cfg.has_projections:
        return "project_out"
    return "final_norm" if cfg.final_norm and cfg.norm_affine else "lm_head"


def embedding_divisor(cfg: ModelConfig, n: int) -> float:
    """a: the widened token embedding is (E o pi) / a. Gemma scales it by sqrt(hidden), which grows by sqrt(n), so
    a = sqrt(n) keeps the block input a clone (exactly 1 for n = 1); 1 otherwise."""
    return math.sqrt(n) if cfg.scale_embeddings else 1


def clone_factors(clone_cfg: CloneConfig) -> tuple[int, int]:
    """(n, m) of a CloneConfig, validated before any work: bad values raise ValueError naming the flag.

    n = 1 keeps the hidden size (FFN-only widening, depth growth alone); something must grow.
    """
    n = _check_factor(clone_cfg.factor or (1 if clone_cfg.grow_layers else 0), "--hyperclone", 1)
    m = n if clone_cfg.ffn_factor is None else _check_factor(clone_cfg.ffn_factor, "--hyperclone-ffn", 1)
    _check_groups(n, clone_cfg.groups_factor)
    if n == m == 1 and not clone_cfg.grow_layers:
        raise ValueError("--hyperclone=1 keeps the width and --hyperclone-ffn is 1: nothing grows (give "
                         "--hyperclone-ffn M >= 2 or --grow-layers N)")
    if clone_cfg.variant not in VARIANTS:
        raise ValueError(f"clone.variant={clone_cfg.variant!r}: expected one of {VARIANTS}")
    db = clone_cfg.noise_db
    if db is not None and (isinstance(db, bool) or not isinstance(db, numbers.Real) or db != db
                           or abs(float(db)) == float("inf")):
        raise ValueError(f"clone.noise_db={db!r}: expected a finite number of dB or None (no noise)")
    return n, m


def groups_factor(clone_cfg: CloneConfig) -> int:
    """g of a CloneConfig: the query-group factor (default n)."""
    return _check_groups(clone_factors(clone_cfg)[0], clone_cfg.groups_factor)


def grown_model_config(small_cfg: ModelConfig, clone_cfg: CloneConfig) -> ModelConfig:
    """The target of a clone config: the source grown to its depth, then widened by (n, m, g)."""
    n, m = clone_factors(clone_cfg)
    return widen_model_config(deepen_model_config(small_cfg, clone_cfg), n, m, groups_factor(clone_cfg))


def axis_factor(axis: Axis, n: int, m: int, g: int | None = None) -> int:
    """How many copies of each small unit (whole wide units) the axis holds after widening."""
    return {"hidden": n, "embed": n, "groups": n if g is None else g, "ffn": m, "vocab": 1, "seq": 1}[axis.kind]


@dataclass(frozen=True)
class AxisMap:
    """The clone map on one axis of a widened tensor."""

    factor: int
    unit_size: int

    def small_index(self, wide: torch.Tensor) -> torch.Tensor:
        """Small element copied by each wide element: unit u' // factor, same offset."""
        return (wide // self.unit_size // self.factor) * self.unit_size + wide % self.unit_size

    def copy_index(self, wide: torch.Tensor) -> torch.Tensor:
        """Which copy (0 .. copies-1) of its small unit each wide element belongs to."""
        return (wide // self.unit_size) % self.factor

    @property
    def copies(self) -> int:
        """Wide elements per small element (the most, where it differs inside a unit)."""
        return self.factor

    @property
    def small_unit(self) -> int:
        """Elements of one small unit (the wide unit, except for the groups axis when g < n)."""
        return self.unit_size


@dataclass(frozen=True)
class GroupRowsMap(AxisMap):
    """The qkv rows of a groups factor g < n: unit u' copies small group u' // g (`factor` g, `unit_size` the wide
    unit), and inside it [r copies of the small q rows, k, v]: q rows have g * r = n copies, k and v rows g."""

    q_size: int = 0  # the small group's q rows: heads per group x head size
    repeats: int = 1  # r = n / g

    @property
    def small_unit(self) -> int:
        return self.unit_size - (self.repeats - 1) * self.q_size

    def _split(self, wide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unit, offset = wide // self.unit_size, wide % self.unit_size
        return unit, offset, offset < self.repeats * self.q_size

    def small_index(self, wide: torch.Tensor) -> torch.Tensor:
        unit, offset, is_q = self._split(wide)
        inner = torch.where(is_q, offset % self.q_size, offset - (self.repeats - 1) * self.q_size)
        return (unit // self.factor) * self.small_unit + inner

    def copy_index(self, wide: torch.Tensor) -> torch.Tensor:
        """Group copy a and head copy c give copy a + g c (k, v rows: a), so group copies align as in AxisMap."""
        unit, offset, is_q = self._split(wide)
        return unit % self.factor + self.factor * torch.where(is_q, offset // self.q_size, 0)

    @property
    def copies(self) -> int:
        return self.factor * self.repeats


def axis_map(wide_spec: ParamSpec, dim: int, n: int, m: int, g: int | None = None, head_size: int = 0) -> AxisMap:
    """The clone map on axis `dim` of a widened parameter. Only qkv rows with g < n need the head size."""
    axis = wide_spec.axes[dim]
    g = n if g is None else g
    if axis.kind != "groups" or g == n:
        return AxisMap(axis_factor(axis, n, m, g), axis.unit_size)
    r = n // g
    if wide_spec.role == "attn_out" or wide_spec.name == param_name("q_norm", wide_spec.layer - 1, wide_spec.is_bias):
        return AxisMap(n, axis.unit_size // r)  # a group's query heads: n adjacent copies of each small group's block
    if wide_spec.role == "qk_norm":  # k_norm: a group's one k head, g copies
        return AxisMap(g, axis.unit_size)
    if head_size <= 0:
        raise ValueError(f"{wide_spec.name}: the qkv rows of a groups factor {g} < {n} need the head size")
    return GroupRowsMap(g, axis.unit_size, q_size=(axis.unit_size - 2 * head_size) // r, repeats=r)


def axis_maps(wide_spec: ParamSpec, n: int, m: int, g: int | None = None, head_size: int = 0) -> list[AxisMap]:
    return [axis_map(wide_spec, dim, n, m, g, head_size) for dim in range(len(wide_spec.axes))]


def small_spec_of(wide_spec: ParamSpec, n: int, m: int, g: int | None = None, head_size: int = 0) -> ParamSpec:
    """The spec of the small parameter a widened one is cloned from (same name, units divided)."""
    axes = []
    for dim, a in enumerate(wide_spec.axes):
        f = axis_factor(a, n, m, g)
        if a.num_units % f:
            raise ValueError(f"{wide_spec.name}: {a.num_units} {a.kind} units are not a multiple of the clone "
                             f"factor {f}")
        axes.append(Axis(a.kind, a.num_units // f, axis_map(wide_spec, dim, n, m, g, head_size).small_unit))
    return dataclasses.replace(wide_spec, axes=tuple(axes))


def small_read_ranges(wide_spec: ParamSpec, n: int, m: int, index: Index = ()) -> list[tuple[int, int]]:
    """The small [start, stop) per dimension that `clone_tensor` reads for the wide slice `index`.

    The tight bounding range of the copied small elements: for a whole-unit wide range it is exactly
    the small units [first // factor, (last // factor) + 1).
    """
    ranges = normalize_index(wide_spec.shape, index, wide_spec.name)
    out = []
    for (start, stop), amap in zip(ranges, axis_maps(wide_spec, n, m)):
        if stop <= start:
            out.append((0, 0))
            continue
        small = amap.small_index(torch.arange(start, stop))
        out.append((int(small.min()), int(small.max()) + 1))
    return out
