"""Shared helpers of the conversion tests: tiny source checkpoints at every layout, shard file contents."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from megaclone.checkpoint import file_digest, weight_file, write_weights_checkpoint
from megaclone.config import ModelConfig
from tests.clone import random_small_state

# Both must allow TP4 at the source (4 query groups) and PP2 (2 layers); tied and untied, gated and not.
ARCHS = {
    "mha-gelu-ln-rope-bias-tied": dict(),
    "gqa-swiglu-rms-learned-nobias-untied": dict(activation="swiglu", norm="rmsnorm", position="learned",
                                                 bias=False, tied_embeddings=False, num_heads=8, num_query_groups=4),
}


def small_config(arch: str) -> ModelConfig:
    base = dict(vocab_size=50, vocab_multiple=16, hidden_size=16, num_layers=2, num_heads=4, max_seq_len=8)
    base.update(ARCHS[arch])
    return ModelConfig(**base)


def make_source(root: Path, arch: str, tp: int, pp: int, seed: int = 0, step: int = 7) -> Path:
    """A weight checkpoint of the arch's random small model at TP x PP, with a tokenizer file; returns ROOT."""
    cfg = small_config(arch)
    tokenizer = root.parent / f"{root.name}.tokenizer.model"
    tokenizer.write_bytes(b"not a real sentencepiece model, copied verbatim")
    write_weights_checkpoint(root, cfg, random_small_state(cfg, seed), tp, pp, step=step, tokenizer=tokenizer,
                             data={"consumed_samples": 1234})
    return root


def read_file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def layout_digests(step_dir: Path, tp: int, pp: int) -> dict[str, str]:
    return {weight_file(t, p): file_digest(step_dir / weight_file(t, p))["sha256"]
            for p in range(pp) for t in range(tp)}


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == torch.float32 and torch.equal(
        a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes (to prove a failed conversion wrote nothing)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}
