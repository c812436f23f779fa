"""--save refuses, before any work, a root that holds another model's checkpoints (naming both models) or a step
directory the run would write over, unless --overwrite; resuming into the root it was loaded from still works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaclone.checkpoint import CheckpointError, write_weights_checkpoint
from megaclone.config import ModelConfig
from megaclone.model import ReferenceGPT, init_params
from megaclone.train.cli import build_plan, parse_args

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
TINY_MODEL = ModelConfig(vocab_size=512, vocab_multiple=64, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64)


def plan(argv: list[str], tmp_path: Path):
    return build_plan(parse_args(["--config", TINY, "--run-dir", str(tmp_path / "run"), *argv]), 1)


def _save(root: Path, cfg: ModelConfig, step: int, resumable: bool = False) -> Path:
    """A checkpoint of `cfg` at `step`; `resumable`: its manifest says it holds DeepSpeed's state at tiny.yaml's
    single-process layout (enough for planning, which reads only the manifest)."""
    model = ReferenceGPT(cfg)
    init_params(dict(model.named_parameters()), cfg, seed=0)
    step_dir = write_weights_checkpoint(root, cfg, {n: p.detach() for n, p in model.named_parameters()}, tp_size=1,
                                        pp_size=1, step=step)
    if resumable:
        manifest = json.loads((step_dir / "manifest.json").read_text())
        manifest["deepspeed"] = "deepspeed"
        manifest["layout"]["zero_stage"] = 1
        (step_dir / "manifest.json").write_text(json.dumps(manifest))
    return step_dir


def test_a_root_of_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _save(root, ModelConfig(vocab_size=512, vocab_multiple=64, hidden_size=32, num_layers=3, num_heads=4), step=5)
    with pytest.raises(CheckpointError, match=rf"--save {root}: it holds checkpoints of another model \(step 5: "
                                              r"hidden 32, 3 layers, .*\) than this run's \(hidden 64, 2 layers, .*\): "
                                              r"model.hidden_size: checkpoint 32 != run 64"):
        plan(["--save", str(root)], tmp_path)
    assert not (tmp_path / "run").exists()
    assert plan(["--save", str(root), "--overwrite"], tmp_path).cfg.checkpoint.overwrite


def test_an_existing_step_directory_is_not_written_over(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _save(root, TINY_MODEL, step=30)  # tiny.yaml trains 30 steps and saves at the end: the same step
    with pytest.raises(CheckpointError, match=rf"--save {root}: {root / 'step_00000030'} exists, and this run would "
                                              "write over it"):
        plan(["--save", str(root)], tmp_path)
    plan(["--save", str(root), "--overwrite"], tmp_path)
    plan(["--save", str(root), "--train-iters", "40"], tmp_path)  # the same model, a step it does not hold
    with pytest.raises(CheckpointError, match="step_00000030 exists"):  # saved every 10 steps: 10, 20, 30, 40
        plan(["--save", str(root), "--train-iters", "40", "--set", "checkpoint.save_interval=10"], tmp_path)


def test_resuming_into_the_same_root_writes_only_later_steps(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    _save(root, TINY_MODEL, step=10, resumable=True)
    later = _save(root, TINY_MODEL, step=20, resumable=True)
    p = plan(["--load", str(root), "--save", str(root), "--train-iters", "40", "--set",
              "checkpoint.save_interval=10"], tmp_path)
    assert (p.resume_path, p.start_step) == (later, 20)
    with pytest.raises(CheckpointError, match="step_00000020 exists"):  # from step 10 again: step 20 would be replaced
        plan(["--load", str(root / "step_00000010"), "--save", str(root), "--train-iters", "40", "--set",
              "checkpoint.save_interval=10"], tmp_path)


def test_a_restartable_job_replaces_what_a_crash_left_after_latest(tmp_path: Path) -> None:
    """`--load ROOT --save ROOT`: a step directory later than `latest` was never committed (latest moves last)."""
    root = tmp_path / "ckpt"
    _save(root, TINY_MODEL, step=10, resumable=True)
    _save(root, TINY_MODEL, step=20, resumable=True)
    (root / "latest").write_text("step_00000010\n")  # a crash between step 20's rename and the move of latest
    argv = ["--save", str(root), "--train-iters", "40", "--set", "checkpoint.save_interval=10"]
    assert plan(["--load", str(root), *argv], tmp_path).start_step == 10
    with pytest.raises(CheckpointError, match="step_00000020 exists"):  # an explicit step: the user's choice
        plan(["--load", str(root / "step_00000010"), *argv], tmp_path)
