"""The whole model in one CPU process, from a checkpoint of any layout.

For evaluation, sampling and tests: the shards are stitched back into full fp32 tensors with
`ShardReader` (safetensors only, nothing is unpickled) and loaded into the plain `ReferenceGPT`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megaclone.checkpoint.manifest import CheckpointError
from megaclone.checkpoint.shards import ShardReader
from megaclone.config import ModelConfig
from megaclone.model.reference import ReferenceGPT


def load_full_state(path: str | Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Global name -> full fp32 tensor, in spec-table order; checksums are checked first when `verify`."""
    with ShardReader(path) as reader:
        if verify:
            reader.verify()
        return {name: reader.read(name) for name in reader.specs}


def load_model(path: str | Path, verify: bool = True) -> tuple[ReferenceGPT, ModelConfig]:
    """A `ReferenceGPT` in eval mode holding the checkpoint's weights, and its model config."""
    with ShardReader(path) as reader:
        if verify:
            reader.verify()
        cfg = reader.config
        with torch.device("meta"):  # skip the default init: every parameter is assigned below
            model = ReferenceGPT(cfg)
        names = [n for n, _ in model.named_parameters()]
        missing = sorted(set(names) - set(reader.specs))
        if missing:
            raise CheckpointError(f"checkpoint {reader.path} lacks parameters {missing[:5]} of the model")
        state = {name: reader.read(name) for name in names}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), cfg
