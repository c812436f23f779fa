"""Pretraining on DeepSpeed: the run plan (cli), the engine (engine, optim), the loop, checkpoints and
launch-time HyperCloning. `launch/pretrain.py` calls `megaclone.train.run.main`.

    cli            parse flags, build and validate the whole run before any work
    settings       where each setting comes from; what a checkpoint records for the runs that start from it
    dataset        token shards, tokenizer and per-DP-rank samplers
    engine, optim  GPT or pipeline module, AdamW groups, schedule, deepspeed.initialize, fp32 masters
    carry          a widened run's optimizer in the small model's units (groups, schedule, clipping)
    loop           train step, evaluation, logging, periodic checkpoints
    checkpointing  save / exact resume in the megaclone checkpoint format
    state_io       optimizer state into and out of DeepSpeed: elastic resume, the carried launch
    integrity      every file's sha256: hashed in parallel at save, verified in parallel before a resume
    safe_load      DeepSpeed's state files loaded with weights_only=True (its own types allowed by name)
    cloning        widened per-rank slices, preservation check, symmetry monitor
    report         a widening's summary and held-out loss plot, from the two runs' metrics
"""

from megaclone.train.cli import RunPlan, build_plan, parse_args
from megaclone.train.logging import MetricsLogger, read_metrics

__all__ = ["MetricsLogger", "RunPlan", "build_plan", "parse_args", "read_metrics"]
