"""The training loop: one optimizer step, held-out evaluation, logging and periodic checkpoints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megaclone.config import RunConfig
from megaclone.parallel import Layout
from megaclone.spec import num_params
from megaclone.train.engine import current_lr, is_pipeline
from megaclone.train.logging import MetricsLogger, model_flops_per_token, peak_flops

Batch = tuple[torch.Tensor, torch.Tensor]


def dp_mean(value: torch.Tensor | float, layout: Layout) -> float:
    """Mean of a per-rank scalar over the data-parallel group (identical across TP and PP ranks)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).cpu()
    if layout.dp_size > 1:
        if dist.get_backend(layout.dp_group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, group=layout.dp_group)
        t = t.cpu() / layout.dp_size
    return float(t[0])


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def train_step(engine: Any, batches: Iterator[Batch], layout: Layout) -> tuple[float, float | None]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches; returns (DP-mean loss, grad norm)."""
    if is_pipeline(engine):
        loss = engine.train_batch(batches)  # pulls the micro-batches itself (first and last stage)
    else:
        losses = []
        for _ in range(engine.gradient_accumulation_steps()):
            tokens, labels = next(batches)
            loss = engine(tokens, labels)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates only at the accumulation boundary
            losses.append(loss.detach().float())
        loss = torch.stack(losses).mean()
    return dp_mean(loss, layout), _grad_norm(engine)


@torch.no_grad()
def evaluate(engine: Any, batches: list[Batch], layout: Layout) -> float:
    """Mean loss over the fixed held-out batches, all DP ranks together; dropout off."""
    if is_pipeline(engine):
        loss = engine.eval_batch(iter(batches), num_micro_batches=len(batches))
    else:
        engine.eval()
        loss = torch.stack([engine(tokens, labels).float() for tokens, labels in batches]).mean()
        engine.train()
    return dp_mean(loss, layout)


@dataclass
class TrainContext:
    """Everything the loop needs, built by `megaclone.train.run`."""

    cfg: RunConfig
    layout: Layout
    engine: Any
    batches: Iterator[Batch]
    eval_set: list[Batch]
    logger: MetricsLogger
    start_step: int = 0
    save: Callable[[int], None] | None = None  # writes a checkpoint after the given step
    monitors: list[Callable[[], dict[str, float]]] = field(default_factory=list)  # extra eval-time metrics


def _throughput(cfg: RunConfig, layout: Layout, seconds: float) -> dict[str, float]:
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * layout.dp_size * cfg.data.seq_len
    out = {"step_time": seconds, "tokens_per_s": tokens / seconds}
    if torch.cuda.is_available():
        peak = peak_flops(torch.cuda.get_device_name())
        if peak:
            flops = model_flops_per_token(num_params(cfg.model), cfg.model.num_layers, cfg.model.hidden_size,
                                          cfg.data.seq_len)
            out["mfu"] = flops * out["tokens_per_s"] / (peak * layout.world_size)
    return out


def run_eval(ctx: TrainContext, step: int) -> float:
    loss = evaluate(ctx.engine, ctx.eval_set, ctx.layout)
    extra: dict[str, float] = {}
    for monitor in ctx.monitors:
        extra.update(monitor())
    ctx.logger.event("eval", step, eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)), **extra)
    ctx.logger.info(f"eval step {step}: loss={loss:.4f}" + "".join(f" {k}={v:.6f}" for k, v in extra.items()))
    return loss


def train(ctx: TrainContext) -> float | None:
    """Train from `start_step` to `train.train_iters`; evaluate every eval_interval and at the end; save every
    checkpoint.save_interval and at the end. Returns the last evaluation loss."""
    cfg, total = ctx.cfg, ctx.cfg.train.train_iters
    save_every, eval_every = ctx.cfg.checkpoint.save_interval, cfg.train.eval_interval
    last_eval = None
    for step in range(ctx.start_step + 1, total + 1):
        lr = current_lr(ctx.engine)  # the rate this step uses; the scheduler advances inside the step
        start = time.perf_counter()
        loss, grad_norm = train_step(ctx.engine, ctx.batches, ctx.layout)
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: training loss is {loss}; stopping")
        values = {"loss": loss, "lr": lr, **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                  **_throughput(cfg, ctx.layout, time.perf_counter() - start)}
        ctx.logger.train_step(step, values, console=step % cfg.train.log_interval == 0)
        if step == total or (eval_every and step % eval_every == 0):
            last_eval = run_eval(ctx, step)
        if ctx.save is not None and (step == total or (save_every and step % save_every == 0)):
            ctx.save(step)
    return last_eval
