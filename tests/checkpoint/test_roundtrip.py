"""Write a full state at every layout, read it back bit for bit, and get the reference model's logits."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors import safe_open

from megaclone.checkpoint import (
    FORMAT_VERSION,
    load_full_state,
    load_model,
    read_manifest,
    weight_file,
    write_weights_checkpoint,
)
from megaclone.model import ReferenceGPT
from megaclone.spec import build_param_specs, stages_of
from tests.checkpoint import ARCHS, LAYOUTS, fits, random_state, tiny_config

CASES = [(arch, tp, pp) for arch in sorted(ARCHS) for tp, pp in LAYOUTS if fits(tiny_config(**ARCHS[arch]), tp, pp)]


def test_cases_cover_every_layout_and_arch() -> None:
    assert {(tp, pp) for _, tp, pp in CASES} == set(LAYOUTS)
    assert {arch for arch, _, _ in CASES} == set(ARCHS)
    assert ("tied-swiglu-layernorm-mqa", 2, 1) not in CASES  # one query group cannot be split


@pytest.mark.parametrize(("arch", "tp", "pp"), CASES)
def test_roundtrip_any_layout(tmp_path, arch: str, tp: int, pp: int) -> None:
    cfg = tiny_config(**ARCHS[arch])
    state = random_state(cfg, seed=7)
    step_dir = write_weights_checkpoint(tmp_path, cfg, state, tp, pp, step=5, provenance={"test": arch})
    assert step_dir == tmp_path / "step_00000005"
    assert (tmp_path / "latest").read_text().strip() == "step_00000005"

    manifest = read_manifest(tmp_path)
    assert manifest.step == 5 and manifest.model == cfg and manifest.provenance == {"test": arch}
    assert manifest.layout["tp_size"] == tp and manifest.layout["pp_size"] == pp
    assert manifest.to_dict()["format_version"] == FORMAT_VERSION
    assert sorted(manifest.files) == sorted(weight_file(t, p) for t in range(tp) for p in range(pp))

    full = load_full_state(tmp_path)
    assert list(full) == [s.name for s in build_param_specs(cfg)]
    for name, want in state.items():
        assert full[name].dtype == torch.float32
        assert torch.equal(full[name], want), name

    model, got_cfg = load_model(step_dir)
    assert got_cfg == cfg and not model.training
    ref = ReferenceGPT(cfg)
    ref.load_state_dict(state)
    ref.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, want_logits = model(tokens), ref(tokens)
    assert logits.shape == (2, 12, cfg.vocab_size)
    assert torch.equal(logits, want_logits)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_files_hold_tp_slices_on_their_first_stage(tmp_path, arch: str) -> None:
    """Each file holds exactly the TP slices of the parameters stored on its stage (tied embedding: stage 0)."""
    cfg = tiny_config(**ARCHS[arch])
    tp = 2 if fits(cfg, 2, 2) else 1
    pp = 2
    state = random_state(cfg)
    step_dir = write_weights_checkpoint(tmp_path, cfg, state, tp, pp)
    specs = build_param_specs(cfg)
    for p in range(pp):
        want_names = {s.name for s in specs if stages_of(s, cfg, pp)[0] == p}
        for t in range(tp):
            with safe_open(str(step_dir / weight_file(t, p)), framework="pt") as f:
                assert set(f.keys()) == want_names
                for spec in specs:
                    if spec.name in want_names:
                        assert torch.equal(f.get_tensor(spec.name), state[spec.name][spec.tp_slices(t, tp)])
    if cfg.tied_embeddings:
        with safe_open(str(step_dir / weight_file(0, pp - 1)), framework="pt") as f:
            assert "embedding.word.weight" not in f.keys()


def test_load_never_unpickles(tmp_path, monkeypatch) -> None:
    cfg = tiny_config()
    write_weights_checkpoint(tmp_path, cfg, random_state(cfg), 2, 2)

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, _ = load_model(tmp_path)
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, cfg.vocab_size)


def test_slice_source_callable_matches_dict(tmp_path) -> None:
    """A (name, index) reader writes the same files as the full dict, without the full tensors in memory."""
    cfg = tiny_config(tied_embeddings=False)
    state = random_state(cfg)
    calls = []

    def source(name, index):
        calls.append((name, index))
        return state[name][index].clone()

    a = write_weights_checkpoint(tmp_path / "a", cfg, state, 2, 2)
    b = write_weights_checkpoint(tmp_path / "b", cfg, source, 2, 2)
    assert read_manifest(a).files == read_manifest(b).files  # same sha256 for every weight file
    qkv = next(s for s in build_param_specs(cfg) if s.name == "blocks.0.attn.qkv.weight")
    assert ("blocks.0.attn.qkv.weight", qkv.tp_slices(1, 2)) in calls
