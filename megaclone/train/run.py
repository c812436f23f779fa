"""One training run end to end: plan (all checks), process groups, data, model, engine, train, save.

`main` is what launch/pretrain.py calls; it works under `deepspeed` (one node or one launcher per node),
`torchrun`, bare Slurm tasks and as a plain single process (megaclone.cluster reads each launcher's
environment). User mistakes found while planning exit with status 2 before any process group or file
exists; a peer lost mid-run ends every surviving rank with a message and status 75.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from typing import Any, NoReturn

import torch
import torch.distributed as dist
import yaml
from torch import nn

from megaclone import cluster
from megaclone.checkpoint import CheckpointError, ShardReader
from megaclone.data import DistributedBatchSampler
from megaclone.parallel import Layout, TPRNGTracker, build_layout
from megaclone.spec import num_params
from megaclone.train.carry import build_carry_engine
from megaclone.train.checkpointing import (
    layout_dict,
    load_rank_weights,
    resume_training_checkpoint,
    save_training_checkpoint,
    verify_resume_checkpoint,
)
from megaclone.train.cli import RunPlan, build_plan, parse_args
from megaclone.train.cloning import (
    build_rank_clone,
    check_preservation,
    continue_data_position,
    depth_monitor,
    describe_preservation,
    inject_fp32_masters,
    symmetry_monitor,
)
from megaclone.train.dataset import eval_batches, open_data, prepare_data_on_rank0
from megaclone.train.engine import build_engine, build_model, device_for
from megaclone.train.integrity import ResumeRefused
from megaclone.train.logging import MetricsLogger, StartupClock, quiet_libraries, setup_console_logging
from megaclone.train.loop import TrainContext, run_eval, train
from megaclone.train.settings import describe_sources, settings_record
from megaclone.train.state_io import elastic_reason, resume_elastic, start_carried_run

log = logging.getLogger("megaclone.train")


def init_distributed(env: cluster.ClusterEnv | None = None) -> None:
    """The default process group for this rank (whichever launcher started it), with the collective timeout."""
    env = env or cluster.detect_cluster_env()
    if "OMP_NUM_THREADS" not in os.environ:  # share the cores between the local ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    quiet_libraries()
    cluster.init_process_group(env)


def _seed(seed: int, layout: Layout, device: torch.device) -> TPRNGTracker:
    """Default generator: same on every TP and DP rank (replicated dropout), per stage (Megatron's +100 pp);
    the tracker: per TP rank, for dropout inside TP-split regions."""
    torch.manual_seed(seed + 100 * layout.pp_rank)
    return TPRNGTracker(seed, layout.tp_rank, device)


def _provenance(plan: RunPlan) -> dict[str, Any]:
    if plan.clone is not None:
        return plan.clone.provenance()
    if plan.resume is not None:
        return {**plan.resume.provenance, "resumed_from": str(plan.resume_path)}
    return {"init": "random", "seed": plan.cfg.train.seed}


def describe_start(plan: RunPlan) -> str:
    """What the run starts from, said before the (possibly long) model build: above all whether a --load resumes
    exactly or through the layout-free path."""
    cfg = plan.cfg
    if plan.clone is not None:
        c = cfg.clone
        growth = ([f"x{c.factor or 1} HyperCloning widening (FFN x{c.ffn_factor or c.factor or 1})"]
                  if max(c.factor, c.ffn_factor or 1) > 1 else []) + \
            ([f"growth to {c.grow_layers} layers ({c.grow_method})"] if c.grow_layers else [])
        return (f"start: the {' and '.join(growth)} of {plan.clone.path} (step {plan.clone.manifest.step}), "
                f"{c.optimizer} optimizer, training after step {plan.start_step}")
    if plan.resume is None:
        return f"start: random initialisation (seed {cfg.train.seed})"
    where = f"{plan.resume_path} (step {plan.resume.step})"
    if plan.resume.deepspeed is None and plan.resume.optimizer is None:
        return f"start: the weights of {where}, a fresh optimizer from step 0 (the checkpoint holds no optimizer state)"
    reason = elastic_reason(plan.resume, cfg, plan.world_size)
    if reason is not None:
        return (f"start: resuming {where} through the layout-free path ({reason}): fp32 masters, Adam moments, LR "
                "schedule and data position carried; DeepSpeed's own state is not used")
    return f"start: resuming {where} exactly (DeepSpeed's own state, at the layout it was saved with)"


def build_start_model(plan: RunPlan, layout: Layout,
                      tracker: TPRNGTracker) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """This rank's module with its starting weights, and the widened fp32 slices when cloning.

    Each parameter is written once: from the spec table (a new run), the clone or the weight file. An exact
    resume leaves the module uninitialised, since DeepSpeed's load overwrites every weight.
    """
    cfg = plan.cfg
    weight_only = plan.resume is not None and plan.resume.deepspeed is None
    module = build_model(cfg, layout, tracker, init=plan.clone is None and plan.resume is None)
    clone_tensors = None
    if plan.clone is not None:  # only this rank's slice, from the small slices it copies
        clone_tensors = build_rank_clone(plan.clone, layout)
        load_rank_weights(module, cfg.model, layout, lambda name, _: clone_tensors[name])
    elif weight_only:
        with ShardReader(plan.resume_path) as reader:
            load_rank_weights(module, cfg.model, layout, reader.read)
    return module, clone_tensors


def build_engine_for(plan: RunPlan, layout: Layout, tracker: TPRNGTracker, device: torch.device,
                     sampler: DistributedBatchSampler, clock: StartupClock) -> tuple[Any, nn.Module, int]:
    """The engine at its starting point: spec-table init, a widened clone, a weight-only checkpoint, or an exact
    resume of a training checkpoint. Returns (engine, module, the step training continues after)."""
    cfg = plan.cfg
    elastic = elastic_reason(plan.resume, cfg, layout.world_size) if plan.resume is not None else None
    if elastic is not None:  # another layout, or a converted checkpoint: carry masters, moments, schedule, data
        return resume_elastic(cfg, plan.resume_path, layout, tracker, device, sampler, elastic, plan.carry)
    weight_only = plan.resume is not None and plan.resume.deepspeed is None
    module, clone_tensors = build_start_model(plan, layout, tracker)
    clock.lap("clone" if plan.clone is not None else "model")
    if plan.clone is not None and cfg.clone.optimizer == "carry":  # resume the small run's optimizer, widened
        engine, step = start_carried_run(cfg, plan.clone, layout, module, device, sampler, clone_tensors)
        return engine, module, step
    if plan.carry is not None:  # a carry run's own checkpoint: the same groups and schedule, then its state
        engine = build_carry_engine(cfg, layout, module, device, plan.carry)[0]
    else:
        engine = build_engine(cfg, layout, module, device)
    if clone_tensors is not None and cfg.train.precision != "fp32":
        inject_fp32_masters(engine, module, cfg.model, clone_tensors)
    if plan.clone is not None and cfg.clone.continues_data:  # a fresh optimizer, reading on where the small run was
        continue_data_position(sampler, plan.clone.manifest)
    clock.lap("engine")
    if plan.resume is None or weight_only:
        return engine, module, 0
    cluster.check_same_checkpoint(plan.resume_path, plan.resume.step)  # node-local copies may disagree
    step = resume_training_checkpoint(plan.resume_path, engine, sampler, tracker)
    clock.lap("resume")
    log.info(f"resumed from {plan.resume_path} at step {step} (exact: DeepSpeed's own state, same layout)")
    return engine, module, step


def run(plan: RunPlan, clock: StartupClock | None = None) -> float | None:
    """Train on an initialised default process group; returns the final evaluation loss.

    `clock` times the start-up phases (from the process's start when given; from here otherwise); they are
    logged as the `startup` event just before the first step.
    """
    clock = clock or StartupClock()
    cfg = plan.cfg
    layout = build_layout(cfg.parallel)
    setup_console_logging(layout.rank)
    log.info("config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    log.info(f"layout: {layout.describe()}, ZeRO-{cfg.parallel.zero_stage}, {cfg.train.precision}")
    env = cluster.detect_cluster_env()
    placement = cluster.build_cluster_report(cluster.gather_placement(env), env.launcher, layout.tp_size,
                                             layout.pp_size)
    log.info("\n".join(placement.lines()))
    for warning in placement.warnings if layout.rank == 0 else []:
        log.warning(warning)
    for warning in plan.warnings if layout.rank == 0 else []:
        log.warning(warning)
    for line in describe_sources(plan.sources, cfg):
        log.info(line)
    log.info(describe_start(plan))
    if plan.resume is not None:  # every file of the step, checked before anything is loaded or written
        verify_resume_checkpoint(plan.resume_path, plan.resume, cfg, layout, placement)
    device = device_for(int(os.environ.get("LOCAL_RANK", "0")))
    tracker = _seed(cfg.train.seed, layout, device)

    prepare_data_on_rank0(cfg, plan.data, layout.rank)
    data = open_data(cfg, plan.data, layout)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {data.tokenizer.path} has {data.tokenizer.vocab_size} pieces, more than "
                         f"model.vocab_size={cfg.model.vocab_size}")
    clock.lap("setup")
    engine, module, start_step = build_engine_for(plan, layout, tracker, device, data.sampler, clock)

    logger = MetricsLogger(cfg.run_dir, layout.rank == 0, cfg.train.train_iters, start_step)
    logger.event("start", start_step, config=cfg.to_dict(), layout=layout_dict(cfg, layout),
                 world_size=layout.world_size, num_params=num_params(cfg.model), cluster=placement.to_dict())
    eval_set = [(t.to(device), y.to(device)) for t, y in eval_batches(
        data.valid, cfg.train.micro_batch_size, cfg.train.eval_iters, layout.dp_rank, layout.dp_size, cfg.train.seed)]
    save = None
    if cfg.checkpoint.save:
        provenance = _provenance(plan)

        def save(step: int) -> None:
            save_training_checkpoint(cfg.checkpoint.save, step, cfg, layout, engine, module, data.sampler, tracker,
                                     data.tokenizer.path, provenance, placement, settings_record(cfg, plan.data.prefix))

    batches = ((t.to(device), y.to(device)) for t, y in data.batches())
    ctx = TrainContext(cfg, layout, engine, batches, eval_set, logger, start_step, save)
    try:
        if plan.clone is not None:  # function preservation, then the baseline the cloned run starts from
            stats = check_preservation(engine, layout, plan.clone, eval_set[0], cfg.train.precision)
            logger.event("clone", start_step, **stats, **plan.clone.provenance()["hyperclone"])
            logger.info(describe_preservation(plan.clone, stats))
            ctx.monitors.append(symmetry_monitor(engine, module, layout, plan.clone))
            if plan.clone.depth.grown:
                ctx.monitors.append(depth_monitor(module, layout, plan.clone))
            clock.lap("preservation")
            if cfg.clone.eval_at_start:
                run_eval(ctx, start_step)
                clock.lap("eval_at_start")
        logger.event("startup", start_step, **clock.record())
        logger.info("start-up: " + " ".join(f"{k}={v:.2f}s" for k, v in clock.phases.items()))
        final = train(ctx)
        if save is not None and start_step == cfg.train.train_iters == 0:  # e.g. a widened checkpoint at step 0
            save(0)
        logger.event("end", cfg.train.train_iters, final_eval_loss=final)
    finally:
        logger.close()
    return final


RANK0_REPORT_WAIT_S = 3.0  # how long other ranks wait before exiting on a mistake, so that rank 0 reports it


def _launch_rank() -> int:
    try:
        return cluster.detect_cluster_env().rank
    except ValueError:  # a broken environment: main reports it on every rank
        return 0


def _exit_after_rank0(rank: int) -> None:
    """Every rank finds the same mistake, but only rank 0 reports it, and a launcher ends every rank as soon as one
    exits: the others wait a moment, so rank 0 is not killed before its message is out."""
    if rank != 0:
        time.sleep(RANK0_REPORT_WAIT_S)


def parse_args_on_rank0(argv: list[str] | None, rank: int) -> argparse.Namespace:
    """argparse prints its usage, errors and --help itself; under a launcher only rank 0 does, not every rank."""
    try:
        if rank == 0:
            return parse_args(argv)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            return parse_args(argv)
    except SystemExit as e:
        if e.code:
            _exit_after_rank0(rank)
        raise


def _exit_refused(error: CheckpointError, rank: int) -> NoReturn:
    """A checkpoint refused once the process group exists: say why and leave at once, with the usage status.
    `os._exit`: a peer may still wait in a collective that a normal exit's teardown would block on."""
    if rank == 0 or not isinstance(error, ResumeRefused):  # every rank raises the same ResumeRefused
        print(f"pretrain.py: error: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(cluster.EXIT_USAGE)


def main(argv: list[str] | None = None) -> int:
    clock = StartupClock()
    rank = _launch_rank()
    args = parse_args_on_rank0(argv, rank)
    env = None
    try:
        env = cluster.detect_cluster_env()
        cluster.export_cluster_env(env)  # torch's names, also under bare Slurm tasks
        plan = build_plan(args, env.world_size)
    except (ValueError, FileNotFoundError) as e:  # the user's mistake: say it, do nothing
        if env is None or env.rank == 0:  # a broken environment: every rank says so
            print(f"pretrain.py: error: {e}", file=sys.stderr)
        _exit_after_rank0(rank)
        return 2
    with cluster.exit_on_peer_failure(env, plan.cfg.checkpoint.save):  # a lost peer: a message and exit 75
        clock.lap("plan")
        init_distributed(env)
        clock.lap("init_distributed")
        try:
            run(plan, clock)
        except CheckpointError as e:
            _exit_refused(e, env.rank)
        # Only after success (a failed rank's peers may be inside a collective, and a destroy could block on them),
        # and together: a rank that tears gloo down while a peer's last collective is still in flight can abort
        # at exit ("terminate called without an active exception") after a complete run.
        dist.barrier()
        dist.destroy_process_group()
    return 0

