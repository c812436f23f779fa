"""The clone map: which small element every widened element copies, and which small slice a target needs.

On every widened axis, new unit u' copies small unit u' // factor with the offset inside the unit
kept, and u' % factor is its copy index (copies adjacent, "interleaved", docs/design.md, "The clone map"). A unit
is `Axis.unit_size` elements: a whole query group's rows [q heads, k, v] for qkv, one FFN row, or the
two rows [gate_u, up_u] of the unit-interleaved SwiGLU weight. Copying whole units therefore widens
gate and up with the same map without any regrouping. Because copies are adjacent, a contiguous range
of widened units (a target TP shard) needs one contiguous range of small units.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

import torch

from megaclone.config import CloneConfig, ModelConfig
from megaclone.spec import Axis, ParamSpec, normalize_index

VARIANTS = ("symmetric", "diagonal")
Index = tuple[slice, ...]


def _check_factor(value: object, flag: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{flag}={value!r}: expected an integer >= {minimum}")
    return int(value)


def widen_model_config(cfg: ModelConfig, n: int, m: int | None = None) -> ModelConfig:
    """The config of the n-times wider clone: hidden, heads and groups times n, FFN times m (default n).

    The head size is kept, so the softmax scale and RoPE do not change; vocabulary, layers, norm and
    positions are unchanged.
    """
    n = _check_factor(n, "--hyperclone", 2)
    m = n if m is None else _check_factor(m, "--hyperclone-ffn", 1)
    return dataclasses.replace(cfg, hidden_size=n * cfg.hidden_size, num_heads=n * cfg.num_heads,
                               num_query_groups=n * cfg.num_query_groups, head_size=cfg.head_size,
                               ffn_size=m * cfg.ffn_size)


def clone_factors(clone_cfg: CloneConfig) -> tuple[int, int]:
    """(n, m) of a CloneConfig, validated before any work: bad values raise ValueError naming the flag."""
    n = _check_factor(clone_cfg.factor, "--hyperclone", 2)
    m = n if clone_cfg.ffn_factor is None else _check_factor(clone_cfg.ffn_factor, "--hyperclone-ffn", 1)
    if clone_cfg.variant not in VARIANTS:
        raise ValueError(f"clone.variant={clone_cfg.variant!r}: expected one of {VARIANTS}")
    db = clone_cfg.noise_db
    if db is not None and (isinstance(db, bool) or not isinstance(db, numbers.Real) or db != db
                           or abs(float(db)) == float("inf")):
        raise ValueError(f"clone.noise_db={db!r}: expected a finite number of dB or None (no noise)")
    return n, m


def axis_factor(axis: Axis, n: int, m: int) -> int:
    """How many copies of each small unit the axis holds after widening."""
    return {"hidden": n, "groups": n, "ffn": m, "vocab": 1, "seq": 1}[axis.kind]


@dataclass(frozen=True)
class AxisMap:
    """The clone map on one axis of a widened tensor."""

    factor: int
    unit_size: int

    def small_index(self, wide: torch.Tensor) -> torch.Tensor:
        """Small element copied by each wide element: unit u' // factor, same offset."""
        return (wide // self.unit_size // self.factor) * self.unit_size + wide % self.unit_size

    def copy_index(self, wide: torch.Tensor) -> torch.Tensor:
        """Which copy (0 .. factor-1) of its small unit each wide element belongs to."""
        return (wide // self.unit_size) % self.factor


def axis_maps(wide_spec: ParamSpec, n: int, m: int) -> list[AxisMap]:
    return [AxisMap(axis_factor(a, n, m), a.unit_size) for a in wide_spec.axes]


def small_spec_of(wide_spec: ParamSpec, n: int, m: int) -> ParamSpec:
    """The spec of the small parameter a widened one is cloned from (same name, units divided)."""
    axes = []
    for a in wide_spec.axes:
        f = axis_factor(a, n, m)
        if a.num_units % f:
            raise ValueError(f"{wide_spec.name}: {a.num_units} {a.kind} units are not a multiple of the clone "
                             f"factor {f}")
        axes.append(Axis(a.kind, a.num_units // f, a.unit_size))
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
