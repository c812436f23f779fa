"""Optimizer state in and out of a DeepSpeed engine as layout-free tensors: masters, Adam moments, step, schedule.

DeepSpeed keeps Adam's state in different places per configuration: on the parameters themselves (ZeRO-0,
fp32), in flat fp32 copies of whole groups (ZeRO-0 with bf16: the FP16 optimizers), or in flat fp32
partitions split across data-parallel ranks (ZeRO-1/2, the bf16 optimizer, ZeRO-3). `export_moments`
returns each parameter's full TP-local moments whatever the case (collective over DP), and
`import_training_state` writes them back into a fresh engine of any layout. That is what lets a
checkpoint resume at another TP/PP/DP size or ZeRO stage (elastic resume) and what a converted
checkpoint (tools/reshard_expand.py --optimizer carry) resumes through. A `--hyperclone-optimizer carry`
launch goes the same way with the small checkpoint's moments widened (`start_carried_run`: the carry
engine of megaclone.train.carry, then `carry_optimizer_state`).

torch's Adam creates its state lazily at the first step, and ZeRO links its per-parameter views of that
state only after it; a fresh engine therefore gets its state created here (zeros, the saved step count)
and linked before the saved values are copied in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaclone import cluster
from megaclone.checkpoint import (
    CheckpointError,
    Manifest,
    ShardReader,
    read_manifest,
    resolve_checkpoint,
    storage_stage,
)
from megaclone.checkpoint.optim_state import (
    MOMENT_KEYS,
    OptimStateReader,
    make_optimizer_record,
    optim_file,
    optim_file_digests,
    save_optim_shard,
)
from megaclone.clone import clone_moment
from megaclone.config import ModelConfig, RunConfig
from megaclone.data import DistributedBatchSampler
from megaclone.model import global_named_parameters
from megaclone.parallel import Layout, TPRNGTracker
from megaclone.spec import spec_table
from megaclone.train.carry import CarrySchedule, CarrySettings, build_carry_engine, describe_carry, source_lr
from megaclone.train.cloning import CloneSource, continue_data_position, inject_fp32_masters
from megaclone.train.engine import build_engine, build_model, set_fp32_masters

log = logging.getLogger("megaclone.train")

# Where each DeepSpeed optimizer wrapper keeps the fp32 tensors its base optimizer steps (checked in order).
_HP_ATTRS = ("single_partition_of_fp32_groups",  # ZeRO-1/2: this DP rank's flat partition per group
             "fp32_groups_flat_partition",  # the bf16 optimizer: likewise
             "fp32_partitioned_groups_flat",  # ZeRO-3: per sub-group
             "fp32_groups_flat")  # FP16_Optimizer (bf16 at ZeRO-0): the whole group, flat


def _hp_tensors(optimizer: Any) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """(the torch optimizer that runs Adam, the fp32 tensors it steps, which key its `state`)."""
    for attr in _HP_ATTRS:
        if hasattr(optimizer, attr):
            return optimizer.optimizer, list(getattr(optimizer, attr))
    if hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer: one fp32 copy per parameter
        return optimizer.optimizer, [t for group in optimizer.fp32_groups for t in group]
    if isinstance(optimizer, torch.optim.Optimizer):  # ZeRO-0 in fp32: DeepSpeed steps ours directly
        return optimizer, [p for group in optimizer.param_groups for p in group["params"]]
    raise TypeError(f"unsupported DeepSpeed optimizer {type(optimizer).__name__}: cannot locate its Adam state")


def _flat_offsets(optimizer: Any) -> dict[int, tuple[torch.Tensor, int]]:
    """id(param) -> (flat fp32 group tensor, offset) under FP16_Optimizer; empty for every other wrapper."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    out: dict[int, tuple[torch.Tensor, int]] = {}
    if isinstance(optimizer, FP16_Optimizer):
        for group, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            offset = 0
            for p in group:
                out[id(p)] = (flat, offset)
                offset += p.numel()
    return out


def _local_state(engine: Any, param: nn.Parameter) -> dict[str, torch.Tensor] | None:
    """Adam's state tensor views for `param` when this rank holds all of it (no DP partitioning), else None."""
    optimizer = engine.optimizer
    base, _ = _hp_tensors(optimizer)
    flat = _flat_offsets(optimizer).get(id(param))
    if flat is not None:
        tensor, offset = flat
        return {k: base.state[tensor][k][offset: offset + param.numel()].view_as(param) for k in MOMENT_KEYS}
    if hasattr(optimizer, "fp32_groups") and not any(hasattr(optimizer, a) for a in _HP_ATTRS):
        for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for p, master in zip(group, masters):
                if p is param:
                    return {k: base.state[master][k] for k in MOMENT_KEYS}
    if base is optimizer:
        return {k: base.state[param][k] for k in MOMENT_KEYS}
    return None


def optimizer_initialized(engine: Any) -> bool:
    """Whether Adam has state yet (it has none before the first step)."""
    base, hp = _hp_tensors(engine.optimizer)
    return any(base.state.get(t) for t in hp)


def adam_step(engine: Any) -> int:
    """Adam's step count (0 before the first step); the same on every rank."""
    base, hp = _hp_tensors(engine.optimizer)
    for t in hp:
        state = base.state.get(t)
        if state and "step" in state:
            return int(float(state["step"]))
    return 0


def export_moments(engine: Any, params: dict[str, nn.Parameter]) -> dict[str, dict[str, torch.Tensor]]:
    """{name: {exp_avg, exp_avg_sq}}: CPU fp32 copies of each parameter's full TP-local Adam moments.

    Collective over the DP group under ZeRO and the bf16 optimizer: every rank of the group calls it with
    the same parameters in the same order. Zeros before the first step (a fresh Adam is exactly that).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    ready = optimizer_initialized(engine)
    if ready:
        _link_state_views(engine)
    out = {}
    for name, param in params.items():
        if not ready:
            out[name] = {k: torch.zeros(param.shape, dtype=torch.float32) for k in MOMENT_KEYS}
            continue
        local = _local_state(engine, param)
        state = {}
        for key in MOMENT_KEYS:
            value = local[key] if local is not None else safe_get_full_optimizer_state(param, key)
            if value is None:
                raise CheckpointError(f"parameter {name}: DeepSpeed's {type(engine.optimizer).__name__} holds no "
                                      f"'{key}' for it")
            state[key] = value.detach().float().cpu().clone().reshape(param.shape)
        out[name] = state
    return out


def scheduler_state(engine: Any) -> dict[str, Any]:
    """The LR scheduler's position as JSON (the schedule itself is rebuilt from the config)."""
    sched = engine.lr_scheduler
    state = {"last_epoch": int(sched.last_epoch), "step_count": int(getattr(sched, "_step_count", 0)),
             "last_lr": [float(x) for x in sched.get_last_lr()]}
    if isinstance(sched, CarrySchedule):  # where the transition counts from, for a resume at another layout
        state["clone_step"] = int(sched.clone_step)
    return state


def _create_adam_state(engine: Any, step: int) -> None:
    """Give every fp32 tensor Adam steps a state (zero moments, `step`) and link ZeRO's per-parameter views."""
    base, hp = _hp_tensors(engine.optimizer)
    fused = any(g.get("fused") or g.get("capturable") for g in base.param_groups)
    for t in hp:
        step_t = torch.tensor(float(step), dtype=torch.float32, device=t.device if fused else "cpu")
        base.state[t] = {"step": step_t, "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format)}
    _link_state_views(engine)


def _link_state_views(engine: Any) -> None:
    """(Re)build ZeRO-1/2's and the bf16 optimizer's per-parameter views of Adam's state.

    DeepSpeed links them once, right after stepping the first parameter group, when the other groups have
    no state yet: their parameters then have no `exp_avg` view (seen with DeepSpeed 0.19.8, two AdamW groups).
    """
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def set_moments(engine: Any, params: dict[str, nn.Parameter], moments: dict[str, dict[str, torch.Tensor]],
                step: int) -> None:
    """Create Adam's state at `step` and fill each parameter's moments (full TP-local tensors) on this rank."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _create_adam_state(engine, step)
    for name, param in params.items():
        local = _local_state(engine, param)
        for key in MOMENT_KEYS:
            value = moments[name][key].to(param.device, torch.float32).reshape(param.shape)
            if local is not None:
                local[key].copy_(value)
            else:
                safe_set_full_optimizer_state(param, value, key)


def set_scheduler_position(engine: Any, state: dict[str, Any]) -> None:
    """Move the LR schedule to the saved position and give the optimizer the rate it would have there."""
    sched = engine.lr_scheduler
    last_epoch = int(state["last_epoch"])
    sched.last_epoch = last_epoch
    sched._step_count = int(state.get("step_count", last_epoch + 1))
    if isinstance(sched, CarrySchedule):  # every carry group's lr, eps, weight decay and clip weight, recomputed
        sched.start_at(last_epoch)  # (the groups per rank depend on the layout, so `last_lr` does not fit them)
        return
    if hasattr(sched, "lr_lambdas"):  # LambdaLR (ours): the same floats as the uninterrupted run
        lrs = [base_lr * fn(last_epoch) for fn, base_lr in zip(sched.lr_lambdas, sched.base_lrs)]
    else:
        lrs = list(state["last_lr"])
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def elastic_reason(manifest: Manifest, cfg: RunConfig, world_size: int) -> str | None:
    """Why resuming `manifest` needs the layout-free path (None: DeepSpeed's own exact resume, or weights only)."""
    if manifest.optimizer is None:
        return None
    if manifest.deepspeed is None:
        return "the checkpoint has weights and optimizer files but no DeepSpeed state (converted)"
    tp, pp = cfg.parallel.tp_size, cfg.parallel.pp_size
    want = {"tp_size": tp, "pp_size": pp, "dp_size": world_size // (tp * pp),
            "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision}
    diffs = [f"{k} {manifest.layout.get(k)!r} -> {v!r}" for k, v in want.items() if manifest.layout.get(k) != v]
    return "layout changed: " + ", ".join(diffs) if diffs else None


def load_weights_elastic(module: nn.Module, cfg: RunConfig, layout: Layout, path: Path) -> dict[str, torch.Tensor]:
    """Fill this rank's parameters from the checkpoint's weight files (any layout); returns the fp32 values."""
    specs = spec_table(cfg.model)
    values = {}
    with ShardReader(path) as reader:
        for name, param in global_named_parameters(module, cfg.model).items():
            value = reader.read(name, specs[name].tp_slices(layout.tp_rank, layout.tp_size))
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"parameter {name}: got shape {list(value.shape)} for this rank, the model "
                                      f"expects {list(param.shape)}")
            with torch.no_grad():
                param.copy_(value)
            values[name] = value
    return values


def import_training_state(path: str | Path, engine: Any, module: nn.Module, cfg: RunConfig, layout: Layout,
                          sampler: DistributedBatchSampler, masters: dict[str, torch.Tensor]) -> int:
    """Continue a run in a fresh engine of any layout: exact fp32 masters (`masters`, this rank's slices),
    Adam moments of this rank's TP slice, Adam's step, the LR schedule position, the data position.
    Returns the training step to continue after. The RNG streams restart from the seed (dropout only)."""
    step_dir = resolve_checkpoint(path)
    params = global_named_parameters(module, cfg.model)
    specs = spec_table(cfg.model)
    with OptimStateReader(step_dir) as reader:
        moments = {name: {key: reader.read_moment(name, key, specs[name].tp_slices(layout.tp_rank, layout.tp_size))
                          for key in MOMENT_KEYS} for name in params}
        adam, sched, manifest = reader.step, reader.scheduler, reader.manifest
    if cfg.train.precision != "fp32":  # DeepSpeed rounded the masters to bf16 when it built them
        set_fp32_masters(engine, params, masters)
    set_moments(engine, params, moments, adam)
    set_scheduler_position(engine, sched)
    if manifest.data:
        sampler.load_state_dict(manifest.data)
    engine.global_steps = manifest.step
    engine.global_samples = manifest.step * engine.train_batch_size()
    if cfg.model.dropout or cfg.model.attention_dropout:
        log.warning("elastic resume: dropout RNG streams restart from train.seed (they depend on the layout)")
    return manifest.step


def _stored_params(module: nn.Module, cfg: ModelConfig, layout: Layout) -> dict[str, nn.Parameter]:
    """This rank's parameters that its files store (the tied embedding's copy on the last stage is not)."""
    specs = spec_table(cfg)
    return {name: p for name, p in global_named_parameters(module, cfg).items()
            if storage_stage(specs[name], cfg, layout.pp_size) == layout.pp_rank}


def save_optimizer_shard(step_dir: Path, engine: Any, module: nn.Module, cfg: ModelConfig, layout: Layout,
                         write: bool) -> None:
    """Export this rank's Adam moments (collective over DP) and, where `write`, save its optim/ file."""
    moments = export_moments(engine, _stored_params(module, cfg, layout))
    if write:
        save_optim_shard(Path(step_dir) / optim_file(layout.tp_rank, layout.pp_rank), moments)


def optimizer_record(engine: Any, step_dir: Path, layout: Layout,
                     digests: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest's `optimizer` entry for a checkpoint being written (`digests`: already hashed files)."""
    if digests is None:
        files = optim_file_digests(step_dir, layout.tp_size, layout.pp_size)
    else:
        files = {optim_file(t, p): digests[optim_file(t, p)] for p in range(layout.pp_size)
                 for t in range(layout.tp_size)}
    return make_optimizer_record(adam_step(engine), scheduler_state(engine), files)


def resume_elastic(cfg: RunConfig, path: Path, layout: Layout, tracker: TPRNGTracker, device: torch.device,
                   sampler: DistributedBatchSampler, reason: str,
                   carry: CarrySettings | None = None) -> tuple[Any, nn.Module, int]:
    """Build this rank's model and engine from a checkpoint of any layout and continue its training state
    (`carry`: the checkpoint of a carry run, whose optimizer groups and schedule are rebuilt).
    Returns (engine, module, the step training continues after)."""
    cluster.check_same_checkpoint(path, read_manifest(path).step)  # node-local copies may disagree
    module = build_model(cfg, layout, tracker, init=False)
    masters = load_weights_elastic(module, cfg, layout, path)
    engine = build_engine(cfg, layout, module, device) if carry is None else \
        build_carry_engine(cfg, layout, module, device, carry)[0]
    step = import_training_state(path, engine, module, cfg, layout, sampler, masters)
    log.info(f"resumed from {path} at step {step} through the layout-free path ({reason}): fp32 masters, Adam "
             f"moments and step, LR schedule and data position carried; DeepSpeed's own state not used")
    return engine, module, step


@torch.no_grad()
def carry_optimizer_state(engine: Any, module: nn.Module, cfg: RunConfig, layout: Layout,
                          sampler: DistributedBatchSampler) -> int:
    """Widen the small checkpoint's Adam moments into this rank's slices and set them with its step count; continue
    its data position. Returns the training step the run continues after (the small checkpoint's)."""
    params = global_named_parameters(module, cfg.model)
    specs = spec_table(cfg.model)
    with OptimStateReader(resolve_checkpoint(cfg.clone.init_from)) as reader:
        small_cfg = reader.manifest.model
        moments = {}
        for name in params:
            index = specs[name].tp_slices(layout.tp_rank, layout.tp_size)
            moments[name] = {key: clone_moment(specs[name], small_cfg, cfg.clone,
                                               lambda n, i, key=key: reader.read_moment(n, key, i), index, key)
                             for key in MOMENT_KEYS}
        adam, manifest = reader.step, reader.manifest
    set_moments(engine, params, moments, adam)
    if cfg.clone.continues_data:
        continue_data_position(sampler, manifest)
    engine.global_steps = manifest.step
    engine.global_samples = manifest.step * engine.train_batch_size()
    return manifest.step


def start_carried_run(cfg: RunConfig, source: CloneSource, layout: Layout, module: nn.Module, device: torch.device,
                      sampler: DistributedBatchSampler, clone_tensors: dict[str, torch.Tensor]) -> tuple[Any, int]:
    """The engine of a carry launch (the module holds the widened weights): exact fp32 masters, the widened
    moments and the small run's Adam step, schedule position and data position. Returns (engine, step)."""
    schedule_step = int(source.manifest.optimizer["scheduler"]["last_epoch"])
    start_lr = source_lr(source.manifest, source.path) if cfg.clone.schedule == "restart" else None
    carry = CarrySettings(source.manifest.model, cfg.clone, schedule_step, start_lr)
    engine, groups = build_carry_engine(cfg, layout, module, device, carry)
    if cfg.train.precision != "fp32":
        inject_fp32_masters(engine, module, cfg.model, clone_tensors)
    step = carry_optimizer_state(engine, module, cfg, layout, sampler)
    if layout.rank == 0:
        log.info(describe_carry(groups, carry))
    return engine, step
