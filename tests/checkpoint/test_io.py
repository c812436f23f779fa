"""Directory protocol: temporary name, commit renames, `latest` moves last; resolve, prune, manifest."""

from __future__ import annotations

import json

import pytest

from megaclone.checkpoint import (
    CheckpointError,
    Manifest,
    ShardReader,
    begin_checkpoint,
    commit_checkpoint,
    file_digest,
    load_full_state,
    make_manifest,
    prune_checkpoints,
    read_manifest,
    resolve_checkpoint,
    write_manifest,
    write_weights_checkpoint,
)
from megaclone.checkpoint.io import holds_no_checkpoint, previous_complete_step, remove_stale_saves, stale_saves
from tests.checkpoint import random_state, tiny_config


def _manual_checkpoint(root, step: int, cfg) -> object:
    """begin, write a manifest, but do not commit: returns the temporary directory."""
    tmp = begin_checkpoint(root, step)
    write_manifest(tmp, make_manifest(cfg, step, 1, 1, data={"consumed_samples": step * 8}))
    return tmp


def test_latest_moves_only_on_commit(tmp_path) -> None:
    cfg = tiny_config()
    first = write_weights_checkpoint(tmp_path, cfg, random_state(cfg, 1), 1, 1, step=100)
    tmp = _manual_checkpoint(tmp_path, 200, cfg)
    assert tmp.name == ".tmp-step_00000200" and tmp.is_dir()
    assert resolve_checkpoint(tmp_path) == first  # the in-progress directory does not count
    assert (tmp_path / "latest").read_text().strip() == "step_00000100"
    final = commit_checkpoint(tmp)
    assert final == tmp_path / "step_00000200" and not tmp.exists()
    assert resolve_checkpoint(tmp_path) == final
    assert read_manifest(tmp_path).data == {"consumed_samples": 1600}
    assert resolve_checkpoint(first) == first  # a step directory resolves to itself
    assert resolve_checkpoint(first / "manifest.json") == first


def test_leftover_tmp_alone_is_not_a_checkpoint(tmp_path) -> None:
    _manual_checkpoint(tmp_path, 3, tiny_config())  # a crash before commit
    with pytest.raises(CheckpointError, match="not a megaclone checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"no manifest\.json in"):
        ShardReader(tmp_path)
    assert holds_no_checkpoint(tmp_path) and holds_no_checkpoint(tmp_path / "missing")
    assert stale_saves(tmp_path) == [tmp_path / ".tmp-step_00000003"]
    assert remove_stale_saves(tmp_path) == [tmp_path / ".tmp-step_00000003"] and list(tmp_path.iterdir()) == []


def test_roots_with_committed_or_foreign_content(tmp_path) -> None:
    """A root that holds anything besides interrupted writes is not one a run may start afresh in."""
    cfg = tiny_config()
    (tmp_path / "notes.txt").write_text("x")
    assert not holds_no_checkpoint(tmp_path)
    root = tmp_path / "ckpt"
    first, second = (write_weights_checkpoint(root, cfg, random_state(cfg), 1, 1, step=s) for s in (10, 20))
    begin_checkpoint(root, 30)
    assert not holds_no_checkpoint(root)
    assert previous_complete_step(second) == first and previous_complete_step(first) is None
    assert previous_complete_step(root / ".tmp-step_00000030") is None  # not a step directory
    (root / "latest").unlink()  # a crash between the commit's rename and the pointer's update
    with pytest.raises(CheckpointError, match=rf"the newest step_00000020: .* Pass {second} itself"):
        resolve_checkpoint(root)


def test_begin_removes_stale_tmp(tmp_path) -> None:
    tmp = begin_checkpoint(tmp_path, 7)
    (tmp / "junk").write_text("half-written")
    again = begin_checkpoint(tmp_path, 7)
    assert again == tmp and list(again.iterdir()) == []


def test_commit_requires_a_valid_manifest(tmp_path) -> None:
    tmp = begin_checkpoint(tmp_path, 1)
    with pytest.raises(CheckpointError, match="manifest.json"):
        commit_checkpoint(tmp)
    assert tmp.is_dir() and not (tmp_path / "step_00000001").exists() and not (tmp_path / "latest").exists()
    with pytest.raises(ValueError, match="begin_checkpoint"):
        commit_checkpoint(tmp_path / "step_00000001")


def test_commit_replaces_an_existing_step(tmp_path) -> None:
    cfg = tiny_config()
    a, b = random_state(cfg, 1), random_state(cfg, 2)
    write_weights_checkpoint(tmp_path, cfg, a, 1, 1, step=10)
    final = write_weights_checkpoint(tmp_path, cfg, b, 2, 1, step=10)
    assert final == tmp_path / "step_00000010"
    assert read_manifest(final).layout["tp_size"] == 2
    assert all((load_full_state(tmp_path)[k] == b[k]).all() for k in b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000010"]


def test_crash_between_the_renames_of_a_replace(tmp_path) -> None:
    """commit_checkpoint moved the old step aside but died before renaming the new one into place."""
    cfg = tiny_config()
    step_dir = write_weights_checkpoint(tmp_path, cfg, random_state(cfg), 1, 1, step=10)
    step_dir.rename(tmp_path / ".old-step_00000010")
    assert resolve_checkpoint(tmp_path) == tmp_path / ".old-step_00000010"
    write_weights_checkpoint(tmp_path, cfg, random_state(cfg), 2, 1, step=10)
    assert resolve_checkpoint(tmp_path) == step_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000010"]


def test_write_into_named_step_dir_and_tokenizer(tmp_path) -> None:
    cfg = tiny_config()
    tok = tmp_path / "sp.model"
    tok.write_bytes(b"\x0asentencepiece-bytes")
    step_dir = write_weights_checkpoint(tmp_path / "out" / "step_00000042", cfg, random_state(cfg), 1, 1,
                                        tokenizer=tok, provenance={"source": "x", "factor": 2})
    assert step_dir == tmp_path / "out" / "step_00000042"
    m = read_manifest(tmp_path / "out")
    assert m.step == 42 and m.tokenizer == "tokenizer.model" and m.deepspeed is None
    assert (step_dir / "tokenizer.model").read_bytes() == tok.read_bytes()
    assert m.other_files == {"tokenizer.model": file_digest(step_dir / "tokenizer.model")}  # every file: a digest
    assert m.provenance == {"source": "x", "factor": 2}
    with pytest.raises(ValueError, match="names step 42 but step=5"):
        write_weights_checkpoint(tmp_path / "out" / "step_00000042", cfg, random_state(cfg), 1, 1, step=5)


def test_prune_keeps_newest_and_latest(tmp_path) -> None:
    cfg = tiny_config()
    state = random_state(cfg)
    for step in (1, 2, 3, 4):
        write_weights_checkpoint(tmp_path, cfg, state, 1, 1, step=step)
    (tmp_path / "latest").write_text("step_00000001\n")  # e.g. a rollback pointed it at an old one
    stale = begin_checkpoint(tmp_path, 5)  # in progress: never pruned
    assert prune_checkpoints(tmp_path, 0) == []
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step_00000005", "latest", "step_00000001",
                                                          "step_00000003", "step_00000004"]
    assert stale.is_dir()


def test_manifest_roundtrip(tmp_path) -> None:
    cfg = tiny_config(activation="swiglu", num_query_groups=2)
    m = make_manifest(cfg, 9, 2, 1, dp_size=4, zero_stage=1, precision="bf16", deepspeed="deepspeed",
                      data={"consumed_samples": 72}, provenance={"converter": {"tp": 2}})
    d = json.loads(json.dumps(m.to_dict()))
    assert d["format"] == "megaclone-checkpoint" and d["format_version"] == 1
    assert set(d) == {"format", "format_version", "step", "model", "layout", "tokenizer", "data", "params",
                      "files", "deepspeed", "provenance"}  # no other_files: a manifest as earlier versions wrote
    back = Manifest.from_dict(d)
    assert back == m
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left behind
