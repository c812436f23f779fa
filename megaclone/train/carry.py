"""Carrying the optimizer across a widening: AdamW groups, schedule and clipping in the small model's units.

With the moments carried (megaclone.clone.moments), Adam's update m/sqrt(v) of a widened parameter is the
small update o pi. The widened value is (small o pi) / s, so the wide model follows the small model's
trajectory exactly (no noise, no dropout, fp32) when each parameter uses (docs/design.md, "Carrying the
optimizer state")

    learning rate  lr / s        the update must shrink with the value
    Adam eps       eps / p       sqrt(v') = sqrt(v) / p
    weight decay   wd * s        so that lr * wd, the decoupled decay per step, is kept
    clipping       on sqrt(sum_g w_g ||grad_g||^2), w = p^2 / c: the norm the small model would see

Depth growth: the moments of a copied block are its source block's (widened as above), those of the zeroed
output projections of an inserted block start at zero (megaclone.clone.moments); the groups and the clipping
weights are those of the width factors, for every block.

Parameters with equal (decay, s, p, c) share one AdamW group, so every multiplier is a group setting. After
the widening an optional transition moves each group to the run's own values over `lr_transition` steps,
geometrically: multiplier(t) = multiplier^(1 - t), t = (step - clone step) / lr_transition clamped to [0, 1].

The schedule (`clone.schedule`): `continue` reads the run's warmup + cosine at the global step, so a run
configured with the small run's schedule continues it exactly. `restart` lays the run's schedule out again
from the widening (its warmup, lr_decay_iters and train_iters count from the clone step), as a fresh
optimizer's run would have it, and the transition moves the learning rate linearly from the small run's last
value to it: lr(t) = (1 - t) lr_small + t lr_run(step - clone step). Linear, so a restarted warmup does not
pull the blend towards zero.

Clipping (the choice): DeepSpeed clips inside `engine.step` on its own norm. ZeRO-1/2 compute that norm in
one method, `scaled_global_norm`, as the combination of per-group norms that are already reduced over DP and
TP; `install_small_norm_clipping` replaces it on the engine's ZeRO optimizer with the weighted combination
(megaclone.train.zero_fast).
The clip coefficient, the logged grad_norm and the partitioned gradients then behave exactly as in the small
run, at any DP size and for the pipeline engine (ZeRO-1) too; no gradient is touched twice. ZeRO-0 and ZeRO-3
use other code paths and are refused for carry runs.

Where the carry lives: one module per layer, each the only owner of its part, so imports stay one-way (a package
of its own would import the engine, the AdamW groups and the converter's jobs while they import it):

    megaclone/clone/moments.py           the math: (s, p, c) of every widened parameter, the widened moments
    megaclone/checkpoint/optim_state.py  the optim/ files beside the weights, their manifest record, their reader
    megaclone/train/carry.py             (this module) a carry run's AdamW groups, schedule, transition, clipping,
                                         its settings (from the launch or a carry run's checkpoint) and its engine
    megaclone/train/state_io.py          optimizer state into and out of DeepSpeed: for saves, for an elastic resume,
                                         and the widened moments of a carry launch (`start_carried_run`)
    megaclone/convert/carry.py           the offline path: tools/reshard_expand.py --optimizer carry
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megaclone.checkpoint import Manifest
from megaclone.clone import (
    CarryFactors,
    carry_factors,
    check_carry_possible,
    clone_factors,
    describe_growth,
    grown_model_config,
)
from megaclone.config import CloneConfig, ConfigError, ModelConfig, RunConfig, TrainConfig, model_config_from_dict
from megaclone.model import global_named_parameters
from megaclone.spec import spec_table
from megaclone.train.engine import initialize_engine
from megaclone.train.optim import adamw, build_param_groups, lr_factor
from megaclone.train.zero_fast import install_grad_norm

log = logging.getLogger("megaclone.train")

CARRY_KEY = "carry"  # the group's factors and base values, kept in the group dict (and its state dict)
CARRY_ZERO_STAGES = (1, 2)


def check_carry_supported(cfg: RunConfig, what: str = "--hyperclone-optimizer carry") -> None:
    """Carry runs need ZeRO-1/2 and PP=1, where the clipping norm can be taken in the small model's units."""
    if cfg.parallel.zero_stage not in CARRY_ZERO_STAGES:
        raise ConfigError(f"{what} with parallel.zero_stage={cfg.parallel.zero_stage}: supported with ZeRO stages "
                          f"{CARRY_ZERO_STAGES} (where gradient clipping can be measured on the small model's norm)")
    if cfg.parallel.pp_size > 1:
        # Stages hold different carry groups, so the per-group clipping norm is not reduced across stages.
        raise ConfigError(f"{what} with parallel.pp_size={cfg.parallel.pp_size}: supported with PP=1 only "
                          "(use TP and DP for the wide run, or the fresh optimizer)")


def check_carry_plan(cfg: RunConfig, source: Manifest, path: Path) -> None:
    """Everything a carry launch needs from the small checkpoint and the run, checked before any work."""
    check_carry_supported(cfg)
    if source.optimizer is None:
        raise ConfigError(f"--hyperclone-optimizer carry: {path} holds no optimizer state (its manifest has no "
                          "'optimizer' entry and no optim/ files); widen it with the fresh optimizer instead")
    try:
        check_carry_possible(source.model, cfg.clone)
    except ValueError as e:
        raise ConfigError(f"--hyperclone-optimizer carry from {path}: {e}") from e
    if cfg.clone.schedule == "restart":
        source_lr(source, path)
    if cfg.train.train_iters <= source.step:
        raise ConfigError(f"--hyperclone-optimizer carry continues the step count of {path} (step {source.step}): "
                          f"train.train_iters={cfg.train.train_iters} must exceed it")


def parameter_factors(names: Iterable[str], small_cfg: ModelConfig, clone_cfg: CloneConfig) -> dict[str, CarryFactors]:
    """Global name -> (s, p, c) of every named widened parameter."""
    n, m = clone_factors(clone_cfg)
    specs = spec_table(grown_model_config(small_cfg, clone_cfg))
    return {name: carry_factors(specs[name], small_cfg, n, m) for name in names}


def build_carry_param_groups(params: dict[str, nn.Parameter], small_cfg: ModelConfig, clone_cfg: CloneConfig,
                             train: TrainConfig) -> list[dict]:
    """AdamW groups of the wide model, one per (decay, s, p, c), set to the exact-continuation values.

    `params` maps global names to this rank's widened parameters. Groups with s = 1 come first, so the
    logged learning rate (group 0's) is the small run's schedule. The order is a function of the factors
    only, so DP replicas build the same groups in the same order, as ZeRO needs.
    """
    factors = parameter_factors(params, small_cfg, clone_cfg)
    names = {id(p): name for name, p in params.items()}
    keyed: dict[tuple, list[nn.Parameter]] = {}
    for base in build_param_groups(params, grown_model_config(small_cfg, clone_cfg), train):
        for param in base["params"]:
            f = factors[names[id(param)]]
            key = (f.value_scale, f.grad_scale, f.copies, base["name"], base["weight_decay"])
            keyed.setdefault(key, []).append(param)
    groups = []
    for (s, p, c, kind, decay), members in sorted(keyed.items(), key=lambda kv: kv[0][:4]):
        carry = {"value_scale": s, "grad_scale": p, "copies": c, "weight_decay": decay, "eps": train.adam_eps,
                 "norm_weight": 1.0}
        group = {"params": members, "name": f"{kind}/s{s}-p{p}-c{c}", "lr": train.lr, "eps": train.adam_eps,
                 "weight_decay": decay, CARRY_KEY: carry}
        set_group_values(group, 0.0, lr=train.lr)
        groups.append(group)
    return groups


def set_group_values(group: dict, progress: float, lr: float) -> None:
    """Set lr (the schedule's value for this step, before the group's multiplier), eps, weight decay and the
    clip-norm weight of one carry group at transition progress t in [0, 1] (0: exact continuation)."""
    c = group[CARRY_KEY]
    keep = 1.0 - progress
    s, p = c["value_scale"], c["grad_scale"]
    group["lr"] = lr * s ** -keep
    group["eps"] = c["eps"] * p ** -keep
    group["weight_decay"] = c["weight_decay"] * s ** keep
    c["norm_weight"] = (p * p / c["copies"]) ** keep


def transition_progress(step: int, clone_step: int, transition: int | None) -> float:
    """t after `step` optimizer steps: 0 before/without a transition, 1 once it is over (0 steps: at once)."""
    if transition is None:
        return 0.0
    if transition == 0:
        return 1.0
    return min(1.0, max(0.0, (step - clone_step) / transition))


def restarted(train: TrainConfig, clone_step: int) -> TrainConfig:
    """The run's schedule laid out from the widening: warmup, decay and end count from `clone_step`."""
    decay = train.lr_decay_iters if train.lr_decay_iters is not None else train.train_iters
    return dataclasses.replace(train, train_iters=train.train_iters - clone_step, lr_decay_iters=decay - clone_step)


class CarrySchedule(torch.optim.lr_scheduler.LRScheduler):
    """The run's warmup + cosine schedule, continued from the clone step or restarted there (`start_lr`: the
    small run's last learning rate, given for a restart), with each carry group's multipliers.

    `last_epoch` counts optimizer steps since the small run began, so the position is the small run's and
    DeepSpeed saves and restores it with the engine. eps and weight decay are set with the learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, train: TrainConfig, clone_step: int,
                 transition: int | None, start_lr: float | None = None) -> None:
        self.factor = lr_factor(train if start_lr is None else restarted(train, clone_step))
        self.base_lr = train.lr
        self.clone_step = clone_step
        self.transition = transition
        self.start_lr = start_lr
        super().__init__(optimizer)  # sets the values for step 0; `start_at` moves to the clone step
        self.start_at(clone_step)

    def start_at(self, step: int) -> None:
        """Position the schedule after `step` optimizer steps (the small checkpoint's step)."""
        self.last_epoch = step
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values

    def get_lr(self) -> list[float]:
        t = transition_progress(self.last_epoch, self.clone_step, self.transition)
        if self.start_lr is None:
            lr = self.base_lr * self.factor(self.last_epoch)
        else:
            lr = (1 - t) * self.start_lr + t * self.base_lr * self.factor(self.last_epoch - self.clone_step)
        for group in self.optimizer.param_groups:
            set_group_values(group, t, lr)
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "factor")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr


def build_carry_scheduler(train: TrainConfig, clone_step: int, transition: int | None,
                          start_lr: float | None = None) -> Callable[[torch.optim.Optimizer], CarrySchedule]:
    """A callable DeepSpeed applies to the optimizer it steps (like `build_lr_scheduler`)."""
    return lambda optimizer: CarrySchedule(optimizer, train, clone_step, transition, start_lr)


def small_model_grad_norm(groups: list[dict]) -> torch.Tensor:
    """sqrt(sum_g w_g ||grad_g||^2) over single-process groups: the gradient norm the small model sees."""
    total = torch.zeros((), dtype=torch.float64)
    for group in groups:
        grads = [p.grad for p in group["params"] if p.grad is not None]
        if grads:
            sq = sum(g.detach().double().pow(2).sum() for g in grads)
            total = total + group[CARRY_KEY]["norm_weight"] * sq
    return total.sqrt()


def clip_to_small_norm_(groups: list[dict], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` with the small model's norm (single process); returns that norm."""
    norm = small_model_grad_norm(groups)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for group in groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def install_small_norm_clipping(engine: Any) -> None:
    """Make the engine's ZeRO-1/2 optimizer clip on the small model's norm (see the module docstring)."""
    def small_norm(zero: Any, norms: list[torch.Tensor]) -> torch.Tensor:
        total = None
        for group, norm in zip(zero.optimizer.param_groups, norms):
            if norm.item() < 0:  # DeepSpeed's sentinel for inf/NaN: keep it, the step is then skipped
                return norm
            term = group[CARRY_KEY]["norm_weight"] * norm.double() ** 2
            total = term if total is None else total + term
        return total.sqrt().float()

    if not install_grad_norm(engine, small_norm):
        raise ConfigError(f"--hyperclone-optimizer carry needs DeepSpeed's ZeRO-1/2 optimizer without CPU offload or "
                          f"MoE layers; the engine has {type(engine.optimizer).__name__}")


def describe_carry(groups: list[dict], carry: CarrySettings) -> str:
    """One line per group: what is carried and how (logged at start)."""
    transition = carry.clone.lr_transition
    lines = [f"optimizer carried from step {carry.clone_step}; "
             + ("exact continuation (no transition)" if transition is None else
                f"transition to the run's lr, eps and weight decay over {transition} steps")
             + ("; the run's schedule continues at the small run's step" if carry.start_lr is None else
                f"; the run's schedule restarts at the widening, reached from the small run's last lr "
                f"{carry.start_lr:.4g}")]
    for g in groups:
        c = g[CARRY_KEY]
        s, p, n_copies = c["value_scale"], c["grad_scale"], c["copies"]
        numel = sum(param.numel() for param in g["params"])
        lines.append(f"  group {g['name']}: {len(g['params'])} tensors, {numel} elements: lr x 1/{s}, eps x 1/{p}, "
                     f"weight decay {c['weight_decay']:g} x {s}, clip-norm weight {p * p / n_copies:.4g} "
                     f"(moments m/{p}, v/{p * p})")
    return "\n".join(lines)


@dataclass(frozen=True)
class CarrySettings:
    """What the carry groups and schedule are built from: at the widening, and again on every --load of the run."""
    small: ModelConfig  # the small checkpoint's model (the run's model is its widening)
    clone: CloneConfig  # factors and lr_transition
    clone_step: int  # the schedule position at the widening (transition progress counts from it)
    start_lr: float | None = None  # clone.schedule restart: the small run's last learning rate; None: continue


def source_lr(manifest: Manifest, path: Path) -> float:
    """The learning rate the small run would have used next (its scheduler's last value, group 0 = the base)."""
    try:
        return float(manifest.optimizer["scheduler"]["last_lr"][0])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ConfigError(f"--hyperclone-schedule restart: {path}'s manifest records no learning rate "
                          f"(optimizer.scheduler.last_lr: {type(e).__name__}: {e})") from e


def carry_resume_settings(manifest: Manifest, path: Path, cfg: RunConfig) -> CarrySettings | None:
    """The carry settings of a checkpoint that a --hyperclone-optimizer carry run saved (None for any other).

    The launch records them in the manifest's provenance (`CloneSource.provenance`), and a resumed run keeps
    that record, so a chain of resumes rebuilds the same groups. Checked before any work.
    """
    record = manifest.provenance.get("hyperclone") or {}
    if record.get("optimizer") != "carry" or (manifest.deepspeed is None and manifest.optimizer is None):
        return None  # not a carry run, or weights only (a fresh optimizer at step 0 either way)
    where = f"--load {path}: provenance.hyperclone of a --hyperclone-optimizer carry run"
    try:
        transition = record.get("lr_transition")
        clone = CloneConfig(init_from=str(record["source"]), factor=int(record["factor"]),
                            ffn_factor=int(record["ffn_factor"]), grow_layers=int(record.get("grow_layers", 0)),
                            grow_method=record.get("grow_method", "zero"), optimizer="carry",
                            lr_transition=None if transition is None else int(transition),
                            schedule=record.get("schedule", "continue"))
        clone.validate()
        start_lr = float(record["source_lr"]) if clone.schedule == "restart" else None
        small = model_config_from_dict(dict(record["source_model"]))
        scheduler = (manifest.optimizer or {}).get("scheduler") or {}
        clone_step = int(scheduler.get("clone_step", record["source_step"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where} is incomplete or malformed ({type(e).__name__}: {e})") from e
    quiet = {"dropout": 0.0, "attention_dropout": 0.0}  # training-only options may differ
    wide = grown_model_config(small, clone)
    if dataclasses.replace(wide, **quiet) != dataclasses.replace(manifest.model, **quiet):
        raise ConfigError(f"{where}: its source_model grown {describe_growth(small, clone)} is not the checkpoint's "
                          "model")
    check_carry_supported(cfg, f"{where}: resuming it")
    return CarrySettings(small, clone, clone_step, start_lr)


def build_carry_engine(cfg: RunConfig, layout: Any, module: nn.Module, device: torch.device,
                       carry: CarrySettings) -> tuple[Any, list[dict]]:
    """`deepspeed.initialize` like `build_engine`, with the carry groups and schedule and the small-norm clipping.

    `module` holds the widened weights already; returns (engine, the AdamW groups as built).
    """
    assert cfg.parallel.zero_stage in CARRY_ZERO_STAGES and cfg.parallel.pp_size == 1, "checked when planning"
    train = cfg.train
    module.to(device)
    params = global_named_parameters(module, cfg.model)
    groups = build_carry_param_groups(params, carry.small, carry.clone, train)
    scheduler = build_carry_scheduler(train, carry.clone_step, carry.clone.lr_transition, carry.start_lr)
    engine = initialize_engine(cfg, layout, module, adamw(groups, train), scheduler, device)
    install_small_norm_clipping(engine)
    return engine, groups
