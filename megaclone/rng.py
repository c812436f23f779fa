"""Counter-based random numbers keyed by (seed, name, global index).

Initialisation and clone noise draw from here so that a value depends only on which element of
which global tensor it is, never on the layout, the rank or the order of work: the same seed gives
bit-identical weights at any TP/PP and with any number of workers.

The values are a contract (checkpoints and tests depend on them): per element, two lowbias32 hashes
of the flat index's low and high 32-bit words give u1, u2 = (h + 0.5) / 2**32, and Box-Muller in float64
gives sqrt(-2 ln u1) cos(2 pi u2), rounded to float32. The hashing runs on numpy uint32 arrays (which wrap
modulo 2**32 by themselves), the float64 part on torch's log and cos (the functions the values were first
made with, elementwise: a value does not depend on the length of the call, so the blocks change nothing), in
cache-sized blocks of in-place operations: about 30x faster than the int64 torch ops with masks it replaces
(`bench/reshard_expand.py --rng-speed`). tests/test_rng.py keeps that first implementation as the oracle.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_STREAM_MUL = 0x9E3779B9  # stream s (0: u1, 1: u2) salts the key with s * this
_HI_SALT = 0x632BE5AB  # added to the flat index's high word before hashing it
_BLOCK = 1 << 15  # elements per pass: a pass's uint32 and float64 temporaries stay in L2


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _mix32_int(x: int) -> int:
    """lowbias32 of one Python integer (the per-call constants); the same function as `_mix32`."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MUL1) & _MASK32
    x ^= x >> 15
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def _mix32(x: np.ndarray, tmp: np.ndarray) -> None:
    """lowbias32 of a uint32 array, in place (`tmp`: a scratch array of the same size)."""
    np.right_shift(x, 16, out=tmp)
    x ^= tmp
    x *= np.uint32(_MUL1)
    np.right_shift(x, 15, out=tmp)
    x ^= tmp
    x *= np.uint32(_MUL2)
    np.right_shift(x, 16, out=tmp)
    x ^= tmp


def _flat_index_words(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """Low and high 32-bit words of the flat (row-major) global indices of `shape[index]`.

    The low word is computed in uint32 arithmetic, exact modulo 2**32 whatever the index; the high
    word is None when every index is below 2**32 (the usual case: then it is 0 everywhere).
    """
    full = tuple(index) + (slice(None),) * (len(shape) - len(index))
    terms = []  # per dimension: index * stride, int64
    stride = 1
    for size, sl in reversed(list(zip(shape, full))):
        terms.append(np.arange(*sl.indices(size), dtype=np.int64) * stride)
        stride *= size
    terms.reverse()
    lo = np.zeros((), dtype=np.uint32)
    for t in terms:  # [d0, d1, ...] by outer sums
        lo = np.add.outer(lo, (t & _MASK32).astype(np.uint32))
    if sum(int(t.max()) if t.size else 0 for t in terms) <= _MASK32:
        return lo, None
    flat = np.zeros((), dtype=np.int64)
    for t in terms:
        flat = np.add.outer(flat, t)
    return lo, (flat >> 32).astype(np.uint32)


def counter_normal(seed: int, name: str, shape: tuple[int, ...],
                   index: tuple[slice, ...] = ()) -> torch.Tensor:
    """Standard normal values (float32) for the elements `index` of a global tensor of `shape`."""
    key = _key(seed, name)
    salts = [_mix32_int(key ^ (stream * _STREAM_MUL & _MASK32)) for stream in (0, 1)]
    lo, hi = _flat_index_words(shape, index)
    out = torch.empty(lo.shape, dtype=torch.float32)
    lo, flat_out = lo.reshape(-1), out.view(-1)
    hi_mix = np.uint32(_mix32_int(_HI_SALT))
    if hi is not None:
        hi = hi.reshape(-1) + np.uint32(_HI_SALT)  # wraps modulo 2**32, as the contract's mask does
        _mix32(hi, np.empty_like(hi))
    block = max(1, min(_BLOCK, lo.size))
    h, tmp = np.empty((2, block), dtype=np.uint32), np.empty(block, dtype=np.uint32)
    u_np = np.empty((2, block), dtype=np.float64)
    u = torch.from_numpy(u_np)  # shares u_np's memory: numpy fills it, torch's log and cos run on it
    for start in range(0, lo.size, block):
        stop = min(lo.size, start + block)
        k = stop - start
        for stream, salt in enumerate(salts):
            x = h[stream, :k]
            np.bitwise_xor(lo[start:stop], np.uint32(salt), out=x)
            _mix32(x, tmp[:k])
            x ^= hi[start:stop] if hi is not None else hi_mix
            _mix32(x, tmp[:k])
            np.multiply(x, 2.0 ** -32, out=u_np[stream, :k])  # (h + 0.5) / 2**32, exactly, in two steps
            u_np[stream, :k] += 2.0 ** -33
        u1, u2 = u[0, :k], u[1, :k]
        u1.log_().mul_(-2.0).sqrt_()
        u2.mul_(2.0 * math.pi).cos_()
        flat_out[start:stop].copy_(u1.mul_(u2))  # float64 -> float32, round to nearest
    return out
