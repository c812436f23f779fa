"""Resuming a --hyperclone-optimizer carry run from its own checkpoints: the same carry groups and schedule.

One carry launch (x2 from the small run, with an lr transition to the run's schedule restarted at the widening,
still under way at the resume point) trains and saves (TP 2, DP 1); its first checkpoint is resumed at the same
layout (DeepSpeed's exact path: bit for bit) and at TP 1, DP 2 (the layout-free path: within 1e-6), against the
uninterrupted run's losses.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from megaclone.checkpoint import read_manifest, resolve_checkpoint
from megaclone.config import ConfigError, RunConfig, TrainConfig
from megaclone.train.carry import carry_resume_settings, restarted
from megaclone.train.optim import lr_factor
from tests.train.conftest import TINY, launch, metrics

SOURCE_STEP, END, TRANSITION = 30, 38, 6  # small_run ends at step 30; the transition ends at step 36


def test_carry_run_resumes_exactly_at_the_same_layout_and_at_another(small_run, tmp_path) -> None:
    config = tmp_path / "tiny-no-model.yaml"  # a resume takes the (wide) model from the checkpoint
    config.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(TINY.read_text()).items() if k != "model"}))
    common = ["--config", str(config), "--train-iters", str(END), *small_run.data_args(), "train.eval_interval=100"]
    wide_batch = "train.grad_accum_steps=2"  # DP 1 x accum 2 = DP 2 x accum 1: the same global batch, same order
    launch(["--init-from", str(small_run.ckpt), "--hyperclone", "2", "--hyperclone-optimizer", "carry",
            "--hyperclone-lr-transition", str(TRANSITION), "--hyperclone-schedule", "restart", "--tp", "2",
            "--save", str(tmp_path / "ckpt"),
            "--run-dir", str(tmp_path / "full"), *common, wide_batch, "checkpoint.save_interval=2"])
    step_dir = sorted((tmp_path / "ckpt").glob("step_*"))[0]
    manifest = read_manifest(step_dir)
    resume_step = manifest.step
    assert SOURCE_STEP < resume_step < SOURCE_STEP + TRANSITION  # the transition is under way: its start matters

    settings = carry_resume_settings(manifest, step_dir, RunConfig())
    assert (settings.clone.factor, settings.clone.lr_transition, settings.clone_step) == (2, TRANSITION, SOURCE_STEP)
    small_lr = read_manifest(resolve_checkpoint(small_run.ckpt)).optimizer["scheduler"]["last_lr"][0]
    assert settings.clone.schedule == "restart" and settings.start_lr == small_lr
    assert settings.small.hidden_size * 2 == manifest.model.hidden_size
    with pytest.raises(ConfigError, match="zero_stage=3"):
        cfg = RunConfig()
        cfg.parallel.zero_stage = 3
        carry_resume_settings(manifest, step_dir, cfg)
    broken = dict(manifest.provenance["hyperclone"], source_model={**manifest.provenance["hyperclone"]
                                                                   ["source_model"], "hidden_size": 48})
    with pytest.raises(ConfigError, match="is not the checkpoint's model"):
        carry_resume_settings(dataclasses.replace(manifest, provenance={"hyperclone": broken}), step_dir, RunConfig())

    proc = launch(["--load", str(step_dir), "--tp", "2", "--run-dir", str(tmp_path / "exact"), *common, wide_batch])
    assert "exact: DeepSpeed's own state" in proc.stdout + proc.stderr
    proc = launch(["--load", str(step_dir), "--tp", "1", "--run-dir", str(tmp_path / "elastic"), *common])
    assert "layout-free path" in proc.stdout + proc.stderr

    full = {r["step"]: r for r in metrics(tmp_path / "full", "train")}
    exact = {r["step"]: r for r in metrics(tmp_path / "exact", "train")}
    elastic = {r["step"]: r for r in metrics(tmp_path / "elastic", "train")}
    steps = list(range(resume_step + 1, END + 1))
    assert sorted(exact) == sorted(elastic) == steps
    for step in steps:
        assert exact[step]["loss"] == full[step]["loss"], step  # bit for bit
        assert exact[step]["lr"] == full[step]["lr"] and exact[step]["grad_norm"] == full[step]["grad_norm"], step
        assert elastic[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=0), step
        assert elastic[step]["lr"] == pytest.approx(full[step]["lr"], rel=1e-12), step
    assert full[resume_step + 1]["lr"] != full[resume_step + 2]["lr"]  # the schedule moves across the window
    train = TrainConfig(**yaml.safe_load(TINY.read_text())["train"])
    own = lr_factor(restarted(dataclasses.replace(train, train_iters=END), SOURCE_STEP))
    assert full[SOURCE_STEP + 1]["lr"] == pytest.approx(small_lr, rel=1e-12)  # the small run's next lr
    for step in range(SOURCE_STEP + TRANSITION + 1, END + 1):  # after the transition: the restarted schedule
        assert full[step]["lr"] == pytest.approx(train.lr * own(step - 1 - SOURCE_STEP), rel=1e-12), step
