"""Save and resume glue between the DeepSpeed engine and the megaclone checkpoint contract.

A training checkpoint is DeepSpeed's own state (engine.save_checkpoint, so ZeRO partitions, the
optimizer and the schedule resume exactly) plus per-rank fp32 safetensors weights and a manifest,
written into a temporary directory and committed only when every rank has finished.

The checkpoint root is on a filesystem every node shares, unless parallel.node_local_checkpoints: then
each node writes the files of its own ranks (and a copy of the files all replicas share) into its own
copy of the step directory, with an inventory, and reads only those on resume (docs/cluster.md).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megaclone.checkpoint import (
    LATEST_NAME,
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    begin_checkpoint,
    commit_checkpoint,
    file_digest,
    make_manifest,
    prune_checkpoints,
    read_manifest,
    resolve_checkpoint,
    save_weight_shard,
    step_dir_name,
    storage_stage,
    weight_file,
    write_manifest,
)
from megaclone.checkpoint.io import TMP_PREFIX, remove_stale_saves
from megaclone.checkpoint.manifest import step_dirs
from megaclone.checkpoint.optim_state import is_optim_file
from megaclone.cluster import ClusterReport, replica_writers, write_node_inventory
from megaclone.config import ModelConfig, RunConfig
from megaclone.data import DistributedBatchSampler
from megaclone.model import global_named_parameters
from megaclone.parallel import Layout, TPRNGTracker
from megaclone.spec import model_summary, spec_table
from megaclone.train.engine import fp32_masters, is_pipeline
from megaclone.train.integrity import hash_step_files, verify_resume
from megaclone.train.safe_load import install_weights_only_loader
from megaclone.train.state_io import optimizer_record, save_optimizer_shard

log = logging.getLogger("megaclone.train")

DEEPSPEED_TAG = "deepspeed"
CLIENT_KEY = "megaclone"


def layout_dict(cfg: RunConfig, layout: Layout) -> dict[str, Any]:
    return {"tp_size": layout.tp_size, "pp_size": layout.pp_size, "dp_size": layout.dp_size,
            "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision}


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast_path(path: Path | None) -> Path:
    if not dist.is_initialized():
        assert path is not None
        return path
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def master_weights(engine: Any, module: nn.Module, cfg: ModelConfig, layout: Layout) -> dict[str, torch.Tensor]:
    """This rank's fp32 masters (global name -> TP slice) that its weight file stores (collective over DP)."""
    specs = spec_table(cfg)
    params = {name: p for name, p in global_named_parameters(module, cfg).items()
              if storage_stage(specs[name], cfg, layout.pp_size) == layout.pp_rank}
    return fp32_masters(engine, params)


def rng_state(tracker: TPRNGTracker) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "tp": tracker.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], tracker: TPRNGTracker) -> None:
    torch.set_rng_state(state["torch"])
    tracker.load_state_dict(state["tp"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _write_model_states(engine: Any, write: bool) -> None:
    """Node-local: DeepSpeed writes the model states that every DP replica shares from DP rank 0 only; make the
    first replica on each node write them too (ZeRO-3 already has every rank write its own)."""
    if not engine.zero_optimization_partition_weights():
        engine.save_non_zero_checkpoint = write


def _write_pipeline_layers(engine: Any, step_dir: Path) -> None:
    """The per-layer files that `PipelineModule.save_state_dict` writes on DP rank 0 only, written the same way
    by another replica (node-local: the first replica on its node)."""
    from deepspeed.checkpoint.utils import clone_tensors_for_torch_save

    pipe = engine.module
    for idx, layer in enumerate(pipe.forward_funcs):
        if hasattr(layer, "state_dict"):
            path = pipe.ckpt_layer_path(str(step_dir / DEEPSPEED_TAG), idx)
            engine.checkpoint_engine.save(state_dict=clone_tensors_for_torch_save(layer.state_dict()), path=path)


def copy_ranks_of(layout: Layout, placement: ClusterReport | None) -> list[int]:
    """The ranks that share this rank's copy of a step directory: its node's (`placement` given: node-local
    checkpoints), else all."""
    if placement is None:
        return list(range(layout.world_size))
    return list(placement.nodes[placement.node_of(layout.rank)]["ranks"])


def _remove_stale_saves(root: str | Path) -> None:
    for path in remove_stale_saves(root):
        log.warning(f"removed {path}: a save interrupted before its commit (a crash or a kill), never a checkpoint")


def save_training_checkpoint(root: str | Path, step: int, cfg: RunConfig, layout: Layout, engine: Any,
                             module: nn.Module, sampler: DistributedBatchSampler, tracker: TPRNGTracker,
                             tokenizer: Path | None, provenance: dict[str, Any],
                             placement: ClusterReport | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Write ROOT/step_XXXXXXXX on all ranks together (see the checkpoint contract); returns the step dir.

    Node-local (`placement` says which ranks share a node): every node's first rank prepares and commits the
    node's own copy, and the first DP replica of each (TP, PP) position on a node writes the shared files.
    """
    node_local = cfg.parallel.node_local_checkpoints and placement is not None
    copy_ranks = copy_ranks_of(layout, placement if node_local else None)
    leader = layout.rank == copy_ranks[0]
    if leader:
        _remove_stale_saves(root)
    if node_local:
        writer = layout.rank in replica_writers(placement)
        tmp = Path(root) / (TMP_PREFIX + step_dir_name(step))
        if leader:
            begin_checkpoint(root, step)
        _write_model_states(engine, writer)
    else:
        writer = layout.dp_rank == 0
        tmp = _broadcast_path(begin_checkpoint(root, step) if leader else None)
    _barrier()
    client = {CLIENT_KEY: {"step": step, "data": sampler.state_dict(), "rng": rng_state(tracker)}}
    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state=client, save_latest=False)
    if node_local and writer and layout.dp_rank != 0 and is_pipeline(engine):
        _write_pipeline_layers(engine, tmp)
    weights = master_weights(engine, module, cfg.model, layout)  # collective: every DP rank takes part
    if writer:
        save_weight_shard(tmp / weight_file(layout.tp_rank, layout.pp_rank), weights)
    save_optimizer_shard(tmp, engine, module, cfg.model, layout, writer)  # collective over DP, like the masters
    if leader and tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    _barrier()
    final = Path(root) / tmp.name.removeprefix(TMP_PREFIX)
    # collective: every file of the step hashed once, a share per rank; node-local: every node's files merged
    copy_files, every_file = hash_step_files(tmp, copy_ranks, layout.rank)
    if leader:
        weight_files = [weight_file(t, p) for p in range(layout.pp_size) for t in range(layout.tp_size)]
        missing = [rel for rel in weight_files if rel not in every_file]
        if missing:
            raise CheckpointError(f"{tmp}: weight files {missing} were not written")
        manifest = make_manifest(
            cfg.model, step, layout.tp_size, layout.pp_size, dp_size=layout.dp_size,
            zero_stage=cfg.parallel.zero_stage, precision=cfg.train.precision,
            tokenizer="tokenizer.model" if tokenizer is not None else None, data=sampler.state_dict(),
            files={rel: every_file[rel] for rel in weight_files}, deepspeed=DEEPSPEED_TAG, provenance=provenance,
            optimizer=optimizer_record(engine, tmp, layout, every_file),
            other_files={rel: d for rel, d in every_file.items() if rel not in weight_files and not is_optim_file(rel)},
            settings=settings)
        write_manifest(tmp, manifest)
        if node_local:
            copy_files[MANIFEST_NAME] = file_digest(tmp / MANIFEST_NAME)
            write_node_inventory(tmp, placement, layout.rank, step, copy_files)
        final = commit_checkpoint(tmp)
        removed = prune_checkpoints(root, cfg.checkpoint.keep_last)
        if layout.rank == 0:
            log.info(f"saved checkpoint {final}" + (f" (pruned {len(removed)})" if removed else "")
                     + (f" (node-local: one copy per node, {len(placement.nodes)} nodes)" if node_local else ""))
    _barrier()
    return final


TRAINING_ONLY_KEYS = ("dropout", "attention_dropout")  # model options that leave the weights' meaning unchanged


def model_mismatch(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """`key: saved != current` for every architecture field that differs (dropout may change)."""
    return [f"model.{k}: checkpoint {v!r} != run {getattr(current, k)!r}"
            for k, v in vars(saved).items() if k not in TRAINING_ONLY_KEYS and getattr(current, k) != v]


def check_save_root(cfg: RunConfig, start_step: int) -> None:
    """Refuse, before any work, a --save root that holds another model's checkpoints, or a step directory this run
    would write over (checkpoint.overwrite allows both); `start_step` is the step training continues after.

    Resuming into the root it was loaded from writes only later steps, so it passes. With `--load ROOT --save ROOT`
    (a restartable job) a step directory later than `latest` is what a crash left between its rename and the move
    of `latest` (which moves last): not a checkpoint anyone resumed from, so this run may replace it."""
    root = Path(cfg.checkpoint.save) if cfg.checkpoint.save else None
    if root is None or cfg.checkpoint.overwrite or not root.is_dir():
        return
    existing = step_dirs(root)
    if not existing:
        return
    held = read_manifest(root if (root / LATEST_NAME).is_file() else existing[-1][1])
    diffs = model_mismatch(held.model, cfg.model)
    if diffs:
        raise CheckpointError(f"--save {root}: it holds checkpoints of another model (step {held.step}: "
                              f"{model_summary(held.model)}) than this run's ({model_summary(cfg.model)}): "
                              + "; ".join(diffs[:3]) + ". Save elsewhere, or give --overwrite to add this run's "
                              "checkpoints there (and move its `latest` to them)")
    total, every = cfg.train.train_iters, cfg.checkpoint.save_interval

    def saves(step: int) -> bool:  # as train() and run() decide
        return (start_step < step <= total and (step == total or (every > 0 and step % every == 0))) \
            or step == start_step == total == 0

    resumes_latest = bool(cfg.checkpoint.load) and Path(cfg.checkpoint.load).absolute() == root.absolute()
    clash = [path for step, path in existing if saves(step) and not (resumes_latest and step > start_step)]
    if clash:
        raise CheckpointError(f"--save {root}: {clash[0]} exists, and this run would write over it. Save elsewhere, "
                              f"resume from it with --load, or give --overwrite to replace it")


def check_resume(manifest: Manifest, path: Path, cfg: RunConfig, world_size: int) -> None:
    """Refuse to resume a checkpoint of another model or layout (before any work is done)."""
    diffs = model_mismatch(manifest.model, cfg.model)
    if diffs:
        raise CheckpointError(f"--load {path}: the checkpoint holds a different model than this run's config: "
                              + "; ".join(diffs))
    if manifest.deepspeed is None or manifest.optimizer is not None:
        return  # weight-only (fresh optimizer), or optimizer files that resume at any layout (train.state_io)
    tp, pp = cfg.parallel.tp_size, cfg.parallel.pp_size
    want = {"tp_size": tp, "pp_size": pp, "dp_size": world_size // (tp * pp),
            "zero_stage": cfg.parallel.zero_stage, "precision": cfg.train.precision}
    diffs = [f"{k}: checkpoint {manifest.layout.get(k)!r} != run {v!r}" for k, v in want.items()
             if manifest.layout.get(k) != v]
    if diffs:
        raise CheckpointError(f"--load {path}: exact resume needs the layout the checkpoint was saved with: "
                              + "; ".join(diffs) + " (this checkpoint has no optimizer files, so it cannot "
                              "resume at another layout)")


def verify_resume_checkpoint(step_dir: Path, manifest: Manifest, cfg: RunConfig, layout: Layout,
                             placement: ClusterReport | None) -> None:
    """Collective, before anything is loaded or written: every file of the step matches the manifest, and
    DeepSpeed's load without unpickling; raises train.integrity.ResumeRefused on every rank otherwise."""
    node_local = cfg.parallel.node_local_checkpoints and placement is not None
    verify_resume(step_dir, manifest, copy_ranks_of(layout, placement if node_local else None), layout.rank,
                  node_local)


def resume_training_checkpoint(path: str | Path, engine: Any, sampler: DistributedBatchSampler,
                               tracker: TPRNGTracker) -> int:
    """Load DeepSpeed's state (model, optimizer, schedule) and ours (step, data position, RNG); returns the step."""
    step_dir = resolve_checkpoint(path)
    manifest = read_manifest(step_dir)
    install_weights_only_loader(engine)  # DeepSpeed's own loader would unpickle anything
    load_path, client = engine.load_checkpoint(str(step_dir), tag=manifest.deepspeed, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if load_path is None or not client or CLIENT_KEY not in client:
        raise CheckpointError(f"{step_dir / str(manifest.deepspeed)}: DeepSpeed state missing or not written by "
                              f"megaclone training")
    state = client[CLIENT_KEY]
    sampler.load_state_dict(state["data"])
    set_rng_state(state["rng"], tracker)
    # The optimizer's learning rates follow the restored schedule (not the value set at construction).
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    return int(state["step"])


@torch.no_grad()
def load_rank_weights(module: nn.Module, cfg: ModelConfig, layout: Layout,
                      read: Callable[[str, tuple[slice, ...]], torch.Tensor]) -> None:
    """Fill this rank's parameters with their TP slices from `read(name, index)` (a checkpoint or a clone)."""
    specs = spec_table(cfg)
    for name, param in global_named_parameters(module, cfg).items():
        value = read(name, specs[name].tp_slices(layout.tp_rank, layout.tp_size))
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"parameter {name}: got shape {list(value.shape)} for this rank, the model "
                                  f"expects {list(param.shape)}")
        param.copy_(value)
