"""Real `deepspeed --num_gpus 2 launch/pretrain.py` runs on CPU: TP=2 and DP=2 ZeRO-2 training, checkpoints
that `load_model` reads back, and a resumed run that repeats the uninterrupted one bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import load_model, read_manifest
from megaclone.data import PackedSequenceDataset, TokenShard
from megaclone.train.dataset import eval_batches
from tests.train.conftest import TINY, SmallRun, launch, losses, metrics


def _decreasing(curve: dict[int, float], margin: float) -> bool:
    values = [curve[s] for s in sorted(curve)]
    return sum(values[:5]) / 5 - sum(values[-5:]) / 5 > margin


@torch.no_grad()
def recomputed_eval_loss(ckpt: Path, data_prefix: Path, dp_size: int) -> float:
    """The run's held-out loss recomputed in one process from the checkpoint: the same batches on every DP rank."""
    model, cfg = load_model(ckpt)
    valid = PackedSequenceDataset(TokenShard.open(data_prefix, "valid"), 64)
    per_rank = [torch.stack([model(t, y) for t, y in eval_batches(valid, 4, 2, r, dp_size, seed=1234)]).mean()
                for r in range(dp_size)]
    return torch.stack(per_rank).mean().item()


def test_tp2_trains_and_checkpoints(small_run: SmallRun) -> None:
    curve = losses(small_run.run_dir)
    assert sorted(curve) == list(range(1, 31))
    assert _decreasing(curve, margin=0.5), curve
    (start,) = metrics(small_run.run_dir, "start")
    assert start["layout"] == {"tp_size": 2, "pp_size": 1, "dp_size": 1, "zero_stage": 1, "precision": "fp32"}
    assert start["config"]["model"]["vocab_size"] == 512  # from the tokenizer trained on the default corpus
    steps = metrics(small_run.run_dir, "train")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time"} <= steps[0].keys()
    assert [r["lr"] for r in steps[:5]] == pytest.approx([3e-3 * k / 5 for k in range(1, 6)])  # warmup
    assert steps[-1]["lr"] < steps[10]["lr"] and all(r["grad_norm"] > 0 for r in steps)
    manifest = read_manifest(small_run.ckpt)
    assert manifest.step == 30 and manifest.layout["tp_size"] == 2 and manifest.deepspeed == "deepspeed"
    assert sorted(manifest.files) == ["weights/tp00-pp00.safetensors", "weights/tp01-pp00.safetensors"]
    assert (small_run.ckpt / "step_00000015" / "manifest.json").is_file()
    assert manifest.data["consumed_samples"] == 30 * 4
    final = metrics(small_run.run_dir, "eval")[-1]
    assert final["step"] == 30
    recomputed = recomputed_eval_loss(small_run.ckpt, small_run.data_prefix, dp_size=1)
    assert abs(recomputed - final["eval_loss"]) <= 1e-5 * final["eval_loss"]
    # The eval at step 15 came from other weights: the checkpoint really is the final model.
    assert abs(recomputed - metrics(small_run.run_dir, "eval")[0]["eval_loss"]) > 1e-3


def test_dp2_zero2_trains_and_resumes_exactly(small_run: SmallRun, tmp_path: Path) -> None:
    common = ["--config", TINY, "--zero-stage", "2", "--train-iters", "20", *small_run.data_args(),
              "checkpoint.save_interval=10", "model.dropout=0.1", "model.attention_dropout=0.1", "train.log_interval=5"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch([*common, "--run-dir", str(full), "--save", str(full / "ckpt")])
    curve = losses(full)
    assert _decreasing(curve, margin=0.3), curve
    manifest = read_manifest(full / "ckpt")
    assert (manifest.layout["dp_size"], manifest.layout["zero_stage"]) == (2, 2)
    assert manifest.data["consumed_samples"] == 20 * 4 * 2  # both DP ranks read their own micro-batches
    final = metrics(full, "eval")[-1]["eval_loss"]
    assert abs(recomputed_eval_loss(full / "ckpt", small_run.data_prefix, dp_size=2) - final) <= 1e-5 * final

    launch([*common, "--run-dir", str(resumed), "--save", str(resumed / "ckpt"),
            "--load", str(full / "ckpt" / "step_00000010")])
    again = losses(resumed)
    assert sorted(again) == list(range(11, 21))
    assert again == {s: curve[s] for s in range(11, 21)}  # bit for bit, dropout included
    grad_norms = [{r["step"]: r["grad_norm"] for r in metrics(d, "train") if r["step"] > 10} for d in (full, resumed)]
    assert grad_norms[0] == grad_norms[1]
    assert metrics(resumed, "eval")[-1]["eval_loss"] == final
    # The final fp32 master weights are identical files.
    files = [json.loads((d / "ckpt" / "step_00000020" / "manifest.json").read_text())["files"] for d in (full, resumed)]
    assert files[0] == files[1]
