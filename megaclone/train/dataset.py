"""Where a run's batches come from: the token shards (built under the run directory when none are
given), the tokenizer that wrote them, and a resumable sampler per data-parallel rank.

`plan_data` only checks paths (no work, usable before any process group exists); `prepare_data_on_rank0`
builds what is missing on rank 0 while the other ranks wait; `open_data` opens everything on every rank.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megaclone.config import RunConfig
from megaclone.data import (
    DistributedBatchSampler,
    PackedSequenceDataset,
    Tokenizer,
    TokenShard,
    build_batch_iterator,
    prepare_data,
    shard_paths,
)
from megaclone.parallel import Layout

log = logging.getLogger("megaclone.train")

DEFAULT_CORPUS_PREFIX = "data/corpus"  # under the run directory


@dataclass
class DataPlan:
    prefix: Path  # token shards <prefix>_{train,valid}.bin
    tokenizer: Path | None  # None: trained on the default corpus at <prefix>_tokenizer.model
    build: bool  # the default corpus is (re)built under the run directory

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer if self.tokenizer is not None else Path(f"{self.prefix}_tokenizer.model")


def plan_data(cfg: RunConfig, tokenizer: str | Path | None = None) -> DataPlan:
    """Resolve shard and tokenizer paths, failing on missing files before any work.

    `tokenizer` (a checkpoint's copy, when resuming or cloning) wins over `data.tokenizer`.
    """
    tok = Path(tokenizer) if tokenizer else (Path(cfg.data.tokenizer) if cfg.data.tokenizer else None)
    if tok is not None and not tok.is_file():
        raise FileNotFoundError(f"data.tokenizer: tokenizer model {tok} does not exist")
    if not cfg.data.data_prefix:
        return DataPlan(Path(cfg.run_dir) / DEFAULT_CORPUS_PREFIX, tok, build=True)
    prefix = Path(cfg.data.data_prefix)
    for split in ("train", "valid"):
        for path in shard_paths(prefix, split):
            if not path.is_file():
                raise FileNotFoundError(f"data.data_prefix={prefix}: token shard file {path} does not exist "
                                        f"(write it with tools/preprocess_data.py --output-prefix {prefix})")
    if tok is None:
        index = json.loads(shard_paths(prefix, "train")[1].read_text())
        tok = Path(index.get("tokenizer_path", ""))
        if not tok.is_file():
            raise FileNotFoundError(f"{shard_paths(prefix, 'train')[1]}: its tokenizer {tok} does not exist; "
                                    f"set data.tokenizer")
    return DataPlan(prefix, tok, build=False)


def prepared_vocab_size(cfg: RunConfig, plan: DataPlan) -> int:
    """The vocabulary the run's tokenizer will have (data.vocab_size when it is still to be trained)."""
    if plan.tokenizer is not None:
        return Tokenizer.load(plan.tokenizer).vocab_size
    if plan.tokenizer_path.is_file():
        return Tokenizer.load(plan.tokenizer_path).vocab_size
    return cfg.data.vocab_size


def prepare_data_on_rank0(cfg: RunConfig, plan: DataPlan, rank: int) -> None:
    """Rank 0 builds the default corpus (tokenizer + shards) unless it is already there; then all meet."""
    import torch.distributed as dist

    if plan.build and rank == 0:
        # Seed 0 (the tools' default), not the training seed: runs that differ only in --seed share data.
        prepare_data(plan.prefix, tokenizer_path=plan.tokenizer, vocab_size=cfg.data.vocab_size, seed=0,
                     reuse=True)
    if dist.is_initialized():
        dist.barrier()


@dataclass
class RunData:
    tokenizer: Tokenizer
    train: PackedSequenceDataset
    valid: PackedSequenceDataset
    sampler: DistributedBatchSampler

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return build_batch_iterator(self.train, self.sampler)


def open_data(cfg: RunConfig, plan: DataPlan, layout: Layout) -> RunData:
    tokenizer = Tokenizer.load(plan.tokenizer_path)
    shards = {split: TokenShard.open(plan.prefix, split) for split in ("train", "valid")}
    for shard in shards.values():
        if shard.tokenizer_sha256 != tokenizer.sha256:
            raise ValueError(f"token shard {shard.bin_path} was written with another tokenizer than "
                             f"{tokenizer.path} (sha256 {shard.tokenizer_sha256[:12]} != {tokenizer.sha256[:12]})")
    train = PackedSequenceDataset(shards["train"], cfg.data.seq_len)
    valid = PackedSequenceDataset(shards["valid"], cfg.data.seq_len)
    sampler = DistributedBatchSampler(len(train), cfg.train.micro_batch_size, layout.dp_rank, layout.dp_size,
                                      seed=cfg.train.seed)
    return RunData(tokenizer, train, valid, sampler)


def eval_batches(valid: PackedSequenceDataset, micro_batch_size: int, num_batches: int, dp_rank: int,
                 dp_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out batches of this DP rank: the first `num_batches` of a fresh sampler on `valid`.

    Every evaluation of a run (and a test recomputing it) sees the same samples; all DP ranks together
    see the first num_batches x micro_batch_size x dp_size samples of the seeded validation order.
    """
    sampler = DistributedBatchSampler(len(valid), micro_batch_size, dp_rank, dp_size, seed=seed)
    return [valid.get_batch(sampler.next_batch()) for _ in range(num_batches)]
