"""megaclone.rng: the values are a contract (initial weights and clone noise in checkpoints depend on them).

`reference_counter_normal` is the first implementation (int64 torch ops with masks), kept here
verbatim as the oracle: the fast one must give the same float32 bits for every seed, name, shape and
index, including strided and reversed slices, block tails and flat indices past 2**32.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from megaclone import rng
from megaclone.rng import counter_normal

# --- the reference: megaclone/rng.py as first written ----------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _ref_key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _ref_mix32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def _ref_uniform(key: int, counter: torch.Tensor, stream: int) -> torch.Tensor:
    lo = counter & _MASK32
    hi = counter >> 32
    h = _ref_mix32(lo ^ _ref_mix32(torch.full_like(lo, key ^ (stream * 0x9E3779B9 & _MASK32))))
    h = _ref_mix32(h ^ _ref_mix32(hi + 0x632BE5AB))
    return (h.double() + 0.5) / 2.0**32


def reference_flat_index(shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
    ranges = []
    for size, sl in zip(shape, tuple(index) + (slice(None),) * (len(shape) - len(index))):
        start, stop, step = sl.indices(size)
        ranges.append(torch.arange(start, stop, step, dtype=torch.int64))
    flat = torch.zeros((), dtype=torch.int64)
    for size, r in zip(shape, ranges):
        flat = flat.unsqueeze(-1) * size + r
    return flat


def reference_counter_normal(seed: int, name: str, shape: tuple[int, ...],
                             index: tuple[slice, ...] = ()) -> torch.Tensor:
    key = _ref_key(seed, name)
    counter = reference_flat_index(shape, index)
    u1 = _ref_uniform(key, counter, 0)
    u2 = _ref_uniform(key, counter, 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.float()


# --- equality with the reference --------------------------------------------------------------------------------

S = slice
CASES = [
    ((), ()),
    ((1,), ()),
    ((7,), ()),
    ((7,), (S(2, 5),)),
    ((64, 32), ()),
    ((64, 32), (S(16, 48), S(8, 24))),
    ((64, 32), (S(3, 4),)),  # index shorter than the shape: the rest whole
    ((64, 32), (S(None, None, 3), S(1, None, 5))),  # strided
    ((64, 32), (S(None, None, -1), S(30, 2, -7))),  # reversed
    ((64, 32), (S(10, 10), S(None))),  # empty
    ((64, 32), (S(-5, None), S(-9, -2))),  # negative bounds
    ((3, 5, 7), ()),
    ((3, 5, 7), (S(1, 3), S(None, None, 2), S(6, 0, -2))),
    ((2, 3, 4, 5), (S(None), S(1, 2), S(None), S(None, None, 4))),
    ((300, 257), ()),  # 77100 elements: several blocks and a tail
    ((50_000,), (S(1, 49_999, 1),)),
]


@pytest.mark.parametrize("shape,index", CASES)
@pytest.mark.parametrize("seed,name", [(0, "w"), (7, "layers.3.attn.qkv.weight"), (123456789, "hyperclone-noise/x")])
def test_equals_the_reference(shape: tuple[int, ...], index: tuple[slice, ...], seed: int, name: str) -> None:
    want = reference_counter_normal(seed, name, shape, index)
    got = counter_normal(seed, name, shape, index)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # the same bits


@pytest.mark.parametrize("shape,index", [
    ((2**20, 2**13), (S(2**19 - 2, 2**19 + 2), S(None, None, 97))),  # rows around flat index 2**32
    ((2**20, 2**13), (S(2**20 - 3, None), S(8000, None))),  # the last rows: flat index near 2**33
    ((3, 2**31, 5), (S(None), S(2**31 - 4, None, 3), S(None))),  # high words 0, 1, 2 ... in one call
    ((2**40, 16), (S(2**40 - 1000, None, 37), S(None, None, 5))),  # high words near 2**12
    ((2**61,), (S(2**61 - 50, None),)),  # high word near 2**29
])
def test_equals_the_reference_past_2_32(shape: tuple[int, ...], index: tuple[slice, ...]) -> None:
    """Flat indices >= 2**32 (the high word enters the hash), by index arithmetic: nothing whole is allocated."""
    flat = reference_flat_index(shape, index)
    assert int(flat.max()) >= 2**32
    want = reference_counter_normal(3, "big", shape, index)
    assert torch.equal(counter_normal(3, "big", shape, index).view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("shape,index", [((97, 61), (S(3, 90, 2), S(1, 60))),
                                         ((2**33,), (S(2**32 - 700, 2**32 + 900),))])
def test_independent_of_the_block_size(monkeypatch: pytest.MonkeyPatch, block: int, shape: tuple[int, ...],
                                       index: tuple[slice, ...]) -> None:
    """Blocks cut the work anywhere (tails of any length); the values do not depend on where."""
    want = reference_counter_normal(11, "b", shape, index)
    monkeypatch.setattr(rng, "_BLOCK", block)
    assert torch.equal(counter_normal(11, "b", shape, index).view(torch.int32), want.view(torch.int32))


def test_a_slice_equals_the_slice_of_the_whole() -> None:
    full = counter_normal(5, "w", (129, 33))
    for index in [(S(1, 128, 3), S(2, 31)), (S(None), S(None, None, 2)), (S(64, 65),)]:
        assert torch.equal(counter_normal(5, "w", (129, 33), index), full[index])


def test_seed_and_name_change_every_value() -> None:
    base = counter_normal(1, "w", (4096,))
    for other in (counter_normal(2, "w", (4096,)), counter_normal(1, "v", (4096,))):
        assert (base != other).float().mean() > 0.99
    assert abs(base.double().mean().item()) < 0.1 and abs(base.double().std().item() - 1) < 0.05
