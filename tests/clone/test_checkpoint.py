"""Cloning through real checkpoints: any source layout, the offline converter, and tools/verify_clone.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import (
    ShardReader,
    load_full_state,
    load_model,
    read_manifest,
    weight_file,
    write_weights_checkpoint,
)
from megaclone.clone import build_clone_shard, clone_checkpoint, widen_model_config
from megaclone.config import CloneConfig
from tests.clone import ARCHS, assemble, bit_equal, build_model, dict_reader, random_small_state, small_config

ROOT = Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location("verify_clone", ROOT / "tools" / "verify_clone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_source_layouts_give_identical_clones(tmp_path: Path, arch: str) -> None:
    cfg = small_config(arch)
    state = random_small_state(cfg, seed=4)
    clone_cfg = CloneConfig(factor=2, variant="diagonal", noise_db=10.0, seed=9)
    wide_cfg = widen_model_config(cfg, 2)
    want = build_clone_shard(dict_reader(state), cfg, clone_cfg, 0, 1)
    sources = [(1, 1), (1, 2)] + ([(2, 1)] if cfg.num_query_groups % 2 == 0 else [])
    for src_tp, src_pp in sources:
        path = write_weights_checkpoint(tmp_path / f"src-tp{src_tp}-pp{src_pp}", cfg, state, src_tp, src_pp)
        for tgt_tp, tgt_pp in ((1, 1), (2, 2)):
            with ShardReader(path) as reader:
                shards = {(t, p): build_clone_shard(reader.read, cfg, clone_cfg, t, tgt_tp, p, tgt_pp)
                          for p in range(tgt_pp) for t in range(tgt_tp)}
            full = assemble(wide_cfg, shards, tgt_tp, tgt_pp)
            for name, t in full.items():
                assert bit_equal(t, want[name]), (name, src_tp, src_pp, tgt_tp, tgt_pp)


def test_shard_reads_touch_only_the_matching_source_files(tmp_path: Path) -> None:
    """Source TP2 -> target TP2 (same split): target rank r opens only source files tp0r; target TP4 rank r
    reads from source file r // 2 only, and exactly its half of the source shard."""
    cfg = small_config("mha-gelu-ln-rope-bias-tied")
    path = write_weights_checkpoint(tmp_path / "src", cfg, random_small_state(cfg), 2, 1)
    for tgt_tp in (2, 4):
        for rank in range(tgt_tp):
            with ShardReader(path) as reader:
                build_clone_shard(reader.read, cfg, CloneConfig(factor=2), rank, tgt_tp)
                split = [a for a in reader.accesses if reader.specs[a[0]].tp_axis is not None]
                assert split and {a[1] for a in split} == {weight_file(rank * 2 // tgt_tp, 0)}
                qkv = next(a for a in split if a[0] == "blocks.0.attn.qkv.weight")
                unit = (cfg.heads_per_group + 2) * cfg.head_size
                local_units = cfg.num_query_groups // 2 // (tgt_tp // 2)  # small groups this target rank copies
                start = (rank % (tgt_tp // 2)) * local_units * unit
                assert qkv[2] == [(start, start + local_units * unit), (0, cfg.hidden_size)]


@pytest.mark.parametrize("arch,tp,pp,variant", [("mha-gelu-ln-rope-bias-tied", 2, 2, "symmetric"),
                                                ("gqa-swiglu-rms-learned-nobias-untied", 4, 1, "diagonal"),
                                                ("mqa-gelu-ln-rope-untied", 2, 2, "diagonal")])
def test_clone_checkpoint_preserves_function(tmp_path: Path, arch: str, tp: int, pp: int, variant: str) -> None:
    cfg = small_config(arch)
    state = random_small_state(cfg, seed=5)
    tokenizer = tmp_path / "tok.model"
    tokenizer.write_bytes(b"not really a sentencepiece model, carried over verbatim")
    src = write_weights_checkpoint(tmp_path / "small", cfg, state, 1, 2 if cfg.num_layers >= 2 else 1, step=300,
                                   tokenizer=tokenizer, data={"consumed_samples": 1234})
    clone_cfg = CloneConfig(factor=2, ffn_factor=3, variant=variant, noise_db=-5.0, seed=1)
    out = clone_checkpoint(tmp_path / "small", tmp_path / "wide", clone_cfg, tp, pp)
    manifest = read_manifest(tmp_path / "wide")
    assert out.name == "step_00000000" and (manifest.tp_size, manifest.pp_size) == (tp, pp)
    prov = manifest.provenance["hyperclone"]
    assert prov["source"] == str(src.resolve()) and prov["source_step"] == 300
    assert (prov["factor"], prov["ffn_factor"], prov["variant"], prov["noise_db"], prov["seed"]) == \
        (2, 3, variant, -5.0, 1)
    assert manifest.data == {"consumed_samples": 1234}
    assert (out / manifest.tokenizer).read_bytes() == tokenizer.read_bytes()
    assert manifest.model == widen_model_config(cfg, 2, 3)

    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len), generator=torch.Generator().manual_seed(0))
    wide, wide_cfg = load_model(tmp_path / "wide")
    with torch.no_grad():
        want = build_model(cfg, state)(tokens)
        got = wide(tokens)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_clone_checkpoint_rejects_bad_targets(tmp_path: Path) -> None:
    cfg = small_config("mqa-gelu-ln-rope-untied")
    write_weights_checkpoint(tmp_path / "small", cfg, random_small_state(cfg), 1, 1)
    with pytest.raises(ValueError, match="x2 .*num_query_groups=2.*parallel.tp_size=4"):
        clone_checkpoint(tmp_path / "small", tmp_path / "wide", CloneConfig(factor=2), 4, 1)
    with pytest.raises(ValueError, match="--hyperclone=1"):
        clone_checkpoint(tmp_path / "small", tmp_path / "wide", CloneConfig(factor=1), 1, 1)
    with pytest.raises(ValueError, match="no manifest.json"):
        clone_checkpoint(tmp_path, tmp_path / "wide", CloneConfig(factor=2), 1, 1)
    assert not (tmp_path / "wide").exists() or not any((tmp_path / "wide").iterdir())


def test_verify_clone_tool(tmp_path: Path, capsys) -> None:
    tool = load_tool()
    cfg = small_config("gqa-swiglu-rms-learned-nobias-untied")
    state = random_small_state(cfg, seed=6)
    write_weights_checkpoint(tmp_path / "small", cfg, state, 1, 1)
    clone_checkpoint(tmp_path / "small", tmp_path / "wide", CloneConfig(factor=2, ffn_factor=1, noise_db=10.0), 2, 1)
    assert tool.main(["--small", str(tmp_path / "small"), "--large", str(tmp_path / "wide"), "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "relative" in out
    table = out[out.index("  layer "):].splitlines()[: 1 + cfg.num_layers]  # header + one row per layer
    assert table[0].split() == ["layer", "qkv", "attn_out", "mlp_gate_up", "mlp_out"]
    for row in table[1:]:
        qkv, attn_out, gate_up, fc_out = row.split()[1:]
        assert 0.5 < float(qkv) < 0.99 and 0.5 < float(attn_out) < 0.99  # noised
        assert gate_up == "n/a" and float(fc_out) == pytest.approx(1.0)  # FFN not widened: no copies, no noise

    broken = load_full_state(tmp_path / "wide")
    broken["blocks.1.mlp.fc_out.weight"][:, 0] += 0.05
    write_weights_checkpoint(tmp_path / "broken", widen_model_config(cfg, 2, 1), broken, 1, 1)
    assert tool.main(["--small", str(tmp_path / "small"), "--large", str(tmp_path / "broken"), "--tokens", "64"]) == 1
    assert "FAIL" in capsys.readouterr().out

    assert tool.main(["--small", str(tmp_path / "small"), "--large", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    other = small_config("gqa-swiglu-rms-learned-nobias-untied", hidden_size=32, num_heads=8, num_query_groups=4,
                         norm="layernorm")
    write_weights_checkpoint(tmp_path / "other", other, random_small_state(other), 1, 1)
    assert tool.main(["--small", str(tmp_path / "small"), "--large", str(tmp_path / "other")]) == 2
    assert "norm: large has 'layernorm'" in capsys.readouterr().err
    assert tool.main(["--small", str(tmp_path / "small"), "--large", str(tmp_path / "wide"), "--text",
                      str(tmp_path / "missing.txt")]) == 2
    text = tmp_path / "held_out.txt"
    text.write_text("some text")
    assert tool.main(["--small", str(tmp_path / "small"), "--large", str(tmp_path / "wide"), "--text",
                      str(text)]) == 2
    assert "no tokenizer.model" in capsys.readouterr().err


def test_verify_clone_on_text(tmp_path: Path, capsys) -> None:
    """--text tokenizes held-out text with the checkpoint's own tokenizer."""
    from megaclone.data import Tokenizer, train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"The number {i} follows {i - 1} and precedes {i + 1}." for i in range(300)))
    tok_path = train_tokenizer(tmp_path / "tok", vocab_size=300, paths=[str(corpus)])
    vocab = Tokenizer.load(tok_path).vocab_size
    cfg = small_config("mha-gelu-ln-rope-bias-tied", vocab_size=vocab, max_seq_len=16)
    write_weights_checkpoint(tmp_path / "small", cfg, random_small_state(cfg, seed=8), 1, 1, tokenizer=tok_path)
    clone_checkpoint(tmp_path / "small", tmp_path / "wide", CloneConfig(factor=3, variant="diagonal"), 1, 1)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The number 1234 precedes 1235 and follows 1233. " * 6)
    tool = load_tool()
    args = ["--small", str(tmp_path / "small"), "--large", str(tmp_path / "wide"), "--text", str(held_out),
            "--seq", "16", "--tokens", "64", "--batch", "2"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out
    assert f"text {held_out}" in out and "64 tokens (4 x 16)" in out and "PASS" in out
