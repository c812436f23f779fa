"""GPT training samples from a token shard, and the deterministic, resumable order in which ranks read them.

The sample order is one endless stream: the concatenation of per-epoch permutations seeded by (seed, epoch).
Global micro-batch k is stream[k * G : (k + 1) * G] with G = micro_batch_size * dp_size, and data-parallel
rank r reads its contiguous slice of it. The position in the stream (`consumed_samples`) is therefore the whole
state: resuming from it is exact, and the global batches do not depend on how G is split across ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from megaclone.data.shards import TokenShard


class PackedSequenceDataset:
    """Sample i is the window tokens[i * seq_len : (i + 1) * seq_len + 1]: inputs are its first seq_len tokens,
    labels the next ones. Windows overlap by one token, so every token in the shard is a label exactly once
    (except the first), and documents are packed across sample boundaries, separated by eos.
    """

    def __init__(self, shard: TokenShard, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be a positive integer")
        self.shard = shard
        self.seq_len = seq_len
        self.num_samples = (shard.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(
                f"token shard {shard.bin_path} has {shard.num_tokens} tokens, too few for one sample of "
                f"seq_len={seq_len} (needs {seq_len + 1}); use a smaller data.seq_len or more data"
            )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """The window of sample i: seq_len + 1 token ids, int64."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        return self.shard.get(i * self.seq_len, self.seq_len + 1).astype(np.int64)

    def get_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), both LongTensor [batch, seq_len], for the given sample indices."""
        windows = torch.from_numpy(np.stack([self[i] for i in indices]))  # [batch, seq_len + 1]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class DistributedBatchSampler:
    """Endless micro-batches of sample indices for one data-parallel rank (see the module docstring)."""

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need dp_size >= 1 and 0 <= dp_rank < dp_size")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self._cached_epoch = -1
        self._cached_order = np.empty(0, dtype=np.int64)

    @property
    def global_batch_size(self) -> int:
        """Samples per global micro-batch, all data-parallel ranks together."""
        return self.micro_batch_size * self.dp_size

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.num_samples

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all sample indices for `epoch`, a pure function of (seed, epoch)."""
        if epoch != self._cached_epoch:
            generator = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._cached_order = generator.permutation(self.num_samples)
            self._cached_epoch = epoch
        return self._cached_order

    def _stream(self, start: int, count: int) -> list[int]:
        """Sample indices at stream positions [start, start + count), crossing epochs where needed."""
        indices: list[int] = []
        position = start
        while len(indices) < count:
            epoch, offset = divmod(position, self.num_samples)
            take = min(count - len(indices), self.num_samples - offset)
            indices += self.epoch_order(epoch)[offset:offset + take].tolist()
            position += take
        return indices

    def next_batch(self) -> list[int]:
        """This rank's next micro-batch; advances `consumed_samples` by the global batch."""
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        batch = self._stream(start, self.micro_batch_size)
        self.consumed_samples += self.global_batch_size
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        """Endless: the training loop decides when to stop. A batch counts as consumed once it is yielded."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`. The seed and dataset size must match (else it would be a different stream);
        the micro-batch size and DP size may differ, because the state is a position in the global stream.
        """
        for key in ("seed", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]} but this sampler has {key}={getattr(self, key)}: "
                    f"resuming would read a different sample order (changed data or seed?)"
                )
        self.consumed_samples = int(state["consumed_samples"])


def build_batch_iterator(
    dataset: PackedSequenceDataset, sampler: DistributedBatchSampler
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (tokens, labels) LongTensor pairs [micro_batch_size, seq_len] for this rank, in sampler order.

    Checked at the call (not at the first batch) that the sampler was built for this dataset.
    """
    if sampler.num_samples != len(dataset):
        raise ValueError(
            f"sampler has num_samples={sampler.num_samples} but the dataset has {len(dataset)} samples"
        )
    return (dataset.get_batch(indices) for indices in sampler)
