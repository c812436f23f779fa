"""Zero-sum symmetry-breaking noise, layout invariant.

For every output row and every small input element of a weight whose input is widened by q, the q
copies of that input element get a noise vector that sums to zero: the forward pass is unchanged
(exactly, in exact arithmetic) but the copies receive different gradients. The normal values come
from the counter-based generator keyed by (seed, name, global flat index in the WIDE tensor), and a
block of q copies is always drawn whole, so every target rank computes the same values as TP=1 even
when its slice cuts through the copies of one input unit.
"""

from __future__ import annotations

import math

import torch

from megaclone.clone.plan import AxisMap
from megaclone.rng import counter_normal
from megaclone.spec import ParamSpec

_CHUNK_ELEMENTS = 1 << 22
NOISE_ROLES = ("qkv", "attn_out", "mlp_in", "mlp_gate_up", "mlp_out", "project_in", "project_out")
_STREAM = "hyperclone-noise/"  # keeps noise independent of init values drawn with the same seed and name


def noise_applies(spec: ParamSpec, q: int) -> bool:
    """Noise goes only on linear weights of the blocks whose input axis is widened."""
    return spec.role in NOISE_ROLES and not spec.is_bias and len(spec.axes) == 2 and q > 1


def noise_scale(noise_db: float, q: int, diagonal: bool) -> float:
    """Multiplier of |W| * (z - mean z) giving noise power / signal power = 10^(-db/10).

    The signal is the rms of the widened weight over one block of q copies: |W|/q (symmetric, q equal
    entries) or |W|/sqrt(q) (diagonal, one entry W and q-1 zeros). sqrt(q/(q-1)) undoes the variance
    lost by subtracting the mean over q independent standard normals.
    """
    signal = 1.0 / math.sqrt(q) if diagonal else 1.0 / q
    return signal * math.sqrt(q / (q - 1)) * 10.0 ** (-noise_db / 20.0)


def zero_sum_noise(spec: ParamSpec, seed: int, in_map: AxisMap, rows: tuple[int, int], cols: tuple[int, int],
                   small_abs: torch.Tensor, scale: float) -> torch.Tensor:
    """Noise [rows, cols] for the wide slice (rows, cols) of `spec`; `small_abs` is |W[pi(i'), pi(j')]| there.

    Elementwise ops only (the mean over copies is an explicit sum in copy order), so a value never
    depends on the shape of the slice it was computed in: bit-identical at every layout.
    """
    q, unit = in_map.factor, in_map.unit_size
    c0, c1 = cols
    block = q * unit  # wide columns of one block of q copies of one small input unit
    lo, hi = (c0 // block) * block, -(-c1 // block) * block  # whole copy blocks around [c0, c1)
    step = max(1, _CHUNK_ELEMENTS // (hi - lo))  # rows per chunk: bounds the noise and its flat indices
    parts = []
    for r0 in range(rows[0], rows[1], step):
        r1 = min(rows[1], r0 + step)
        z = counter_normal(seed, _STREAM + spec.name, spec.shape, (slice(r0, r1), slice(lo, hi)))
        copies = z.view(r1 - r0, (hi - lo) // block, q, unit)  # [rows, small units, copies, unit]
        total = copies[:, :, 0] + copies[:, :, 1]
        for k in range(2, q):
            total += copies[:, :, k]
        copies -= (total / q).unsqueeze(2)  # z is now centered over the copies: [rows, wide cols]
        parts.append(z[:, c0 - lo: c1 - lo])
    eta = parts[0] if len(parts) == 1 and parts[0].is_contiguous() else torch.cat(parts)  # fresh either way
    return eta.mul_(small_abs).mul_(scale)
