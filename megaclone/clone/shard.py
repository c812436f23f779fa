"""One target rank's widened shard, and a whole checkpoint widened offline, shard by shard.

Every target rank builds its own slice from the small slice it needs (docs/design.md, "Shard locality and
layout invariance"), so no process ever holds a whole widened model: the same code serves a training launch
(each rank calls `build_clone_shard` with its own ranks) and the offline converter (`clone_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from megaclone.checkpoint import ShardReader, write_weights_checkpoint
from megaclone.clone.depth import depth_plan
from megaclone.clone.plan import clone_factors, groups_factor, grown_model_config
from megaclone.clone.rules import Reader, clone_tensor
from megaclone.config import CloneConfig, ConfigError, ModelConfig, ParallelConfig
from megaclone.spec import build_param_specs, spec_table, stages_of


def describe_growth(small_cfg: ModelConfig, clone_cfg: CloneConfig) -> str:
    """'x2 (ffn x2, groups x2), 4 -> 8 layers by zero': the growth in the words of the flags."""
    n, m = clone_factors(clone_cfg)
    depth = depth_plan(small_cfg, clone_cfg)
    grown = f", {small_cfg.num_layers} -> {depth.num_layers} layers by {depth.method}" if depth.grown else ""
    return f"x{n} (ffn x{m}, groups x{groups_factor(clone_cfg)}){grown}"


def growth_record(source: Path, step: int, layout: dict, small_cfg: ModelConfig, clone_cfg: CloneConfig) -> dict:
    """The manifest's provenance of a grown checkpoint ("hyperclone"), the same from the launcher and the converter."""
    n, m = clone_factors(clone_cfg)
    depth = depth_plan(small_cfg, clone_cfg)
    return {"source": str(Path(source).resolve()), "source_step": step, "source_layout": dict(layout),
            "source_model": dataclasses.asdict(small_cfg), "factor": n, "ffn_factor": m,
            "groups_factor": groups_factor(clone_cfg), "variant": clone_cfg.variant, "noise_db": clone_cfg.noise_db,
            "seed": clone_cfg.seed, "grow_layers": depth.num_layers if depth.grown else 0,
            "grow_method": clone_cfg.grow_method, **({"depth": depth.to_dict()} if depth.grown else {})}


def check_target_layout(small_cfg: ModelConfig, clone_cfg: CloneConfig, tp_size: int, pp_size: int) -> ModelConfig:
    """The target TP x PP must fit the GROWN model; say so, since the numbers are the clone's, not the user's.
    Returns the grown model's config."""
    grown = grown_model_config(small_cfg, clone_cfg)
    try:
        ParallelConfig(tp_size=tp_size, pp_size=pp_size).validate(grown)
    except ConfigError as e:
        raise ConfigError(f"target layout tp_size={tp_size}, pp_size={pp_size} does not fit the "
                          f"{describe_growth(small_cfg, clone_cfg)} clone: {e}") from e
    return grown


def row_share(rows: int, part: int, num_parts: int) -> tuple[int, int]:
    """Rows [start, stop) of part `part` when `rows` rows are split into `num_parts` near-equal contiguous parts."""
    return part * rows // num_parts, (part + 1) * rows // num_parts


def build_clone_shard(read: Reader, small_cfg: ModelConfig, clone_cfg: CloneConfig, tp_rank: int, tp_size: int,
                      pp_rank: int = 0, pp_size: int = 1, share: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """Global name -> this target rank's TP slice of every widened parameter on its pipeline stage.

    `read(name, index)` returns a slice of the small model's global tensor (a ShardReader's `read`,
    or a dict lookup in tests). The tied embedding is on the first and the last stage. Under depth growth a
    target stage reads the source blocks it copies, wherever they were stored. `share=(k, K)` computes only
    part k of K of every slice's rows (`row_share`): the K data-parallel replicas of one rank each build a part
    and exchange them. Values never depend on the slicing, so the parts put together are the whole slice bit
    for bit.
    """
    wide_cfg = check_target_layout(small_cfg, clone_cfg, tp_size, pp_size)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"tp_rank={tp_rank}, pp_rank={pp_rank} outside tp_size={tp_size}, pp_size={pp_size}")
    part, num_parts = share
    if not 0 <= part < num_parts:
        raise ValueError(f"share={share}: expected (part, number of parts) with 0 <= part < number of parts")
    out = {}
    for spec in build_param_specs(wide_cfg):
        if pp_rank not in stages_of(spec, wide_cfg, pp_size):
            continue
        rows, *rest = spec.tp_slices(tp_rank, tp_size)
        first, last, _ = rows.indices(spec.shape[0])
        start, stop = row_share(last - first, part, num_parts)
        index = (slice(first + start, first + stop), *rest)
        out[spec.name] = clone_tensor(spec, small_cfg, clone_cfg, read, index)
    return out


def clone_checkpoint(small_path: str | Path, out_root: str | Path, clone_cfg: CloneConfig, tp_size: int,
                     pp_size: int, step: int = 0) -> Path:
    """Widen the checkpoint at `small_path` (any layout) into a weight-only checkpoint at TP x PP.

    Each output shard is built from the small slices it needs (read lazily through ShardReader);
    the tokenizer and the data position are carried over, the clone settings and the source are
    recorded in the manifest's provenance. Returns the new step directory.
    """
    clone_factors(clone_cfg)
    with ShardReader(small_path) as reader:
        small_cfg = reader.config
        wide_cfg = check_target_layout(small_cfg, clone_cfg, tp_size, pp_size)
        reader.verify()
        wide_specs = spec_table(wide_cfg)
        source = reader.manifest
        provenance = {"hyperclone": growth_record(reader.path, source.step, source.layout, small_cfg, clone_cfg)}
        tokenizer = reader.path / source.tokenizer if source.tokenizer else None

        def widened(name: str, index: tuple[slice, ...]) -> torch.Tensor:
            return clone_tensor(wide_specs[name], small_cfg, clone_cfg, reader.read, index)

        return write_weights_checkpoint(out_root, wide_cfg, widened, tp_size, pp_size, step=step,
                                        provenance=provenance, tokenizer=tokenizer, data=dict(source.data))
