"""The model and its DeepSpeed engine: `GPT` for PP=1, the `PipelineModule` for PP>1.

Parallelism is applied from outside the model: the layout decides which module is built, the spec
table initialises it, and DeepSpeed wraps it with ZeRO, clipping, accumulation and the schedule.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from megaclone.config import ModelConfig, RunConfig
from megaclone.model import GPT, build_pipeline_module, global_named_parameters, init_params
from megaclone.model.pipeline import global_to_pipeline_name
from megaclone.parallel import Layout, TPRNGTracker
from megaclone.spec import build_param_specs
from megaclone.train.optim import build_lr_scheduler, build_optimizer
from megaclone.train.zero_fast import (
    install_engine_shortcuts,
    install_grad_norm,
    skip_muon_import,
    skip_single_rank_all_reduce,
)

log = logging.getLogger("megaclone.train")

UNIVERSAL_CHECKPOINT_VERSION = 0.4  # the ds_to_universal metadata format these patterns follow (DeepSpeed 0.19)


def build_deepspeed_config(cfg: RunConfig, layout: Layout, device: torch.device | None = None) -> dict[str, Any]:
    """DeepSpeed's JSON config from our dataclasses (no presets to keep in sync).

    `device` is where the engine trains (default: where `device_for` puts it). Off CUDA, ZeRO's contiguous
    gradient buffer is turned off: it guards big GPU models against memory fragmentation, and on CPU it is one
    more copy of every gradient per step (docs/performance.md, "CPU training throughput").
    """
    train = cfg.train
    zero: dict[str, Any] = {"stage": cfg.parallel.zero_stage}
    if not (torch.cuda.is_available() if device is None else device.type == "cuda"):
        zero["contiguous_gradients"] = False
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * layout.dp_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW under ZeRO
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
        "dump_state": False,
        "checkpoint": {"use_node_local_storage": cfg.parallel.node_local_checkpoints},
    }


def universal_checkpoint_info(cfg: ModelConfig, pipeline: bool) -> dict[str, Any]:
    """How DeepSpeed's `ds_to_universal` must merge our TP slices, from the spec table (saved with every checkpoint).

    Parameters that TP does not split (norms, row-parallel biases, learned positions) are replicated; those split
    on their input axis (row-parallel weights) are concatenated along dim 1; every other split parameter along
    dim 0, DeepSpeed's default, which is right since a TP shard is a contiguous range of whole units (qkv groups,
    the unit-interleaved SwiGLU rows, vocabulary rows). The padded vocabulary rows are kept (the universal
    checkpoint loads back into the same model). Patterns are regexes over the engine's own parameter names:
    global names for `GPT`, DeepSpeed's per-layer names for the pipeline module, with the block index generic.
    """
    replicated, row_parallel = [], []
    for spec in build_param_specs(cfg):
        if spec.tp_axis not in (None, 1):
            continue
        name = global_to_pipeline_name(cfg, spec.name, spec.layer) if pipeline else spec.name
        pattern = re.escape(name) + "$"
        if 1 <= spec.layer <= cfg.num_layers:  # a block: one pattern for all blocks
            index = str(spec.layer) if pipeline else f"blocks\\.{spec.layer - 1}"
            pattern = pattern.replace(index, "blocks\\.\\d+" if not pipeline else "\\d+", 1)
        (replicated if spec.tp_axis is None else row_parallel).append(pattern)
    tied = [re.escape(global_to_pipeline_name(cfg, "embedding.word.weight", 0)) + "$"] \
        if pipeline and cfg.tied_embeddings else []  # on the first and the last stage: DeepSpeed reads the first
    return {"universal_checkpoint_version": UNIVERSAL_CHECKPOINT_VERSION,
            "tp_replicated_parameter_patterns": sorted(set(replicated)),
            "parameter_with_row_parallelism_patterns": sorted(set(row_parallel)),
            "pipeline_replicated_parameter_patterns": tied}


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def build_model(cfg: RunConfig, layout: Layout, rng: TPRNGTracker, init: bool = True) -> nn.Module:
    """This rank's part of the model (whole GPT or one pipeline stage) in fp32, initialised from the spec
    table (layout-invariant), or left for the caller to fill (`init=False`: a checkpoint or a clone)."""
    model_cfg = cfg.model
    module = GPT(model_cfg, layout.tp, rng) if layout.pp_size == 1 else build_pipeline_module(model_cfg, layout, rng)
    if init:
        init_params(global_named_parameters(module, model_cfg), model_cfg, cfg.train.seed, layout.tp_rank,
                    layout.tp_size)
    return module


def build_engine(cfg: RunConfig, layout: Layout, module: nn.Module, device: torch.device) -> Any:
    """`deepspeed.initialize` with our AdamW groups and schedule; returns the engine.

    PP=1 passes the layout as DeepSpeed's `mpu` (data-parallel groups, TP-aware clipping); the
    pipeline module carries its own topology.
    """
    module.to(device)
    params = global_named_parameters(module, cfg.model)
    engine = initialize_engine(cfg, layout, module, build_optimizer(params, cfg.model, cfg.train),
                               build_lr_scheduler(cfg.train), device)
    install_grad_norm(engine)
    return engine


def initialize_engine(cfg: RunConfig, layout: Layout, module: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler: Callable, device: torch.device) -> Any:
    """`deepspeed.initialize` of `module` (already on `device`) with our optimizer and schedule; shared by the
    plain and the carry engines."""
    import deepspeed

    skip_single_rank_all_reduce()
    skip_muon_import()
    # DeepSpeed saves this module attribute into every checkpoint, where ds_to_universal looks for it
    module.universal_checkpoint_info = universal_checkpoint_info(cfg.model, layout.pp_size > 1)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=build_deepspeed_config(cfg, layout, device),
        mpu=layout if layout.pp_size == 1 else None)
    shortcuts = install_engine_shortcuts(engine)
    if shortcuts:
        log.info("ZeRO step shortcuts that change no number (megaclone.train.zero_fast): %s", ", ".join(shortcuts))
    return engine


def is_pipeline(engine: Any) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def current_lr(engine: Any) -> float:
    return float(engine.lr_scheduler.get_last_lr()[0])


def _flat_master_views(optimizer: Any) -> dict[int, torch.Tensor]:
    """id(param) -> its fp32 master under DeepSpeed's FP16 optimizers (what bf16 with ZeRO-0 uses): the fused
    one keeps a flat fp32 copy per group in parameter order, the unfused one a list per group. Empty for
    every other optimizer (ZeRO and the bf16 optimizer link their masters to the parameters instead)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    views = {}
    if isinstance(optimizer, FP16_Optimizer):
        for group, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            offset = 0
            for p in group:
                views[id(p)] = flat.data[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
    elif isinstance(optimizer, FP16_UnfusedOptimizer):
        for group, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            views.update({id(p): master.data for p, master in zip(group, masters)})
    return views


def fp32_masters(engine: Any, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of the fp32 master weights of `params` (TP-local).

    Collective over the DP group under ZeRO or bf16: every rank of the group must call it with the same
    parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    views = _flat_master_views(getattr(engine, "optimizer", None))
    out = {}
    for name, param in params.items():
        value = views.get(id(param))
        if value is None:
            value = safe_get_full_fp32_param(param)
        out[name] = (param.detach() if value is None else value).float().cpu().clone()
    return out


@torch.no_grad()
def set_fp32_masters(engine: Any, params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    """Overwrite the fp32 masters of `params` with exact fp32 values and refresh the bf16 working copies.

    DeepSpeed casts the module to bf16 before it creates its masters, so fp32 values loaded before
    `initialize` would be rounded (docs/design.md, "DeepSpeed on CPU").
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    views = _flat_master_views(engine.optimizer)
    for name, param in params.items():
        value = values[name].to(param.device)
        if id(param) in views:  # FP16_Optimizer: master view, and the working copy directly
            views[id(param)].copy_(value)
            param.data.copy_(value.to(param.dtype))
        else:
            safe_set_full_fp32_param(param, value)
    if views:
        return
    if hasattr(engine.optimizer, "update_lp_params"):  # ZeRO-1/2 and the bf16 optimizer
        engine.optimizer.update_lp_params()
    elif any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3: refresh the partitioned bf16 copies
        for name, param in params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.data.copy_(values[name].to(param.device, param.dtype))
