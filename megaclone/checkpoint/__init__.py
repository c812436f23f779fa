"""Checkpoints: a manifest, per-rank safetensors weight shards, and DeepSpeed's own state beside them.

See `manifest` (what a checkpoint holds), `shards` (weight files and slice-wise reading), `io`
(atomic write / commit / prune) and `load` (the full model in one process).
"""

from megaclone.checkpoint.io import begin_checkpoint, commit_checkpoint, prune_checkpoints, write_weights_checkpoint
from megaclone.checkpoint.load import load_full_state, load_model
from megaclone.checkpoint.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST_NAME,
    MANIFEST_NAME,
    CheckpointError,
    CheckpointNotFoundError,
    Manifest,
    make_manifest,
    read_manifest,
    resolve_checkpoint,
    step_dir_name,
    write_manifest,
)
from megaclone.checkpoint.shards import (
    ShardReader,
    file_digest,
    local_weight_shard,
    save_weight_shard,
    storage_stage,
    weight_file,
    weight_file_digests,
)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "LATEST_NAME", "MANIFEST_NAME", "CheckpointError",
           "CheckpointNotFoundError", "Manifest", "ShardReader", "begin_checkpoint", "commit_checkpoint",
           "file_digest", "load_full_state", "load_model", "local_weight_shard", "make_manifest",
           "prune_checkpoints", "read_manifest", "resolve_checkpoint", "save_weight_shard", "step_dir_name",
           "storage_stage", "weight_file", "weight_file_digests", "write_manifest", "write_weights_checkpoint"]
