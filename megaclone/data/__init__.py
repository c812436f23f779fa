"""Data pipeline: text corpus -> sentencepiece tokenizer -> packed token shards -> deterministic GPT batches."""

from megaclone.data.corpus import default_corpus_files, iter_documents
from megaclone.data.sampler import DistributedBatchSampler, PackedSequenceDataset, build_batch_iterator
from megaclone.data.shards import TokenShard, prepare_data, shard_paths, split_documents, write_token_shards
from megaclone.data.tokenizer import Tokenizer, file_sha256, train_tokenizer

__all__ = [
    "DistributedBatchSampler",
    "PackedSequenceDataset",
    "TokenShard",
    "Tokenizer",
    "build_batch_iterator",
    "default_corpus_files",
    "file_sha256",
    "iter_documents",
    "prepare_data",
    "shard_paths",
    "split_documents",
    "train_tokenizer",
    "write_token_shards",
]
