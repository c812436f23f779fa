"""Counter-based random numbers keyed by (seed, name, global index).

Initialisation and clone noise draw from here so that a value depends only on which element of
which global tensor it is, never on the layout, the rank or the order of work: the same seed gives
bit-identical weights at any TP/PP and with any number of workers.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK32 = 0xFFFFFFFF


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def _uniform(key: int, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform in (0, 1), float64, from a key, an int64 counter tensor and a stream number."""
    lo = counter & _MASK32
    hi = counter >> 32
    h = _mix32(lo ^ _mix32(torch.full_like(lo, key ^ (stream * 0x9E3779B9 & _MASK32))))
    h = _mix32(h ^ _mix32(hi + 0x632BE5AB))
    return (h.double() + 0.5) / 2.0**32


def global_flat_index(shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
    """Flat (row-major) global indices of the elements of `shape[index]`, as an int64 tensor."""
    ranges = []
    for size, sl in zip(shape, tuple(index) + (slice(None),) * (len(shape) - len(index))):
        start, stop, step = sl.indices(size)
        ranges.append(torch.arange(start, stop, step, dtype=torch.int64))
    flat = torch.zeros((), dtype=torch.int64)
    for size, r in zip(shape, ranges):
        flat = flat.unsqueeze(-1) * size + r
    return flat


def counter_normal(seed: int, name: str, shape: tuple[int, ...],
                   index: tuple[slice, ...] = ()) -> torch.Tensor:
    """Standard normal values (float32) for the elements `index` of a global tensor of `shape`."""
    key = _key(seed, name)
    counter = global_flat_index(shape, index)
    u1 = _uniform(key, counter, 0)
    u2 = _uniform(key, counter, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.float()
