"""Vocab-parallel cross entropy equals torch's cross entropy over the real (unpadded) vocabulary."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaclone.config import ParallelConfig
from megaclone.parallel import TPGroup, build_layout, vocab_parallel_cross_entropy
from tests.distributed import run_distributed

VOCAB, PADDED = 50, 64  # 14 padded columns: with TP=4 the last shard (48..63) is mostly padding


def _inputs():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, PADDED, generator=gen) * 4
    logits[..., VOCAB:] = 100.0  # padding must never count, however large its logits
    labels = torch.randint(0, VOCAB, (3, 5), generator=gen)
    return logits, labels


def _expected():
    logits, labels = _inputs()
    logits = logits[..., :VOCAB].clone().requires_grad_()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 5)
    loss.mean().backward()
    return loss.detach(), logits.grad


def _worker(rank: int, world: int):
    layout = build_layout(ParallelConfig(tp_size=world))
    logits, labels = _inputs()
    local = logits.chunk(world, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, layout.tp, VOCAB)
    loss.mean().backward()
    return loss.detach(), local.grad


def test_single_rank_matches_torch() -> None:
    logits, labels = _inputs()
    logits.requires_grad_()
    loss = vocab_parallel_cross_entropy(logits, labels, TPGroup(), VOCAB)
    loss.mean().backward()
    want_loss, want_grad = _expected()
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(logits.grad[..., :VOCAB], want_grad)
    assert torch.count_nonzero(logits.grad[..., VOCAB:]) == 0


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_torch(tp: int) -> None:
    want_loss, want_grad = _expected()
    padded_grad = F.pad(want_grad, (0, PADDED - VOCAB))
    for rank, (loss, grad) in enumerate(run_distributed(_worker, tp)):
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, padded_grad.chunk(tp, dim=-1)[rank])
