"""Zero-sum noise: sums to zero over each block of input copies, has the requested SNR, breaks symmetry.

Also the symmetry monitor `copy_similarity`.
"""

from __future__ import annotations

import math

import pytest
import torch

from megaclone.clone import NOISE_ROLES, axis_factor, build_clone_shard, copy_similarity, widen_model_config
from megaclone.config import CloneConfig
from megaclone.spec import spec_table
from tests.clone import bit_equal, dict_reader, random_small_state, small_config


def clone(cfg, state, **kw) -> dict[str, torch.Tensor]:
    return build_clone_shard(dict_reader(state), cfg, CloneConfig(**kw), 0, 1)


def copy_blocks(t: torch.Tensor, spec, n: int, m: int) -> torch.Tensor:
    """[rows, small input units, q copies, unit] view of a widened 2-D weight."""
    q, unit = axis_factor(spec.axes[1], n, m), spec.axes[1].unit_size
    return t.view(t.shape[0], -1, q, unit)


@pytest.mark.parametrize("variant", ["symmetric", "diagonal"])
@pytest.mark.parametrize("n,m", [(2, 2), (3, 1)])
def test_noise_is_zero_sum_and_only_where_allowed(variant: str, n: int, m: int) -> None:
    cfg = small_config("mha-gelu-ln-rope-bias-tied", tied_embeddings=False)
    state = random_small_state(cfg)
    clean = clone(cfg, state, factor=n, ffn_factor=m, variant=variant)
    noisy = clone(cfg, state, factor=n, ffn_factor=m, variant=variant, noise_db=0.0, seed=5)
    specs = spec_table(widen_model_config(cfg, n, m))
    noised = set()
    for name, spec in specs.items():
        eta = noisy[name] - clean[name]
        q = axis_factor(spec.axes[1], n, m) if len(spec.axes) == 2 else 1
        if spec.role not in NOISE_ROLES or spec.is_bias or q == 1:
            assert bit_equal(noisy[name], clean[name]), f"{name} must not be noised"
            continue
        noised.add(spec.role)
        assert eta.abs().max() > 0.1 * clean[name].abs().max()
        sums = copy_blocks(eta, spec, n, m).sum(2)  # [rows, small input units, unit]
        assert sums.abs().max() <= 1e-6 * eta.abs().max(), name
    assert noised == ({"qkv", "attn_out", "mlp_in", "mlp_out"} if m > 1 else {"qkv", "attn_out", "mlp_in"})


def measured_snr_db(cfg, state, n: int, variant: str, db: float) -> dict[str, float]:
    clean = clone(cfg, state, factor=n, variant=variant)
    noisy = clone(cfg, state, factor=n, variant=variant, noise_db=db, seed=1)
    specs = spec_table(widen_model_config(cfg, n))
    signal, noise = {}, {}
    for name, spec in specs.items():
        if spec.role in NOISE_ROLES and not spec.is_bias:
            eta = (noisy[name] - clean[name]).double()
            signal[spec.role] = signal.get(spec.role, 0.0) + clean[name].double().pow(2).sum().item()
            noise[spec.role] = noise.get(spec.role, 0.0) + eta.pow(2).sum().item()
    out = {role: 10 * math.log10(signal[role] / noise[role]) for role in signal}
    out["all"] = 10 * math.log10(sum(signal.values()) / sum(noise.values()))
    return out


@pytest.mark.parametrize("variant", ["symmetric", "diagonal"])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("db", [10.0, -5.0])
def test_noise_has_the_requested_snr(variant: str, n: int, db: float) -> None:
    """Signal = the widened weight, noise = noisy - clean; measured over ~50k-200k entries per role."""
    cfg = small_config("gqa-swiglu-rms-learned-nobias-untied", hidden_size=64, num_heads=8, num_query_groups=4,
                       num_layers=2, ffn_size=128)
    state = random_small_state(cfg, seed=2)
    got = measured_snr_db(cfg, state, n, variant, db)
    assert abs(got["all"] - db) < 0.15, got
    for role, value in got.items():
        assert abs(value - db) < 0.4, (role, got)


def test_noise_depends_on_seed_only_through_the_counter() -> None:
    cfg = small_config("mha-gelu-ln-rope-bias-tied")
    state = random_small_state(cfg)
    a = clone(cfg, state, factor=2, noise_db=10.0, seed=1)
    b = clone(cfg, state, factor=2, noise_db=10.0, seed=1)
    c = clone(cfg, state, factor=2, noise_db=10.0, seed=2)
    name = "blocks.0.attn.qkv.weight"
    assert bit_equal(a[name], b[name]) and not torch.equal(a[name], c[name])


@pytest.mark.parametrize("arch", ["mha-gelu-ln-rope-bias-tied", "gqa-swiglu-rms-learned-nobias-untied"])
def test_copy_similarity(arch: str) -> None:
    cfg = small_config(arch)
    state = random_small_state(cfg)
    n = 2
    specs = spec_table(widen_model_config(cfg, n))
    names = [s.name for s in specs.values() if s.role in NOISE_ROLES]  # weights and biases of the blocks
    for variant in ("symmetric", "diagonal"):
        clean = clone(cfg, state, factor=n, variant=variant)
        for name in names:
            assert copy_similarity(clean[name], specs[name], n) == pytest.approx(1.0, abs=1e-6), (variant, name)
    diagonal = clone(cfg, state, factor=n, variant="diagonal")
    qkv = "blocks.0.attn.qkv.weight"
    assert abs(copy_similarity(diagonal[qkv], specs[qkv], n, align=False)) < 0.1  # disjoint blocks, unaligned
    for db, low, high in ((10.0, 0.85, 0.97), (-5.0, 0.1, 0.5)):
        noisy = clone(cfg, state, factor=n, noise_db=db, seed=3)
        sim = copy_similarity(noisy[qkv], specs[qkv], n)
        assert low < sim < high, (db, sim)


def test_copy_similarity_on_tp_slices() -> None:
    cfg = small_config("mqa-gelu-ln-rope-untied")  # one small group: TP2 of the x2 clone splits its copies
    state = random_small_state(cfg)
    n = 2
    specs = spec_table(widen_model_config(cfg, n))
    noisy = clone(cfg, state, factor=n, noise_db=10.0, seed=3)
    for name in ("blocks.0.mlp.fc_in.weight", "blocks.0.mlp.fc_out.weight"):  # output split / input split
        spec = specs[name]
        full = copy_similarity(noisy[name], spec, n)
        parts = [copy_similarity(noisy[name][spec.tp_slices(r, 2)], spec, n, tp_rank=r, tp_size=2) for r in range(2)]
        assert full < 0.99 and all(0.5 < p < 0.99 for p in parts), (name, full, parts)
        if spec.tp_axis == 0:  # whole output units on each rank: the mean over ranks is the full value
            assert sum(parts) / 2 == pytest.approx(full, abs=1e-6), name
    out = specs["blocks.1.attn.out.weight"]  # its input (the group copies) is cut: alignment impossible
    local = noisy[out.name][out.tp_slices(1, 2)]
    assert math.isnan(copy_similarity(local, out, n, tp_rank=1, tp_size=2))
    assert 0.5 < copy_similarity(local, out, n, tp_rank=1, tp_size=2, align=False) < 0.99
    qkv = specs["blocks.0.attn.qkv.weight"]
    local = noisy[qkv.name][qkv.tp_slices(0, 2)]
    assert math.isnan(copy_similarity(local, qkv, n, tp_rank=0, tp_size=2))  # no group has both copies here
    with pytest.raises(ValueError, match="not the TP slice"):
        copy_similarity(local, qkv, n)
    assert math.isnan(copy_similarity(noisy["lm_head.weight"], specs["lm_head.weight"], n))  # no copies
    fc_in = spec_table(widen_model_config(cfg, n, 1))["blocks.0.mlp.fc_in.weight"]  # m = 1: FFN not widened
    assert math.isnan(copy_similarity(torch.zeros(fc_in.shape), fc_in, n, 1))


def test_noise_row_chunking_is_invisible(monkeypatch) -> None:
    """Noise is generated in row chunks to bound memory on big tensors; chunk size must not change a bit."""
    import megaclone.clone.noise as noise

    cfg = small_config("mqa-gelu-ln-rope-untied")
    state = random_small_state(cfg)
    whole = clone(cfg, state, factor=3, variant="diagonal", noise_db=0.0, seed=4)
    monkeypatch.setattr(noise, "_CHUNK_ELEMENTS", 7)
    chunked = clone(cfg, state, factor=3, variant="diagonal", noise_db=0.0, seed=4)
    assert all(bit_equal(whole[k], chunked[k]) for k in whole)
