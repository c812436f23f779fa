"""Samples and their order: windows shift by one, batches are deterministic, resumable and DP-split invariant."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megaclone.data import DistributedBatchSampler, PackedSequenceDataset, TokenShard, build_batch_iterator


def arange_shard(num_tokens: int) -> TokenShard:
    """An in-memory shard whose token at position p is p (mod 65536): every window names its own position."""
    index = {"num_tokens": num_tokens, "num_documents": 1, "vocab_size": 65536, "doc_offsets": [0, num_tokens]}
    return TokenShard(Path("arange.bin"), index, (np.arange(num_tokens) % 65536).astype(np.uint16))


def take(sampler: DistributedBatchSampler, count: int) -> list[list[int]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def test_windows_and_labels():
    dataset = PackedSequenceDataset(arange_shard(101), seq_len=10)
    assert len(dataset) == 10  # (101 - 1) // 10: the last window ends exactly at the last token
    assert dataset[9].tolist() == list(range(90, 101))
    tokens, labels = dataset.get_batch([3, 0])
    assert tokens.dtype == labels.dtype == torch.int64 and tokens.shape == labels.shape == (2, 10)
    assert tokens[0].tolist() == list(range(30, 40)) and labels[0].tolist() == list(range(31, 41))
    assert PackedSequenceDataset(arange_shard(100), seq_len=10).num_samples == 9
    with pytest.raises(IndexError):
        dataset[10]


def test_too_small_shard_is_a_clear_error():
    with pytest.raises(ValueError, match=r"arange\.bin has 10 tokens.*seq_len=10"):
        PackedSequenceDataset(arange_shard(10), seq_len=10)


def test_sampler_is_deterministic_and_each_epoch_is_a_permutation():
    first = take(DistributedBatchSampler(24, 4, 0, 1, seed=5), 12)
    assert first == take(DistributedBatchSampler(24, 4, 0, 1, seed=5), 12)
    assert first != take(DistributedBatchSampler(24, 4, 0, 1, seed=6), 12)
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:24]) == sorted(flat[24:]) == list(range(24))
    assert flat[:24] != flat[24:]  # a new permutation each epoch


def test_epoch_wrap_crosses_into_the_next_permutation():
    sampler = DistributedBatchSampler(10, 4, 0, 1, seed=0)
    batches = take(sampler, 3)
    flat = [i for batch in batches for i in batch]
    assert flat[:10] == sampler.epoch_order(0).tolist()
    assert flat[10:] == sampler.epoch_order(1)[:2].tolist()  # the third batch straddles epochs 0 and 1
    assert sampler.consumed_samples == 12 and sampler.epoch == 1


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_resume_gives_the_same_batches(dp_size):
    def sampler(rank):
        return DistributedBatchSampler(37, 3, rank, dp_size, seed=11)

    for rank in range(dp_size):
        reference = take(sampler(rank), 40)
        interrupted = sampler(rank)
        assert take(interrupted, 17) == reference[:17]
        state = interrupted.state_dict()
        assert state["consumed_samples"] == 17 * 3 * dp_size
        resumed = sampler(rank)
        resumed.load_state_dict(state)
        assert take(resumed, 23) == reference[17:]
        constructed = DistributedBatchSampler(37, 3, rank, dp_size, seed=11, consumed_samples=state["consumed_samples"])
        assert take(constructed, 23) == reference[17:]


def test_global_batches_do_not_depend_on_the_dp_split():
    single = take(DistributedBatchSampler(50, 6, 0, 1, seed=2), 30)
    split2 = [take(DistributedBatchSampler(50, 3, r, 2, seed=2), 30) for r in range(2)]
    split3 = [take(DistributedBatchSampler(50, 2, r, 3, seed=2), 30) for r in range(3)]
    for k in range(30):
        assert split2[0][k] + split2[1][k] == single[k]
        assert split3[0][k] + split3[1][k] + split3[2][k] == single[k]


def test_resume_at_a_different_dp_size_continues_the_global_stream():
    reference = take(DistributedBatchSampler(50, 4, 0, 1, seed=9), 20)
    wide = [DistributedBatchSampler(50, 2, r, 2, seed=9) for r in range(2)]
    for sampler in wide:
        take(sampler, 7)
    narrow = DistributedBatchSampler(50, 4, 0, 1, seed=9)
    narrow.load_state_dict(wide[0].state_dict())
    assert take(narrow, 13) == reference[7:]


def test_state_from_other_data_is_refused():
    sampler = DistributedBatchSampler(50, 4, 0, 1, seed=9)
    with pytest.raises(ValueError, match="seed"):
        sampler.load_state_dict({"consumed_samples": 8, "seed": 1, "num_samples": 50})
    with pytest.raises(ValueError, match="num_samples"):
        sampler.load_state_dict({"consumed_samples": 8, "seed": 9, "num_samples": 51})
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedBatchSampler(50, 4, 2, 2, seed=0)


def test_batch_iterator_yields_rank_batches():
    dataset = PackedSequenceDataset(arange_shard(1001), seq_len=8)
    sampler = DistributedBatchSampler(len(dataset), 4, 1, 2, seed=0)
    expected = take(DistributedBatchSampler(len(dataset), 4, 1, 2, seed=0), 3)
    iterator = build_batch_iterator(dataset, sampler)
    for indices in expected:
        tokens, labels = next(iterator)
        assert tokens.shape == labels.shape == (4, 8) and tokens.dtype == torch.long
        assert tokens[:, 0].tolist() == [8 * i for i in indices]  # token value = position in the shard
        assert torch.equal(labels[:, :-1], tokens[:, 1:])
    assert sampler.consumed_samples == 3 * 8
    with pytest.raises(ValueError, match="num_samples"):
        build_batch_iterator(dataset, DistributedBatchSampler(5, 1, 0, 1, seed=0))
