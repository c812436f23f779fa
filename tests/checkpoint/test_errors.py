"""Every problem with a checkpoint on disk is a CheckpointError naming the file and what was expected."""

from __future__ import annotations

import json

import pytest
import torch

from megaclone.checkpoint import (
    CheckpointError,
    ShardReader,
    load_full_state,
    load_model,
    read_manifest,
    save_weight_shard,
    weight_file,
    write_weights_checkpoint,
)
from tests.checkpoint import random_state, tiny_config


@pytest.fixture
def ckpt(tmp_path):
    cfg = tiny_config(tied_embeddings=False)
    step_dir = write_weights_checkpoint(tmp_path / "run", cfg, random_state(cfg), 2, 2)
    return tmp_path / "run", step_dir, cfg


def _edit_manifest(step_dir, edit) -> None:
    path = step_dir / "manifest.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_missing_manifest(tmp_path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match=rf"not a megaclone checkpoint \(no manifest\.json in {tmp_path}\)"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        read_manifest(tmp_path / "does_not_exist")


def test_unknown_format_version(ckpt) -> None:
    root, step_dir, _ = ckpt
    _edit_manifest(step_dir, lambda d: d.update(format_version=2))
    with pytest.raises(CheckpointError, match=r"manifest\.json: unknown format_version 2"):
        read_manifest(root)


def test_wrong_format_and_bad_json(ckpt) -> None:
    root, step_dir, _ = ckpt
    _edit_manifest(step_dir, lambda d: d.update(format="something-else"))
    with pytest.raises(CheckpointError, match="format='something-else'"):
        read_manifest(root)
    (step_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ShardReader(root)


def test_param_shape_disagrees_with_model_config(ckpt) -> None:
    root, step_dir, _ = ckpt
    _edit_manifest(step_dir, lambda d: d["model"].update(hidden_size=64, ffn_size=256))
    with pytest.raises(CheckpointError, match=r"embedding\.word\.weight has shape \[128, 32\].*shape \[128, 64\]"):
        read_manifest(root)


def test_param_entry_inconsistent(ckpt) -> None:
    root, step_dir, _ = ckpt
    def edit(d):
        (entry,) = [p for p in d["params"] if p["name"] == "blocks.0.attn.qkv.weight"]
        entry["tp_axis"] = None  # same shape, but claims to be replicated

    _edit_manifest(step_dir, edit)
    with pytest.raises(CheckpointError, match=r"parameter blocks\.0\.attn\.qkv\.weight is .*'tp_axis': None"):
        read_manifest(root)
    _edit_manifest(step_dir, lambda d: d["params"].pop())
    with pytest.raises(CheckpointError, match=r"missing \['lm_head.weight'\]"):
        read_manifest(root)


def test_layout_that_does_not_fit_the_model(ckpt) -> None:
    root, step_dir, _ = ckpt
    _edit_manifest(step_dir, lambda d: d["layout"].update(tp_size=3))
    with pytest.raises(CheckpointError, match="tp_size=3"):
        read_manifest(root)


def test_latest_naming_a_missing_directory(ckpt) -> None:
    root, _, _ = ckpt
    (root / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match=r"latest names 'step_00000099'"):
        ShardReader(root)
    (root / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="expected the name of a step directory"):
        read_manifest(root)


def test_missing_shard_file(ckpt) -> None:
    root, step_dir, _ = ckpt
    (step_dir / weight_file(1, 1)).unlink()
    reader = ShardReader(root)
    reader.read("blocks.0.attn.qkv.weight")  # stage 0 still reads
    with pytest.raises(CheckpointError, match=r"missing shard file .*tp01-pp01\.safetensors"):
        reader.read("lm_head.weight")
    with pytest.raises(CheckpointError, match=r"missing shard file .*tp01-pp01\.safetensors"):
        load_model(root, verify=False)
    with pytest.raises(CheckpointError, match=r"missing shard file .*tp01-pp01\.safetensors"):
        reader.verify()


def test_truncated_shard_file(ckpt) -> None:
    root, step_dir, _ = ckpt
    path = step_dir / weight_file(0, 0)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{path}.* {len(data) - 100} bytes, the manifest expects {len(data)}"):
        ShardReader(root).read("embedding.word.weight")
    # without the size hint the safetensors header check still catches it, wrapped with the file name
    _edit_manifest(step_dir, lambda d: d["files"][weight_file(0, 0)].update(bytes=len(data) - 100))
    with pytest.raises(CheckpointError, match=rf"{path} is not a readable safetensors file"):
        ShardReader(root).read("embedding.word.weight")
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{path}"):
        load_full_state(root, verify=False)


def test_corrupted_bytes_caught_by_verify(ckpt) -> None:
    root, step_dir, _ = ckpt
    path = step_dir / weight_file(1, 0)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # flip a bit inside the last tensor's data: same size, still parses
    path.write_bytes(bytes(data))
    reader = ShardReader(root)
    reader.read("embedding.word.weight")  # reading alone cannot tell
    with pytest.raises(CheckpointError, match=rf"checksum mismatch for {path}"):
        reader.verify()
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_full_state(root)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_model(root)


def test_verify_requires_every_layout_file_listed(ckpt) -> None:
    root, step_dir, _ = ckpt
    _edit_manifest(step_dir, lambda d: d["files"].pop(weight_file(0, 1)))
    with pytest.raises(CheckpointError, match=r"'files' does not list weights/tp00-pp01\.safetensors"):
        ShardReader(root).verify()


def _rewrite_shard(step_dir, rel, edit) -> None:
    """Rewrite a shard file with `edit` applied to its tensors and fix its manifest entry, as a bad writer would."""
    from safetensors.torch import load_file

    from megaclone.checkpoint import file_digest

    tensors = load_file(str(step_dir / rel))
    edit(tensors)
    save_weight_shard(step_dir / rel, tensors)
    _edit_manifest(step_dir, lambda d: d["files"].update({rel: file_digest(step_dir / rel)}))


def test_tensor_missing_in_file(ckpt) -> None:
    root, step_dir, _ = ckpt
    _rewrite_shard(step_dir, weight_file(1, 0), lambda t: t.pop("blocks.1.mlp.fc_in.weight"))
    reader = ShardReader(root)
    reader.verify()  # the files match the manifest; the content is what is wrong
    with pytest.raises(CheckpointError, match=r"tensor blocks\.1\.mlp\.fc_in\.weight missing in shard file .*tp01"):
        reader.read("blocks.1.mlp.fc_in.weight")


def test_stored_shape_differs_from_spec(ckpt) -> None:
    root, step_dir, _ = ckpt
    _rewrite_shard(step_dir, weight_file(0, 0),
                   lambda t: t.update({"blocks.0.attn.qkv.weight": t["blocks.0.attn.qkv.weight"][:-8]}))
    with pytest.raises(CheckpointError, match=r"tp00-pp00.*blocks\.0\.attn\.qkv\.weight has shape \[40, 32\], "
                                              r"expected the TP shard shape \[48, 32\]"):
        ShardReader(root).read("blocks.0.attn.qkv.weight", (slice(0, 1),))


def test_non_fp32_tensor(ckpt) -> None:
    root, step_dir, _ = ckpt
    from safetensors.torch import load_file, save_file

    from megaclone.checkpoint import file_digest

    rel = weight_file(0, 1)
    tensors = load_file(str(step_dir / rel))
    tensors["final_norm.weight"] = tensors["final_norm.weight"].to(torch.bfloat16)
    save_file(tensors, str(step_dir / rel))
    _edit_manifest(step_dir, lambda d: d["files"].update({rel: file_digest(step_dir / rel)}))
    with pytest.raises(CheckpointError, match="final_norm.weight has dtype BF16, expected F32"):
        ShardReader(root).read("final_norm.weight")


def test_writer_rejects_bad_input_before_writing(tmp_path) -> None:
    cfg = tiny_config()
    state = random_state(cfg)
    with pytest.raises(ValueError, match="tp_size=8"):
        write_weights_checkpoint(tmp_path / "a", cfg, state, 8, 1)
    with pytest.raises(ValueError, match="num_layers=3 must be >= parallel.pp_size=4"):
        write_weights_checkpoint(tmp_path / "a", cfg, state, 1, 4)
    with pytest.raises(ValueError, match=r"missing \['final_norm.bias'\]"):
        write_weights_checkpoint(tmp_path / "a", cfg, {k: v for k, v in state.items() if k != "final_norm.bias"}, 1, 1)
    with pytest.raises(ValueError, match=r"full_state\['final_norm.weight'\] has shape \[31\]"):
        write_weights_checkpoint(tmp_path / "a", cfg, {**state, "final_norm.weight": torch.ones(31)}, 1, 1)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        write_weights_checkpoint(tmp_path / "a", cfg, state, 1, 1, tokenizer=tmp_path / "nope.model")
    assert not (tmp_path / "a").exists()


def test_failed_write_leaves_previous_checkpoint(tmp_path) -> None:
    """A source that fails midway leaves no step directory or temporary directory, and `latest` unchanged."""
    cfg = tiny_config()
    state = random_state(cfg)
    first = write_weights_checkpoint(tmp_path, cfg, state, 1, 1, step=1)

    def failing(name, index):
        if name.startswith("blocks.2"):
            raise RuntimeError("source died")
        return state[name][index]

    with pytest.raises(RuntimeError, match="source died"):
        write_weights_checkpoint(tmp_path, cfg, failing, 1, 2, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    assert ShardReader(tmp_path).path == first
