"""The imported families' options composed with depth growth, FFN-only widening and the query-group factor.

Each case preserves the small model's function (logits within 1e-5 of max |logit|) and builds the same tensors,
bit for bit, at TP2 x PP2 as at TP1; post-norm refuses `zero` growth by name; the carry rules compose (Gemma's
sqrt(n) factors with zeroed projections, the untying clone and g < n refused, n = 1 keeping a tie).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import ShardReader, write_weights_checkpoint
from megaclone.clone import (
    build_clone_shard,
    carry_factors,
    check_carry_possible,
    clone_checkpoint,
    clone_moment,
    depth_plan,
    grown_model_config,
)
from megaclone.config import CloneConfig, ConfigError
from megaclone.spec import spec_table
from tests.clone import assemble, bit_equal, build_model, dict_reader, random_small_state, small_config

pytestmark = pytest.mark.usefixtures("one_thread")

# (arch, clone options): each composes one family's clone rule with a growth axis that main added
CASES = {
    # sqrt(n) embedding divisor, (1 + w) / sqrt(n) final gain, and an inserted zero block with (1 + w) norms
    "gemma-zero-x2": ("gemma-geglu-offset-scaled-tied", dict(factor=2, grow_layers=3)),
    # depth alone: the embedding divisor sqrt(1) and the fold c = 1 are identities, the tie is kept
    "gemma-zero-only": ("gemma-geglu-offset-scaled-tied", dict(grow_layers=3)),
    # g = 1 on GQA: QK-norm over n H hd q rows and g G hd k rows, with the norm on the branch output under zero
    "olmo2-groups1-zero": ("olmo2-branch-qknorm-gqa-untied", dict(factor=2, groups_factor=1, grow_layers=3)),
    # FFN-only on OPT-350m: embed_size, project_in / project_out and the tied fold stay as they are
    "opt350-ffn-only": ("opt350-post-relu-proj-tied", dict(factor=1, ffn_factor=2)),
    # nowhere to fold: the x2 clone unties, and the inserted block copies a parameter-free LayerNorm
    "olmo-untie-zero": ("olmo-plainln-swiglu-tied", dict(factor=2, grow_layers=3)),
}


def clone_config(options: dict, **kw) -> CloneConfig:
    return CloneConfig(init_from="small", **({"variant": "diagonal", "noise_db": 10.0, "seed": 5} | options | kw))


@pytest.mark.filterwarnings("ignore:the clone unties")
@pytest.mark.parametrize("case", sorted(CASES))
def test_composed_growth_preserves_function_at_tp1_and_tp2_pp2(case: str, tmp_path: Path) -> None:
    arch, options = CASES[case]
    cfg = small_config(arch)
    state = random_small_state(cfg, seed=3)
    clone = clone_config(options)
    grown = grown_model_config(cfg, clone)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(4))
    reference = build_clone_shard(dict_reader(state), cfg, clone, 0, 1)
    with torch.no_grad():
        want, got = build_model(cfg, state)(tokens), build_model(grown, reference)(tokens)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    source = write_weights_checkpoint(tmp_path / "small", cfg, state, 1, 1)
    with ShardReader(source) as reader:
        shards = {(t, p): build_clone_shard(reader.read, cfg, clone, t, 2, p, 2) for p in range(2) for t in range(2)}
    full = assemble(grown, shards, 2, 2)
    assert full.keys() == reference.keys()
    for name, tensor in full.items():
        assert bit_equal(tensor, reference[name]), name


@pytest.mark.filterwarnings("ignore:the clone unties")
def test_options_the_composition_relies_on() -> None:
    """What each case above actually exercises, on the grown configs and named weights."""
    def grown_of(case: str):
        arch, options = CASES[case]
        cfg = small_config(arch)
        return cfg, grown_model_config(cfg, clone_config(options))

    cfg, grown = grown_of("gemma-zero-only")
    assert grown.tied_embeddings and grown.hidden_size == cfg.hidden_size and grown.num_layers == 3
    state = random_small_state(cfg, seed=3)
    wide = build_clone_shard(dict_reader(state), cfg, clone_config(CASES["gemma-zero-only"][1]), 0, 1)
    assert bit_equal(wide["embedding.word.weight"], state["embedding.word.weight"])
    assert bit_equal(wide["final_norm.weight"], state["final_norm.weight"])
    assert not wide["blocks.2.attn.out.weight"].any() and wide["blocks.2.mlp_norm.weight"].abs().min() > 0
    cfg, grown = grown_of("opt350-ffn-only")
    assert grown.embed_size == cfg.embed_size and grown.tied_embeddings and grown.ffn_size == 2 * cfg.ffn_size
    cfg, grown = grown_of("olmo-untie-zero")
    assert cfg.tied_embeddings and not grown.tied_embeddings and "lm_head.weight" in spec_table(grown)


def test_qk_norm_rows_under_a_groups_factor() -> None:
    """g = 1 < n = 2: q_norm is n copies of each small group's q block (the attention output's map), k_norm g = 1
    copy of each k head, so the norms over n H hd and g G hd entries see the small statistics."""
    cfg = small_config("olmo2-branch-qknorm-gqa-untied")
    state = random_small_state(cfg, seed=3)
    n, q_block = 2, cfg.heads_per_group * cfg.head_size
    wide = build_clone_shard(dict_reader(state), cfg, clone_config(dict(factor=n, groups_factor=1), noise_db=None),
                             0, 1)
    small_q = state["blocks.0.attn.q_norm.weight"].view(cfg.num_query_groups, q_block)
    assert torch.equal(wide["blocks.0.attn.q_norm.weight"], small_q.repeat(1, n).flatten())
    assert torch.equal(wide["blocks.0.attn.k_norm.weight"], state["blocks.0.attn.k_norm.weight"])


def test_post_norm_refuses_zero_growth_by_name(tmp_path: Path) -> None:
    cfg = small_config("opt350-post-relu-proj-tied")
    assert cfg.norm_placement == "post"
    write_weights_checkpoint(tmp_path / "small", cfg, random_small_state(cfg), 1, 1)
    for options in (dict(grow_layers=3), dict(factor=2, grow_layers=4)):
        with pytest.raises(ConfigError, match=r"--grow-method zero cannot preserve .*model.norm_placement='post'"):
            clone_checkpoint(tmp_path / "small", tmp_path / "out", clone_config(options), 1, 1)
        assert not (tmp_path / "out").exists()
    stack = clone_config(dict(factor=2, grow_layers=4, grow_method="stack"))
    assert depth_plan(cfg, stack).sources == (0, 1, 0, 1)


def test_carry_rules_compose_with_growth() -> None:
    """Gemma x2 with a zero block: the embedding's moments / (n / a) = / sqrt(2), a zeroed projection's are zero.
    Untying and g < n are refused before any work; at n = 1 the tie is kept, so an OLMo model carries."""
    cfg = small_config("gemma-geglu-offset-scaled-tied")
    clone = clone_config(dict(factor=2, grow_layers=3), noise_db=None)
    check_carry_possible(cfg, clone)
    specs = spec_table(grown_model_config(cfg, clone))
    g = torch.Generator().manual_seed(6)
    moments = {name: torch.rand(s.shape, generator=g) for name, s in spec_table(cfg).items()}
    factors = carry_factors(specs["embedding.word.weight"], cfg, 2, 2)
    assert factors.value_scale == pytest.approx(2 ** 0.5) and factors.grad_scale == pytest.approx(2 ** 0.5)
    got = clone_moment(specs["embedding.word.weight"], cfg, clone, dict_reader(moments))
    want = moments["embedding.word.weight"].repeat_interleave(2, dim=1) / factors.grad_scale
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    zeroed = specs["blocks.2.attn.out.weight"]
    assert not clone_moment(zeroed, cfg, clone, dict_reader(moments), kind="exp_avg_sq").any()

    olmo = small_config("olmo-plainln-swiglu-tied")
    with pytest.warns(UserWarning, match="the clone unties"), pytest.raises(ValueError, match="cannot be carried"):
        check_carry_possible(olmo, clone_config(dict(factor=2, grow_layers=3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # n = 1 keeps the tie: no untying warning, and carry is possible
        check_carry_possible(olmo, clone_config(dict(factor=1, ffn_factor=2, grow_layers=3)))
    olmo2 = small_config("olmo2-branch-qknorm-gqa-untied")
    with pytest.raises(ValueError, match="--hyperclone-groups 1 < --hyperclone 2"):
        check_carry_possible(olmo2, clone_config(dict(factor=2, groups_factor=1)))
