"""Functions that run on spawned gloo ranks: importable without transformers."""

from __future__ import annotations

import torch

from megaclone.checkpoint import ShardReader
from megaclone.config import ParallelConfig
from megaclone.model import GPT
from megaclone.parallel import build_layout


def tp_logits(rank: int, world: int, step_dirs: list[str], tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of the TP GPT (this rank's shard of each checkpoint, gathered over the vocabulary)."""
    layout = build_layout(ParallelConfig(tp_size=world))
    out = []
    for step_dir in step_dirs:
        with ShardReader(step_dir) as reader:
            cfg = reader.config
            model = GPT(cfg, layout.tp).eval()
            params = dict(model.named_parameters())
            shards = {name: reader.read_shard(name, layout.tp_rank, layout.tp_size) for name in params}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(shards[name])
        with torch.no_grad():
            out.append(model(tokens))
    return out
