"""An imported HF model computes transformers' logits: through load_model at TP 1 and TP 2 x PP 2, and as a
TP=2 GPT on two gloo ranks."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import ShardReader, load_full_state, load_model, read_manifest
from megaclone.hf import import_hf_checkpoint
from megaclone.model import ReferenceGPT
from tests.distributed import run_distributed
from tests.hf.helpers import CASES, FAMILY_OF, VOCAB, hf_logits, hf_model, sample_tokens, save_hf_model
from tests.hf.workers import tp_logits

TOLERANCE = 1e-5  # fp32, of max |logit| (Gemma's scaled embeddings reach 27 here, the others 4 to 12)


@functools.cache
def imported(case: str, tp: int, pp: int, root: Path) -> tuple[Path, torch.Tensor]:
    """(checkpoint step dir, transformers' logits) of `case` imported at TP x PP; cached per session."""
    hf_dir = root / case / "hf"
    if not hf_dir.exists():
        save_hf_model(case, hf_dir)
    step_dir = import_hf_checkpoint(hf_dir, root / case / f"ckpt-tp{tp}-pp{pp}", tp_size=tp, pp_size=pp)
    return step_dir, hf_logits(hf_model(case), sample_tokens())


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_import")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_logits_equal_transformers(case: str, tp: int, pp: int, root: Path) -> None:
    step_dir, want = imported(case, tp, pp, root)
    model, cfg = load_model(step_dir)
    with torch.no_grad():
        got = model(sample_tokens())
    assert got.shape == want.shape == (2, 16, VOCAB)
    assert (got - want).abs().max().item() <= TOLERANCE * want.abs().max().item()
    manifest = read_manifest(step_dir)
    assert (manifest.tp_size, manifest.pp_size) == (tp, pp)
    assert manifest.provenance["hf_import"]["family"] == FAMILY_OF[case]
    assert cfg.padded_vocab_size == 128  # 100 padded to the multiple of 128


def test_vocab_padding_rows_are_zero(root: Path) -> None:
    step_dir, _ = imported("llama", 2, 2, root)
    state = load_full_state(step_dir)
    for name in ("embedding.word.weight", "lm_head.weight"):
        assert state[name].shape == (128, 32)
        assert torch.all(state[name][VOCAB:] == 0)
        assert torch.all(state[name][:VOCAB].abs().sum(-1) > 0)


# Each flip is an option the mapping must carry; the logits must notice it, or the test above proves nothing.
FLIPS = {
    "llama": dict(rope_scaling="none"),
    "mistral": dict(rope_scaling_factor=1.0),
    "qwen2": dict(rope_theta=10000.0),
    "gpt_neox": dict(rope_fraction=0.5),
    "gpt_neox_sequential_tied": dict(parallel_residual=True),
    "gpt2": dict(activation="gelu_exact"),
    "opt": dict(activation="gelu"),
    "opt_350m": dict(norm_placement="pre"),
    "olmo": dict(norm="rmsnorm"),
    "olmo2": dict(norm_placement="post"),
    "gemma": dict(scale_embeddings=False),
    "gemma_untied": dict(norm_unit_offset=False),
}


@pytest.mark.parametrize("case", sorted(FLIPS))
def test_logits_depend_on_every_imported_option(case: str, root: Path) -> None:
    step_dir, want = imported(case, 1, 1, root)
    cfg = dataclasses.replace(read_manifest(step_dir).model, **FLIPS[case])
    model = ReferenceGPT(cfg).eval()
    model.load_state_dict(load_full_state(step_dir))
    with torch.no_grad():
        assert (model(sample_tokens()) - want).abs().max().item() > 1e-3


def test_import_reads_only_what_each_shard_needs(root: Path) -> None:
    """The TP=2 shards hold exactly the halves of the TP=1 tensors (import slices the HF rows itself)."""
    one, _ = imported("gpt2", 1, 1, root)
    two, _ = imported("gpt2", 2, 2, root)
    with ShardReader(one) as a, ShardReader(two) as b:
        for name in a.specs:
            for rank in range(2):
                assert torch.equal(a.read_shard(name, rank, 2), b.read_shard(name, rank, 2)), name
        assert any(rel.startswith("weights/tp01") for _, rel, _ in b.accesses)


def test_tensor_parallel_gpt_matches_transformers(root: Path) -> None:
    """The TP model itself (not only the reference) runs imported GQA + llama3 rope, NeoX partial rope, OPT-350m's
    projections and post-norm, OLMo-2's QK-norm over heads split across the ranks, and Gemma."""
    cases = ["llama", "gpt_neox", "qwen2", "opt_350m", "olmo2", "gemma"]
    runs = [imported(case, 2, 2, root) for case in cases]
    results = run_distributed(tp_logits, 2, [str(step) for step, _ in runs], sample_tokens())
    for rank_logits in results:
        for case, got, (_, want) in zip(cases, rank_logits, runs):
            assert (got - want).abs().max().item() <= TOLERANCE * want.abs().max().item(), case


def test_sharded_bf16_source(tmp_path: Path) -> None:
    """A bf16 checkpoint split over several files (with its index) imports to the same fp32 values."""
    model = save_hf_model("qwen2", tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    step_dir = import_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt")
    state = load_full_state(step_dir)
    want = model.model.embed_tokens.weight.detach().to(torch.bfloat16).float()
    assert torch.equal(state["embedding.word.weight"][:VOCAB], want)
    assert read_manifest(step_dir).provenance["hf_import"]["source_dtypes"] == ["BF16"]
