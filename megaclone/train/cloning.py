"""HyperCloning at launch: each rank builds only its own widened (and deepened) slice, the engine starts from it,
and the run checks function preservation before training (or, for a growth that does not preserve it, measures
the loss change), then watches the copies drift apart and the inserted blocks come alive while it trains.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaclone.checkpoint import Manifest, ShardReader, load_model, resolve_checkpoint
from megaclone.clone import (
    DepthPlan,
    build_clone_shard,
    clone_factors,
    copy_similarity,
    depth_plan,
    describe_growth,
    groups_factor,
    grown_model_config,
    growth_record,
    row_share,
)
from megaclone.config import CloneConfig, ModelConfig, ParallelConfig
from megaclone.model import block_modules, global_named_parameters
from megaclone.parallel import Layout, gather_from_tp_region
from megaclone.spec import spec_table
from megaclone.train.carry import source_lr
from megaclone.train.engine import fp32_masters, is_pipeline, set_fp32_masters

log = logging.getLogger("megaclone.train")

PRESERVATION_TOLERANCE = 1e-4  # max |wide - small| / max |small| logits, fp32
PRESERVATION_BATCH = (2, 64)  # at most this many sequences x tokens of the first held-out batch
MONITOR_ROLES = ("qkv", "mlp_in", "mlp_gate_up")


@dataclass
class CloneSource:
    path: Path  # the small checkpoint's step directory
    manifest: Manifest
    wide: ModelConfig
    clone: CloneConfig

    @property
    def tokenizer(self) -> Path | None:
        return self.path / self.manifest.tokenizer if self.manifest.tokenizer else None

    @property
    def factors(self) -> tuple[int, int]:
        return clone_factors(self.clone)

    @property
    def depth(self) -> DepthPlan:
        return depth_plan(self.manifest.model, self.clone)

    def describe(self) -> str:
        return describe_growth(self.manifest.model, self.clone)

    def provenance(self) -> dict[str, Any]:
        record = growth_record(self.path, self.manifest.step, self.manifest.layout, self.manifest.model, self.clone)
        return {"hyperclone": {
            **record, "optimizer": self.clone.optimizer, "lr_transition": self.clone.lr_transition,
            "data": "continue" if self.clone.continues_data else "restart",
            **({"schedule": "restart", "source_lr": source_lr(self.manifest, self.path)}
               if self.clone.schedule == "restart" else {})}}


def continue_data_position(sampler: Any, manifest: Manifest) -> None:
    """Read on from the small run's position in the sample stream, so the wide run sees data the small one has
    not. A different corpus, seed or no recorded position: a warning, and the wide run reads its own order."""
    if not manifest.data:
        log.warning("the small checkpoint records no data position; the wide run reads the corpus from its start")
        return
    try:
        sampler.load_state_dict(manifest.data)
    except ValueError as e:
        log.warning(f"data position of {manifest.step} steps not carried ({e}); the wide run reads its own order")
        return
    log.info(f"data: continuing after the small run's {sampler.consumed_samples} samples")


def plan_clone(clone: CloneConfig, parallel: ParallelConfig, world_size: int) -> CloneSource:
    """Validate everything a cloned launch needs before any work: factors, the source checkpoint (manifest,
    checksums of its weight files) and the target layout for the widened model."""
    clone_factors(clone)
    path = resolve_checkpoint(clone.init_from)
    with ShardReader(path) as reader:
        reader.verify()  # a corrupted or truncated source fails here, with nothing written
        manifest = reader.manifest
    wide = grown_model_config(manifest.model, clone)
    try:
        parallel.validate(wide, world_size)
    except ValueError as e:
        raise type(e)(f"after growing {path} {describe_growth(manifest.model, clone)}: {e}") from e
    return CloneSource(path, manifest, wide, clone)


def build_rank_clone(source: CloneSource, layout: Layout) -> dict[str, torch.Tensor]:
    """This rank's widened fp32 slices (global name -> TP slice), read from the small slices it needs only.

    The DP replicas of a (TP, PP) position need the same slices: each computes 1/dp of every slice's rows and
    they exchange the parts (collective over the DP group), so the widening costs each rank 1/dp of the work.
    """
    with ShardReader(source.path) as reader:
        part = build_clone_shard(reader.read, source.manifest.model, source.clone, layout.tp_rank, layout.tp_size,
                                 layout.pp_rank, layout.pp_size, share=(layout.dp_rank, layout.dp_size))
    if layout.dp_size == 1:
        return part
    specs = spec_table(source.wide)
    return exchange_row_shares(part, {name: specs[name].tp_shape(layout.tp_size) for name in part}, layout)


def exchange_row_shares(part: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                        layout: Layout) -> dict[str, torch.Tensor]:
    """The whole slices (of `shapes`) from each DP replica's rows (`row_share` of its DP rank): every part is
    broadcast by the replica that computed it, in name order; bytes arrive unchanged, so all replicas hold the
    same bits."""
    sources = [layout.global_rank(layout.tp_rank, layout.pp_rank, k) for k in range(layout.dp_size)]
    nccl = dist.get_backend(layout.dp_group) == "nccl"
    whole, pending = {}, []
    for name in sorted(part):
        mine, rows = part[name], shapes[name][0]
        full = torch.empty(shapes[name], dtype=mine.dtype, device="cuda" if nccl else "cpu")
        for k, src in enumerate(sources):
            start, stop = row_share(rows, k, layout.dp_size)
            if stop == start:
                continue
            block = full[start:stop]
            if k == layout.dp_rank:
                block.copy_(mine)
            pending.append(dist.broadcast(block, src=src, group=layout.dp_group, async_op=True))
        whole[name] = full
    for work in pending:
        work.wait()
    return {name: tensor.cpu() for name, tensor in whole.items()}


def inject_fp32_masters(engine: Any, module: nn.Module, cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Make the engine's fp32 masters exactly the widened fp32 weights (bf16 training), and check it."""
    params = global_named_parameters(module, cfg)
    set_fp32_masters(engine, params, tensors)
    masters = fp32_masters(engine, params)  # collective: every rank checks every one of its parameters
    mismatched = [name for name in params if not torch.equal(masters[name], tensors[name].cpu())]
    if mismatched:
        raise RuntimeError(f"fp32 masters differ from the widened weights after injection: {mismatched[:5]}")


@torch.no_grad()
def wide_logits(engine: Any, layout: Layout, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Full logits [b, s, vocab] of the engine's model on one batch (None on ranks that do not hold them)."""
    if is_pipeline(engine):
        _, local = engine.eval_batch(iter([(tokens, labels)]), return_logits=True, num_micro_batches=1)
        if not layout.is_last_stage:
            return None
        return gather_from_tp_region(local.float(), layout.tp)  # [b, s, padded vocab]
    engine.eval()
    logits = engine(tokens).float()
    engine.train()
    return logits


def check_preservation(engine: Any, layout: Layout, source: CloneSource, batch: tuple[torch.Tensor, torch.Tensor],
                       precision: str) -> dict[str, float]:
    """The wide model (as the engine holds it) against the small checkpoint on a small fixed batch: the first
    PRESERVATION_BATCH sequences x tokens of one held-out batch.

    One rank (last stage, TP and DP rank 0) loads the small model (it is small) and compares; every rank
    gets the numbers and raises when the relative logit error exceeds PRESERVATION_TOLERANCE in fp32 for a
    function-preserving growth. For depth growth by stack or interleave the numbers are the measurement:
    the loss change on this batch at step 0.
    """
    rows, length = PRESERVATION_BATCH
    tokens, labels = (t[:rows, :length].contiguous() for t in batch)
    wide = wide_logits(engine, layout, tokens, labels)  # collective: every rank takes part
    if is_pipeline(engine):  # its buffers now have this batch's shape; training's batches are larger
        engine.reset_activation_shape()
    holder = layout.global_rank(0, layout.pp_size - 1, 0)
    stats = torch.zeros(4, dtype=torch.float64)  # rel error, max abs diff, wide loss, small loss
    if layout.rank == holder:
        wide = wide[..., : source.wide.vocab_size].cpu()
        small_model, _ = load_model(source.path, verify=False)
        small = small_model(tokens.cpu()).float()
        diff = (wide - small).abs().max().item()
        stats[0] = diff / max(small.abs().max().item(), 1e-30)
        stats[1] = diff
        stats[2] = F.cross_entropy(wide.flatten(0, 1), labels.cpu().flatten()).item()
        stats[3] = F.cross_entropy(small.flatten(0, 1), labels.cpu().flatten()).item()
    if dist.is_initialized() and layout.world_size > 1:
        stats = stats.cuda() if dist.get_backend() == "nccl" else stats
        dist.broadcast(stats, src=holder)
        stats = stats.cpu()
    result = {"preservation_rel_error": float(stats[0]), "preservation_max_abs_diff": float(stats[1]),
              "wide_loss": float(stats[2]), "small_loss": float(stats[3])}
    result["loss_change"] = result["wide_loss"] - result["small_loss"]
    checked = source.depth.preserving and precision == "fp32"
    if checked and not result["preservation_rel_error"] <= PRESERVATION_TOLERANCE:
        raise RuntimeError(
            f"HyperCloning did not preserve the function of {source.path}: max |logit difference| / max |logit| = "
            f"{result['preservation_rel_error']:.3e} > {PRESERVATION_TOLERANCE:g} (wide loss "
            f"{result['wide_loss']:.6f}, small loss {result['small_loss']:.6f})")
    return result


def symmetry_monitor(engine: Any, module: nn.Module, layout: Layout,
                     source: CloneSource) -> Callable[[], dict[str, float]]:
    """A callable giving the mean (and min) copy similarity of every block's qkv and MLP-in weight.

    Reads fp32 masters, so under ZeRO every DP rank must call it (they do: it runs at evaluation).
    """
    cfg = source.wide
    n, m = source.factors
    g = groups_factor(source.clone)
    specs = spec_table(cfg)
    watched = {name: p for name, p in global_named_parameters(module, cfg).items()
               if specs[name].role in MONITOR_ROLES and not specs[name].is_bias}

    def monitor() -> dict[str, float]:
        sims = []
        for name, value in fp32_masters(engine, watched).items():
            sim = copy_similarity(value, specs[name], n, m, layout.tp_rank, layout.tp_size, g=g)
            if not math.isnan(sim):
                sims.append(sim)
        device = "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
        total = torch.tensor([sum(sims), float(len(sims))], dtype=torch.float64, device=device)
        low = torch.tensor([min(sims, default=math.inf)], dtype=torch.float64, device=device)
        if layout.world_size > 1:  # blocks and TP slices are spread over TP x PP; DP replicas agree
            dist.all_reduce(total, group=layout.model_group)
            dist.all_reduce(low, op=dist.ReduceOp.MIN, group=layout.model_group)
        if total[1] == 0:
            return {}
        return {"clone_similarity": float(total[0] / total[1]), "clone_similarity_min": float(low[0])}

    return monitor


def describe_preservation(source: CloneSource, stats: dict[str, float]) -> str:
    """The log line of the step-0 check: the growth, and its preservation error or its measured loss change."""
    head = f"hyperclone {source.describe()}"
    if source.depth.preserving:
        return f"{head}: " + " ".join(f"{k}={v:.6g}" for k, v in stats.items())
    return (f"{head}: not function-preserving ({source.depth.method}); loss on a fixed held-out batch at step 0: "
            f"{stats['small_loss']:.6f} -> {stats['wide_loss']:.6f} ({stats['loss_change']:+.6f})")


def depth_monitor(module: nn.Module, layout: Layout, source: CloneSource) -> Callable[[], dict[str, float]]:
    """A callable giving, per inserted block, the RMS of its residual contribution (block output minus input)
    relative to the RMS of the residual stream entering it, over the evaluation batches since its last call:
    0 for a fresh `zero` block, rising as its output projections learn.

    Forward hooks on this rank's inserted blocks add up the two sums of squares in evaluation mode only. The
    monitor sums them over all ranks (a block lives on one stage, TP ranks see the same activations and DP
    ranks other batches), so every rank must call it; it does, at evaluation.
    """
    inserted = [i for i, new in enumerate(source.depth.inserted) if new]
    slot = {block: k for k, block in enumerate(inserted)}
    sums = torch.zeros(2 * len(inserted), dtype=torch.float64)  # [contribution^2, stream^2] per inserted block

    def hook(block: int, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if mod.training:
            return
        x = args[0].detach().double()
        sums[2 * slot[block]] += (out.detach().double() - x).pow(2).sum().item()
        sums[2 * slot[block] + 1] += x.pow(2).sum().item()

    for block, mod in block_modules(module).items():
        if block in slot:
            mod.register_forward_hook(functools.partial(hook, block))

    def monitor() -> dict[str, float]:
        total = sums.clone()
        sums.zero_()
        if dist.is_initialized() and layout.world_size > 1:
            total = total.cuda() if dist.get_backend() == "nccl" else total
            dist.all_reduce(total)
            total = total.cpu()
        return {f"depth_contribution_block{block}": math.sqrt(float(total[2 * k] / total[2 * k + 1]))
                for k, block in enumerate(inserted) if total[2 * k + 1] > 0}

    return monitor


def has_symmetry_breaking(cfg: ModelConfig, clone: CloneConfig) -> bool:
    return clone.noise_db is not None or cfg.dropout > 0 or cfg.attention_dropout > 0

