"""One target rank's widened shard, and a whole checkpoint widened offline, shard by shard.

Every target rank builds its own slice from the small slice it needs (docs/design.md, "Shard locality and
layout invariance"), so no process ever holds a whole widened model: the same code serves a training launch
(each rank calls `build_clone_shard` with its own ranks) and the offline converter (`clone_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megaclone.clone.plan import clone_factors, widen_model_config
from megaclone.clone.rules import Reader, clone_tensor
from megaclone.config import CloneConfig, ConfigError, ModelConfig, ParallelConfig
from megaclone.spec import build_param_specs, spec_table, stages_of


def check_target_layout(wide_cfg: ModelConfig, n: int, m: int, tp_size: int, pp_size: int) -> None:
    """The target TP x PP must fit the WIDENED model; say so, since the numbers are the clone's, not the user's."""
    try:
        ParallelConfig(tp_size=tp_size, pp_size=pp_size).validate(wide_cfg)
    except ConfigError as e:
        raise ConfigError(f"target layout tp_size={tp_size}, pp_size={pp_size} does not fit the x{n} (ffn x{m}) "
                          f"clone: {e}") from e


def build_clone_shard(read: Reader, small_cfg: ModelConfig, clone_cfg: CloneConfig, tp_rank: int, tp_size: int,
                      pp_rank: int = 0, pp_size: int = 1) -> dict[str, torch.Tensor]:
    """Global name -> this target rank's TP slice of every widened parameter on its pipeline stage.

    `read(name, index)` returns a slice of the small model's global tensor (a ShardReader's `read`,
    or a dict lookup in tests). The tied embedding is on the first and the last stage.
    """
    n, m = clone_factors(clone_cfg)
    wide_cfg = widen_model_config(small_cfg, n, m)
    check_target_layout(wide_cfg, n, m, tp_size, pp_size)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"tp_rank={tp_rank}, pp_rank={pp_rank} outside tp_size={tp_size}, pp_size={pp_size}")
    return {spec.name: clone_tensor(spec, small_cfg, clone_cfg, read, spec.tp_slices(tp_rank, tp_size))
            for spec in build_param_specs(wide_cfg) if pp_rank in stages_of(spec, wide_cfg, pp_size)}


def clone_checkpoint(small_path: str | Path, out_root: str | Path, clone_cfg: CloneConfig, tp_size: int,
                     pp_size: int, step: int = 0) -> Path:
    """Widen the checkpoint at `small_path` (any layout) into a weight-only checkpoint at TP x PP.

    Each output shard is built from the small slices it needs (read lazily through ShardReader);
    the tokenizer and the data position are carried over, the clone settings and the source are
    recorded in the manifest's provenance. Returns the new step directory.
    """
    from megaclone.checkpoint import ShardReader, write_weights_checkpoint

    n, m = clone_factors(clone_cfg)
    with ShardReader(small_path) as reader:
        small_cfg = reader.config
        wide_cfg = widen_model_config(small_cfg, n, m)
        check_target_layout(wide_cfg, n, m, tp_size, pp_size)
        reader.verify()
        wide_specs = spec_table(wide_cfg)
        source = reader.manifest
        provenance = {"hyperclone": {
            "source": str(reader.path.resolve()), "source_step": source.step, "source_layout": dict(source.layout),
            "source_model": dataclasses.asdict(small_cfg), "factor": n, "ffn_factor": m,
            "variant": clone_cfg.variant, "noise_db": clone_cfg.noise_db, "seed": clone_cfg.seed}}
        tokenizer = reader.path / source.tokenizer if source.tokenizer else None

        def widened(name: str, index: tuple[slice, ...]) -> torch.Tensor:
            return clone_tensor(wide_specs[name], small_cfg, clone_cfg, reader.read, index)

        return write_weights_checkpoint(out_root, wide_cfg, widened, tp_size, pp_size, step=step,
                                        provenance=provenance, tokenizer=tokenizer, data=dict(source.data))
