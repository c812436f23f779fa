"""ShardReader reads any slice of a global tensor from only the shard files and ranges that hold it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import megaclone.checkpoint.shards as shards
from megaclone.checkpoint import CheckpointError, ShardReader, weight_file, write_weights_checkpoint
from tests.checkpoint import random_state, tiny_config

TP, PP = 4, 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untied GELU model (learned positions) at TP4 x PP2, and its full state."""
    cfg = tiny_config(tied_embeddings=False, position="learned")
    state = random_state(cfg, seed=3)
    root = tmp_path_factory.mktemp("reader")
    write_weights_checkpoint(root, cfg, state, TP, PP)
    return root, cfg, state


@pytest.fixture(scope="module")
def tied_ckpt(tmp_path_factory):
    cfg = tiny_config()
    state = random_state(cfg, seed=4)
    root = tmp_path_factory.mktemp("tied")
    write_weights_checkpoint(root, cfg, state, 2, 2)
    return root, cfg, state


def test_slice_across_two_shards_reads_only_those(ckpt) -> None:
    root, cfg, state = ckpt
    reader = ShardReader(root)
    per = cfg.padded_vocab_size // TP  # 32 vocabulary rows per TP shard
    got = reader.read("embedding.word.weight", (slice(per + 5, 2 * per + 3), slice(4, 9)))
    assert torch.equal(got, state["embedding.word.weight"][per + 5: 2 * per + 3, 4:9])
    assert reader.accesses == [
        ("embedding.word.weight", weight_file(1, 0), [(5, per), (4, 9)]),
        ("embedding.word.weight", weight_file(2, 0), [(0, 3), (4, 9)]),
    ]


def test_slice_within_one_shard_on_the_last_stage(ckpt) -> None:
    root, cfg, state = ckpt
    reader = ShardReader(root)
    spec = reader.specs["blocks.2.mlp.fc_out.weight"]  # [hidden, ffn], split along ffn, block 2 is on stage 1
    per = spec.tp_shape(TP)[1]
    got = reader.read(spec.name, (slice(None), slice(3 * per + 1, 3 * per + 4)))
    assert torch.equal(got, state[spec.name][:, 3 * per + 1: 3 * per + 4])
    assert reader.accesses == [(spec.name, weight_file(3, 1), [(0, cfg.hidden_size), (1, 4)])]


def test_replicated_parameter_reads_first_tp_file(ckpt) -> None:
    root, cfg, state = ckpt
    reader = ShardReader(root)
    assert torch.equal(reader.read("final_norm.weight", (slice(2, 6),)), state["final_norm.weight"][2:6])
    assert torch.equal(reader.read("embedding.position.weight"), state["embedding.position.weight"])
    assert reader.accesses == [("final_norm.weight", weight_file(0, 1), [(2, 6)]),
                               ("embedding.position.weight", weight_file(0, 0), [(0, cfg.max_seq_len),
                                                                                (0, cfg.hidden_size)])]


def test_tied_embedding_is_read_from_stage_zero(tied_ckpt) -> None:
    root, cfg, state = tied_ckpt
    reader = ShardReader(root)
    got = reader.read("embedding.word.weight", (slice(60, 70),))
    assert torch.equal(got, state["embedding.word.weight"][60:70])
    assert [(f, r[0]) for _, f, r in reader.accesses] == [(weight_file(0, 0), (60, 64)), (weight_file(1, 0), (0, 6))]


def test_reshard_to_another_tp_degree(ckpt) -> None:
    """A TP2 target rank's shard is one read spanning two of the TP4 files."""
    root, cfg, state = ckpt
    reader = ShardReader(root)
    for spec in reader.specs.values():
        for rank in range(2):
            assert torch.equal(reader.read_shard(spec.name, rank, 2), state[spec.name][spec.tp_slices(rank, 2)])


def test_each_file_opened_once(ckpt, monkeypatch) -> None:
    root, _, state = ckpt
    opened = []
    real_open = shards.safe_open

    def counting_open(path, framework):
        opened.append(path)
        return real_open(path, framework=framework)

    monkeypatch.setattr(shards, "safe_open", counting_open)
    reader = ShardReader(root)
    for _ in range(3):
        for name in state:
            reader.read(name)
    assert sorted(opened) == sorted(str(root / "step_00000000" / weight_file(t, p))
                                    for t in range(TP) for p in range(PP))


def test_reader_only_opens_files_it_needs(ckpt, monkeypatch) -> None:
    root, _, state = ckpt
    opened = []
    real_open = shards.safe_open
    monkeypatch.setattr(shards, "safe_open", lambda path, framework: opened.append(path) or real_open(path, framework))
    reader = ShardReader(root)
    reader.read("blocks.0.attn.qkv.weight", (slice(0, 2),))
    assert [p.rsplit("/", 2)[-2:] for p in opened] == [["weights", "tp00-pp00.safetensors"]]


def test_bad_index_and_unknown_name(ckpt) -> None:
    root, _, _ = ckpt
    reader = ShardReader(root)
    with pytest.raises(ValueError, match="step 1"):
        reader.read("final_norm.weight", (slice(0, 8, 2),))
    with pytest.raises(ValueError, match="more entries"):
        reader.read("final_norm.weight", (slice(0, 8), slice(0, 1)))
    with pytest.raises(CheckpointError, match="blocks.9.attn.qkv.weight"):
        reader.read("blocks.9.attn.qkv.weight")
    assert reader.read("lm_head.weight", (slice(40, 40),)).shape == (0, 32)


@pytest.fixture(scope="module")
def reader_and_state(ckpt):
    root, _, state = ckpt
    return ShardReader(root), state


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_slice_equals_full_slice(reader_and_state, data) -> None:
    reader, state = reader_and_state
    name = data.draw(st.sampled_from(sorted(state)))
    index = []
    for size in state[name].shape:
        start = data.draw(st.integers(0, size))
        stop = data.draw(st.integers(start, size))
        index.append(slice(start, stop))
    index = tuple(index)
    before = len(reader.accesses)
    got = reader.read(name, index)
    assert torch.equal(got, state[name][index])
    spec = reader.specs[name]
    for _, _, ranges in reader.accesses[before:]:  # every read stays inside the stored (TP-local) tensor
        assert all(0 <= a <= b <= n for (a, b), n in zip(ranges, spec.tp_shape(TP)))
    if spec.tp_axis is not None:  # total rows read along the split axis = rows requested
        ax = spec.tp_axis
        touched = sum(r[ax][1] - r[ax][0] for _, _, r in reader.accesses[before:])
        assert touched == index[ax].stop - index[ax].start
