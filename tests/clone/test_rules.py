"""The cloning rules tensor by tensor, against formulas written out independently of the implementation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaclone.clone import clone_tensor, small_read_ranges, widen_model_config
from megaclone.config import CloneConfig
from megaclone.spec import spec_table
from tests.clone import dict_reader, random_small_state, small_config


def repeat_units(t: torch.Tensor, dim: int, unit: int, factor: int) -> torch.Tensor:
    """Each block of `unit` elements along `dim` repeated `factor` times in place (u' copies u' // factor)."""
    shape = list(t.shape)
    t = t.unflatten(dim, (shape[dim] // unit, unit))  # [..., units, unit, ...]
    return t.repeat_interleave(factor, dim=dim).flatten(dim, dim + 1)


def test_widen_model_config() -> None:
    cfg = small_config("gqa-swiglu-rms-learned-nobias-untied")
    wide = widen_model_config(cfg, 3, 2)
    assert (wide.hidden_size, wide.num_heads, wide.num_query_groups, wide.head_size, wide.ffn_size) == \
        (48, 12, 6, cfg.head_size, 2 * cfg.ffn_size)
    same = [f.name for f in dataclasses.fields(cfg)
            if f.name not in ("hidden_size", "num_heads", "num_query_groups", "ffn_size")]
    assert all(getattr(wide, k) == getattr(cfg, k) for k in same)
    assert widen_model_config(cfg, 2).ffn_size == 2 * cfg.ffn_size
    assert widen_model_config(cfg, 2, 1).ffn_size == cfg.ffn_size


@pytest.mark.parametrize("n,m,g,flag", [(0, None, None, "--hyperclone="), (2.0, None, None, "--hyperclone="),
                                        (True, None, None, "--hyperclone="), (2, 0, None, "--hyperclone-ffn="),
                                        (2, 1.5, None, "--hyperclone-ffn="), (2, None, 0, "--hyperclone-groups="),
                                        (4, None, 3, "--hyperclone-groups=3 must divide --hyperclone=4")])
def test_bad_factors_raise(n, m, g, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        widen_model_config(small_config("mha-gelu-ln-rope-bias-tied"), n, m, g)


@pytest.mark.parametrize("variant", ["symmetric", "diagonal"])
def test_rules_by_role(variant: str) -> None:
    n, m = 2, 3
    cfg = small_config("mha-gelu-ln-rope-bias-tied", position="learned")
    state = random_small_state(cfg)
    wide_specs = spec_table(widen_model_config(cfg, n, m))
    clone_cfg = CloneConfig(factor=n, ffn_factor=m, variant=variant)

    def widened(name: str) -> torch.Tensor:
        return clone_tensor(wide_specs[name], cfg, clone_cfg, dict_reader(state))

    qkv_unit = (cfg.heads_per_group + 2) * cfg.head_size
    E = state["embedding.word.weight"]
    assert torch.equal(widened("embedding.word.weight"), E.repeat_interleave(n, dim=1))
    P = state["embedding.position.weight"]
    assert torch.equal(widened("embedding.position.weight"), P.repeat_interleave(n, dim=1))
    for name in ("blocks.0.attn_norm.weight", "blocks.1.mlp_norm.bias", "blocks.0.attn.out.bias"):
        assert torch.equal(widened(name), state[name].repeat_interleave(n))
    assert torch.equal(widened("blocks.0.attn.qkv.bias"), repeat_units(state["blocks.0.attn.qkv.bias"], 0, qkv_unit, n))
    assert torch.equal(widened("blocks.0.mlp.fc_in.bias"), state["blocks.0.mlp.fc_in.bias"].repeat_interleave(m))
    for name in ("final_norm.weight", "final_norm.bias"):  # tied: the unembedding's 1/n folded in
        assert torch.allclose(widened(name), state[name].repeat_interleave(n) / n)

    gathered = {  # W[pi(i'), pi(j')] and the factor q of the input axis
        "blocks.0.attn.qkv.weight": (repeat_units(state["blocks.0.attn.qkv.weight"], 0, qkv_unit, n)
                                     .repeat_interleave(n, dim=1), n),
        "blocks.0.attn.out.weight": (repeat_units(state["blocks.0.attn.out.weight"].repeat_interleave(n, dim=0),
                                                  1, cfg.heads_per_group * cfg.head_size, n), n),
        "blocks.0.mlp.fc_in.weight": (state["blocks.0.mlp.fc_in.weight"].repeat_interleave(m, dim=0)
                                      .repeat_interleave(n, dim=1), n),
        "blocks.0.mlp.fc_out.weight": (state["blocks.0.mlp.fc_out.weight"].repeat_interleave(n, dim=0)
                                       .repeat_interleave(m, dim=1), m),
    }
    out_unit = {"blocks.0.attn.qkv.weight": qkv_unit}
    in_unit = {"blocks.0.attn.out.weight": cfg.heads_per_group * cfg.head_size}
    for name, (full, q) in gathered.items():
        got = widened(name)
        if variant == "symmetric":
            assert torch.allclose(got, full / q, rtol=0, atol=0), name
            continue
        p = wide_specs[name].axes[0]
        copy_out = (torch.arange(got.shape[0]) // out_unit.get(name, 1)) % (n if p.kind != "ffn" else m)
        copy_in = (torch.arange(got.shape[1]) // in_unit.get(name, 1)) % q
        mask = (copy_out % q).unsqueeze(1) == copy_in.unsqueeze(0)
        assert torch.equal(got, torch.where(mask, full, torch.zeros_like(full))), name


def test_untied_lm_head_and_gate_up_units() -> None:
    n, m = 3, 2
    cfg = small_config("gqa-swiglu-rms-learned-nobias-untied")
    state = random_small_state(cfg)
    wide_specs = spec_table(widen_model_config(cfg, n, m))
    clone_cfg = CloneConfig(factor=n, ffn_factor=m, variant="diagonal", noise_db=0.0)
    lm = clone_tensor(wide_specs["lm_head.weight"], cfg, clone_cfg, dict_reader(state))
    assert torch.equal(lm, state["lm_head.weight"].repeat_interleave(n, dim=1) / n)  # no noise, no diagonal
    final = clone_tensor(wide_specs["final_norm.weight"], cfg, clone_cfg, dict_reader(state))
    assert torch.equal(final, state["final_norm.weight"].repeat_interleave(n))  # untied: no 1/n
    # SwiGLU rows [gate_u, up_u] are one unit: wide rows 2u', 2u'+1 hold gate and up of small unit u' // m
    gu = clone_tensor(wide_specs["blocks.1.mlp.gate_up.weight"], cfg, dataclasses.replace(clone_cfg, noise_db=None),
                      dict_reader(state))
    small = state["blocks.1.mlp.gate_up.weight"]
    for u in range(gu.shape[0] // 2):
        for k, half in ((0, "gate"), (1, "up")):
            row = gu[2 * u + k].view(-1, n)  # [small hidden, copies]
            src = small[2 * (u // m) + k]
            assert torch.equal(row[torch.arange(row.shape[0]), (u % m) % n], src), (u, half)


def test_rules_of_the_family_options() -> None:
    """The rules the imported families add, written out: the tied fold into project_out, the embedding width,
    positions at an offset, QK-norm over query groups, Gemma's sqrt(n) and gain 1 + w, and the untying clone."""
    n = 2

    def widened(arch: str, names: tuple[str, ...]) -> tuple[dict, dict, object]:
        cfg = small_config(arch)
        state = random_small_state(cfg)
        wide_cfg = widen_model_config(cfg, n)
        specs = spec_table(wide_cfg)
        return state, {k: clone_tensor(specs[k], cfg, CloneConfig(factor=n), dict_reader(state)) for k in names}, \
            wide_cfg

    state, got, wide = widened("opt350-post-relu-proj-tied", ("embedding.word.weight", "embedding.position.weight",
                                                             "embedding.project_in.weight", "project_out.weight"))
    assert (wide.embed_size, wide.hidden_size, wide.tied_embeddings) == (16, 32, True)  # word_embed_proj_dim x n
    assert torch.equal(got["embedding.word.weight"], state["embedding.word.weight"].repeat_interleave(n, 1))
    assert got["embedding.position.weight"].shape == (8 + 2, 32)  # max_seq_len + offset rows, not widened
    assert torch.equal(got["embedding.position.weight"], state["embedding.position.weight"].repeat_interleave(n, 1))
    both = {k: state[k].repeat_interleave(n, 0).repeat_interleave(n, 1)
            for k in ("embedding.project_in.weight", "project_out.weight")}
    assert torch.equal(got["embedding.project_in.weight"], both["embedding.project_in.weight"] / n)
    assert torch.allclose(got["project_out.weight"], both["project_out.weight"] / n / n, rtol=1e-6, atol=0)

    state, got, wide = widened("olmo2-branch-qknorm-gqa-untied", ("blocks.1.attn.q_norm.weight",
                                                                 "blocks.1.attn.k_norm.weight"))
    cfg = small_config("olmo2-branch-qknorm-gqa-untied")
    for name, unit in (("blocks.1.attn.q_norm.weight", cfg.heads_per_group * cfg.head_size),
                       ("blocks.1.attn.k_norm.weight", cfg.head_size)):
        assert torch.equal(got[name], repeat_units(state[name], 0, unit, n)), name  # whole groups copied

    state, got, wide = widened("gemma-geglu-offset-scaled-tied", ("embedding.word.weight", "final_norm.weight"))
    assert wide.tied_embeddings and wide.head_size == 8
    assert torch.allclose(got["embedding.word.weight"], state["embedding.word.weight"].repeat_interleave(n, 1)
                          / n ** 0.5, rtol=1e-6, atol=0)
    gain = (1 + state["final_norm.weight"].repeat_interleave(n)) / n ** 0.5  # the gain 1 + w takes the fold
    assert torch.allclose(1 + got["final_norm.weight"], gain, rtol=1e-6, atol=0)

    with pytest.warns(UserWarning, match="the clone unties the embeddings"):
        state, got, wide = widened("olmo-plainln-swiglu-tied", ("lm_head.weight", "embedding.word.weight"))
    assert not wide.tied_embeddings
    E = state["embedding.word.weight"].repeat_interleave(n, 1)
    assert torch.equal(got["embedding.word.weight"], E) and torch.equal(got["lm_head.weight"], E / n)


def test_slices_read_only_what_they_need() -> None:
    cfg = small_config("mha-gelu-ln-rope-bias-tied")
    state = random_small_state(cfg)
    n = 2
    spec = spec_table(widen_model_config(cfg, n))["blocks.0.attn.qkv.weight"]
    unit = (cfg.heads_per_group + 2) * cfg.head_size
    full = clone_tensor(spec, cfg, CloneConfig(factor=n, noise_db=3.0), dict_reader(state))
    for index in [(slice(3 * unit, 5 * unit),), (slice(unit + 5, unit + 9), slice(7, 20)), (slice(10, 11),)]:
        log: list = []
        part = clone_tensor(spec, cfg, CloneConfig(factor=n, noise_db=3.0), dict_reader(state, log), index)
        assert torch.equal(part, full[index])
        ranges = small_read_ranges(spec, n, n, index)
        assert [tuple((s.start, s.stop) for s in log[0][1])] == [tuple(ranges)] and len(log) == 1
    assert small_read_ranges(spec, n, n, (slice(3 * unit, 5 * unit),))[0] == (unit, 3 * unit)  # units 3, 4 <- 1, 2
    assert small_read_ranges(spec, n, n, (slice(unit + 5, unit + 9), slice(7, 20))) == [(5, 9), (3, 10)]
    with pytest.raises(ValueError, match="step-1"):
        clone_tensor(spec, cfg, CloneConfig(factor=n), dict_reader(state), (slice(0, 10, 2),))


def test_reader_and_config_mismatches_raise() -> None:
    cfg = small_config("mha-gelu-ln-rope-bias-tied")
    state = random_small_state(cfg)
    spec = spec_table(widen_model_config(cfg, 2))["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="returned shape"):
        clone_tensor(spec, cfg, CloneConfig(factor=2), lambda name, index: state[name], (slice(0, 16),))
    with pytest.raises(ValueError, match="needs a small parameter of shape"):
        clone_tensor(spec, cfg, CloneConfig(factor=4), dict_reader(state))
    with pytest.raises(ValueError, match="not a multiple of the clone factor 3"):
        clone_tensor(spec, cfg, CloneConfig(factor=3), dict_reader(state))


def test_small_spec_check_follows_a_config_changed_in_place() -> None:
    """The small model's spec table is cached by the config's field values, so a config object changed in place
    after a first clone is checked against its new shapes, not the cached ones."""
    cfg = small_config("mha-gelu-ln-rope-bias-tied")
    state = random_small_state(cfg)
    spec = spec_table(widen_model_config(cfg, 2))["blocks.0.mlp.fc_in.weight"]
    clone_tensor(spec, cfg, CloneConfig(factor=2), dict_reader(state))
    cfg.ffn_size *= 2
    with pytest.raises(ValueError, match="needs a small parameter of shape"):
        clone_tensor(spec, cfg, CloneConfig(factor=2), dict_reader(state))
