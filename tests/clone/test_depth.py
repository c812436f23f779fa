"""Depth growth and the remaining width axes (FFN-only, the query-group factor), alone and composed.

`zero` growth x width {1, 2} x FFN factors x the groups factor x three architectures preserves the function
and gives bit-identical tensors from every source layout at every target layout, including a PP change where a
target stage copies blocks from two source stages; each target stage reads only the source blocks it copies;
stack and interleave put every block where they say; carried moments are the source blocks' or zero.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import ShardReader, read_manifest, storage_stage, write_weights_checkpoint
from megaclone.clone import (
    build_clone_shard,
    clone_checkpoint,
    clone_moment,
    depth_plan,
    grown_model_config,
    plan_depth,
    widen_model_config,
)
from megaclone.config import CloneConfig, ConfigError, ParallelConfig
from megaclone.spec import build_param_specs, in_block, spec_table, stages_of
from tests.clone import ARCHS, assemble, bit_equal, build_model, dict_reader, random_small_state, small_config
from tests.clone.test_checkpoint import load_tool

L, N = 4, 6  # source and target depth of the grid: `zero` puts new blocks after source blocks 1 and 3
FACTORS = [(1, 1, None), (1, 2, None), (2, 1, None), (2, 2, None), (2, 2, 1)]  # (n, m, g); g = 1 keeps the KV heads
SPLIT = ((1, 2), (1, 3))  # source PP2, target PP3: target stage 1 holds blocks 2, 3 <- source blocks 1 (stage 0), 2
LAYOUT_PAIRS = [((1, 1), (2, 1)), ((1, 2), (2, 2)), ((2, 1), (1, 2)), ((2, 2), (1, 1)), SPLIT]


pytestmark = pytest.mark.usefixtures("one_thread")


def grow_config(n: int, m: int, g: int | None, method: str = "zero", grow: int = N, **kw) -> CloneConfig:
    return CloneConfig(init_from="small", factor=n, ffn_factor=m, groups_factor=g, grow_layers=grow,
                       grow_method=method, **({"variant": "diagonal", "noise_db": 0.0, "seed": 3} | kw))


def fits(cfg, layout: tuple[int, int]) -> bool:
    try:
        ParallelConfig(tp_size=layout[0], pp_size=layout[1]).validate(cfg)
    except ConfigError:
        return False
    return True


@functools.cache
def small_case(arch: str):
    cfg = small_config(arch, num_layers=L)
    state = random_small_state(cfg, seed=2)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = build_model(cfg, state)(tokens)
    return cfg, state, tokens, logits


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(arch, (tp, pp)) -> the arch's small model written at that source layout (when it fits)."""
    base = tmp_path_factory.mktemp("depth-sources")
    out = {}
    for arch in ARCHS:
        cfg, state, _, _ = small_case(arch)
        for layout in {src for src, _ in LAYOUT_PAIRS}:
            if fits(cfg, layout):
                out[(arch, layout)] = write_weights_checkpoint(base / f"{arch}-{layout[0]}-{layout[1]}", cfg, state,
                                                               *layout)
    return out


def test_zero_plan_spreads_new_blocks_and_the_grid_splits_a_stage() -> None:
    plan = plan_depth(L, N, "zero")
    assert plan.sources == (0, 1, 1, 2, 3, 3) and plan.inserted == (False, False, True, False, False, True)
    assert plan_depth(3, 5, "zero").sources == (0, 1, 1, 2, 2) and plan_depth(2, 7, "zero").sources == \
        (0, 0, 0, 1, 1, 1, 1)
    cfg = small_config("mha-gelu-ln-rope-bias-tied", num_layers=L)
    grown = grown_model_config(cfg, grow_config(1, 1, None))
    specs = spec_table(grown)
    (src_tp, src_pp), (tgt_tp, tgt_pp) = SPLIT
    copied = {plan.source_of(s) for s in specs.values() if 1 in stages_of(s, grown, tgt_pp)} - {None}
    small = spec_table(cfg)
    assert {storage_stage(small[name], cfg, src_pp) for name in copied} == {0, 1}


@pytest.mark.parametrize("n,m,g", FACTORS)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_zero_growth_preserves_function_at_every_layout(arch: str, n: int, m: int, g: int | None, sources) -> None:
    cfg, state, tokens, want = small_case(arch)
    clone = grow_config(n, m, g)
    grown = grown_model_config(cfg, clone)
    assert grown.num_layers == N and grown.num_query_groups == (g or n) * cfg.num_query_groups
    reference = build_clone_shard(dict_reader(state), cfg, clone, 0, 1)
    with torch.no_grad():
        got = build_model(grown, reference)(tokens)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    checked = []
    for src, tgt in LAYOUT_PAIRS:
        if (arch, src) not in sources or not fits(grown, tgt):
            continue
        with ShardReader(sources[(arch, src)]) as reader:
            shards = {(t, p): build_clone_shard(reader.read, cfg, clone, t, tgt[0], p, tgt[1])
                      for p in range(tgt[1]) for t in range(tgt[0])}
        full = assemble(grown, shards, *tgt)
        assert full.keys() == reference.keys()
        for name, tensor in full.items():
            assert bit_equal(tensor, reference[name]), (name, src, tgt)
        checked.append((src, tgt))
    assert SPLIT in checked and (len(checked) >= 3 or arch.startswith("mqa"))


def test_groups_factor_keeps_kv_heads_and_copies_query_heads() -> None:
    """G = 1 on a GQA model: the same number of KV heads, each group holding n times its query heads (copy-major)."""
    cfg, state, _, _ = small_case("gqa-swiglu-rms-learned-nobias-untied")
    n, hd, hpg = 2, cfg.head_size, cfg.heads_per_group
    clone = grow_config(n, None, 1, grow=0, variant="symmetric", noise_db=None)
    grown = grown_model_config(cfg, clone)
    assert (grown.num_query_groups, grown.num_heads, grown.heads_per_group) == (2, 2 * cfg.num_heads, n * hpg)
    wide = build_clone_shard(dict_reader(state), cfg, clone, 0, 1)
    small = state["blocks.0.attn.qkv.weight"].view(cfg.num_query_groups, hpg + 2, hd, -1)  # [groups, q+k+v, hd, d]
    got = wide["blocks.0.attn.qkv.weight"].view(grown.num_query_groups, n * hpg + 2, hd, -1)
    want = torch.cat([small[:, :hpg].repeat(1, n, 1, 1), small[:, hpg:]], dim=1).repeat_interleave(n, dim=-1) / n
    assert torch.equal(got, want)
    out = state["blocks.0.attn.out.weight"].view(-1, cfg.num_query_groups, hpg * hd)  # [d, groups, q heads]
    want_out = out.repeat(1, 1, n).repeat_interleave(n, dim=0) / n
    assert torch.equal(wide["blocks.0.attn.out.weight"], want_out.flatten(1))


@pytest.mark.parametrize("method,sources", [("stack", [0, 1, 2, 0, 1, 2]), ("interleave", [0, 0, 1, 1, 2, 2])])
def test_stack_and_interleave_place_blocks(method: str, sources: list[int]) -> None:
    """On named weights: target block i holds source block sources[i], width rules applied (noise off, so a
    widened copy equals the widening of its source block)."""
    cfg = small_config("mha-gelu-ln-rope-bias-tied", num_layers=3)
    state = random_small_state(cfg, seed=5)
    for n in (1, 2):
        clone = grow_config(n, None, None, method, grow=6, variant="symmetric", noise_db=None)
        grown = build_clone_shard(dict_reader(state), cfg, clone, 0, 1)
        flat = build_clone_shard(dict_reader(state), cfg, grow_config(2, None, None, grow=0, variant="symmetric",
                                                                      noise_db=None), 0, 1) if n == 2 else state
        plan = depth_plan(cfg, clone)
        assert list(plan.sources) == sources and not plan.preserving
        for name, tensor in grown.items():
            block = int(name.split(".")[1]) if name.startswith("blocks.") else None
            source = name if block is None else in_block(name, sources[block])
            assert bit_equal(tensor, flat[source]), (method, n, name)


def test_zero_inserts_identity_blocks_on_named_weights() -> None:
    cfg = small_config("gqa-swiglu-rms-learned-nobias-untied", num_layers=3, bias=True)
    state = random_small_state(cfg, seed=6)
    grown = build_clone_shard(dict_reader(state), cfg, grow_config(1, 1, None, grow=5), 0, 1)
    assert plan_depth(3, 5, "zero").inserted == (False, False, True, False, True)
    for block, source in ((0, 0), (1, 1), (2, 1), (3, 2), (4, 2)):
        for name in [s.name for s in build_param_specs(cfg) if s.name.startswith("blocks.0.")]:
            got = grown[in_block(name, block)]
            zeroed = block in (2, 4) and (".attn.out." in name or ".mlp.fc_out." in name)
            want = torch.zeros_like(got) if zeroed else state[in_block(name, source)]
            assert bit_equal(got, want), (block, name)


@pytest.mark.parametrize("options", [dict(parallel_residual=True), dict(bias=False, qkv_bias=True),
                                     dict(activation="gelu_exact", tied_embeddings=False, num_query_groups=2)])
def test_zero_growth_preserves_the_other_architecture_options(options: dict) -> None:
    """GPT-NeoX's parallel residual (both branches zero), Qwen2's q/k/v-only biases (no output bias to zero)."""
    cfg = small_config("mha-gelu-ln-rope-bias-tied", num_layers=3, **options)
    state = random_small_state(cfg, seed=8)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(2))
    clone = grow_config(2, 3, None, grow=5)
    with torch.no_grad():
        want = build_model(cfg, state)(tokens)
        got = build_model(grown_model_config(cfg, clone), build_clone_shard(dict_reader(state), cfg, clone, 0, 1))(
            tokens)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_moments_of_copied_and_zeroed_parameters() -> None:
    """Carry: a copied tensor gets its source block's moments (widened as usual), a zeroed projection zero."""
    cfg = small_config("mha-gelu-ln-rope-bias-tied", num_layers=2)
    g = torch.Generator().manual_seed(4)
    moments = {name: torch.rand(s.shape, generator=g) for name, s in spec_table(cfg).items()}
    clone = grow_config(2, 3, None, grow=3)
    flat = grow_config(2, 3, None, grow=0)
    specs, flat_specs = spec_table(grown_model_config(cfg, clone)), spec_table(widen_model_config(cfg, 2, 3))
    plan = depth_plan(cfg, clone)
    assert plan.sources == (0, 1, 1) and plan.inserted == (False, False, True)
    for name, spec in specs.items():
        for kind in ("exp_avg", "exp_avg_sq"):
            log: list = []
            got = clone_moment(spec, cfg, clone, dict_reader(moments, log), spec.tp_slices(1, 2), kind)
            source = plan.source_of(spec)
            if source is None:
                assert name.startswith("blocks.2.") and spec.role in ("attn_out", "mlp_out")
                assert not log and torch.equal(got, torch.zeros(spec.tp_shape(2)))
                continue
            want = clone_moment(flat_specs[source], cfg, flat, dict_reader(moments), spec.tp_slices(1, 2), kind)
            assert torch.equal(got, want) and log[0][0] == source, (name, kind)


def test_target_stage_reads_only_the_blocks_it_copies(tmp_path: Path) -> None:
    """Source TP2 x PP2 -> target TP2 x PP3 (x2, 4 -> 6 layers): each target rank reads exactly the source tensors
    its blocks copy (zeroed projections: nothing), each from the source stage storing it and source TP rank t."""
    cfg, state, _, _ = small_case("mha-gelu-ln-rope-bias-tied")
    clone = grow_config(2, 2, None)
    grown, plan = grown_model_config(cfg, clone), depth_plan(cfg, clone)
    src_pp, tgt_tp, tgt_pp = 2, 2, 3
    path = write_weights_checkpoint(tmp_path / "src", cfg, state, 2, src_pp)
    small = spec_table(cfg)
    source_stages = set()
    for p in range(tgt_pp):
        stage = [s for s in build_param_specs(grown) if p in stages_of(s, grown, tgt_pp)]
        read_blocks = set()
        for t in range(tgt_tp):
            with ShardReader(path) as reader:
                build_clone_shard(reader.read, cfg, clone, t, tgt_tp, p, tgt_pp)
                accesses = reader.accesses
            wanted = [plan.source_of(s) for s in stage]
            assert sorted(name for name, _, _ in accesses) == sorted(w for w in wanted if w is not None)
            for name, rel, _ in accesses:
                stored = storage_stage(small[name], cfg, src_pp)
                assert rel.endswith(f"-pp{stored:02d}.safetensors"), (name, rel)
                if small[name].tp_axis is not None:
                    assert rel.startswith(f"weights/tp{t:02d}-"), (name, rel)
                if p == 1:
                    source_stages.add(stored)
                if name.startswith("blocks."):
                    read_blocks.add(small[name].layer - 1)
        assert read_blocks == {plan.sources[s.layer - 1] for s in stage if 1 <= s.layer <= N}
    assert source_stages == {0, 1}  # target stage 1 copies blocks from both source stages


@pytest.mark.parametrize("clone, tp, pp, match", [
    (dict(grow_layers=2), 1, 1, r"--grow-layers\) = 2: the target number of layers must exceed the source's 2"),
    (dict(grow_layers=5, grow_method="stack"), 1, 1, r"--grow-layers 5 must be a multiple of the source's 2 layers"),
    (dict(grow_layers=3, grow_method="interleave"), 1, 1, r"--grow-method interleave .* multiple of the source's 2"),
    (dict(grow_layers=3), 1, 4, r"does not fit the x1 .*2 -> 3 layers by zero clone: model.num_layers=3 must be >= "
                                r"parallel.pp_size=4"),
    (dict(factor=2, groups_factor=3), 1, 1, r"--hyperclone-groups=3 must divide --hyperclone=2"),
    (dict(factor=2, groups_factor=1), 8, 1, r"x2 \(ffn x2, groups x1\) clone: model.num_query_groups=4 .* "
                                           r"parallel.tp_size=8"),  # 8 groups at g = 2 would fit
    (dict(grow_layers=3, grow_method="deep"), 1, 1, r"--grow-method\) = 'deep': expected one of"),
    (dict(factor=1), 1, 1, r"--hyperclone=1 keeps the width and --hyperclone-ffn is 1: nothing grows"),
])
def test_bad_growth_is_refused_before_writing(tmp_path: Path, clone: dict, tp: int, pp: int, match: str) -> None:
    cfg = small_config("mha-gelu-ln-rope-bias-tied")
    write_weights_checkpoint(tmp_path / "small", cfg, random_small_state(cfg), 1, 1)
    with pytest.raises(ValueError, match=match):
        clone_checkpoint(tmp_path / "small", tmp_path / "out", CloneConfig(init_from="small", **clone), tp, pp)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("placement, norm, refused", [("post", "rmsnorm", True), ("branch", "layernorm", True),
                                                     ("branch", "rmsnorm", False), ("pre", "layernorm", False)])
def test_zero_needs_blocks_that_a_zero_branch_makes_the_identity(placement: str, norm: str, refused: bool) -> None:
    """Post-norm (and a branch-output LayerNorm with a bias) cannot be preserved by `zero`: refused by name;
    stack and interleave stay allowed."""
    cfg = small_config("mha-gelu-ln-rope-bias-tied", norm=norm, norm_placement=placement)
    zero, stack = grow_config(1, 1, None, grow=3), grow_config(1, 1, None, "stack", grow=4)
    assert depth_plan(cfg, stack).sources == (0, 1, 0, 1)
    if not refused:
        assert depth_plan(cfg, zero).preserving
        return
    with pytest.raises(ConfigError, match=rf"--grow-method zero cannot preserve .*model.norm_placement='{placement}'"):
        depth_plan(cfg, zero)
    with pytest.raises(ConfigError, match="--grow-method zero cannot preserve"):
        build_clone_shard(dict_reader(random_small_state(cfg)), cfg, zero, 0, 1)


def test_checkpoint_records_growth_and_verify_tool_judges_only_lossless(tmp_path: Path, capsys) -> None:
    tool = load_tool()
    cfg = small_config("gqa-swiglu-rms-learned-nobias-untied")
    write_weights_checkpoint(tmp_path / "small", cfg, random_small_state(cfg, seed=7), 1, 2)
    args = ["--small", str(tmp_path / "small"), "--tokens", "64"]
    for method, grow in (("zero", 3), ("stack", 4)):
        clone = grow_config(2, 1, 1, method, grow=grow)
        clone_checkpoint(tmp_path / "small", tmp_path / method, clone, 1, 2)
        record = read_manifest(tmp_path / method).provenance["hyperclone"]
        assert (record["factor"], record["ffn_factor"], record["groups_factor"]) == (2, 1, 1)
        assert (record["grow_layers"], record["grow_method"]) == (grow, method)
        assert record["depth"]["sources"] == list(depth_plan(cfg, clone).sources)
        assert tool.main([*args, "--large", str(tmp_path / method)]) == 0
        out = capsys.readouterr().out
        assert "x2 (ffn x1, groups x1), 2 -> " in out and "next-token loss" in out
        if method == "zero":
            assert "PASS" in out
        else:
            change = float(out.split("the loss changed by ")[1].split()[0])
            assert "NOT CHECKED: depth growth by stack" in out and abs(change) > 1e-3
    unrecorded = tmp_path / "unrecorded"
    from megaclone.checkpoint import load_full_state

    write_weights_checkpoint(unrecorded, read_manifest(tmp_path / "zero").model, load_full_state(tmp_path / "zero"),
                             1, 1)
    assert tool.main([*args, "--large", str(unrecorded)]) == 2
    assert "records no growth method" in capsys.readouterr().err
