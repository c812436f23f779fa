"""HyperCloning at launch: each rank widens its own slice of the small checkpoint, the run checks that the
wide model computes the small one's function, trains at ZeRO-1/2/3 and PP=2, and watches symmetry breaking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import load_model, read_manifest
from tests.train.conftest import TINY, SmallRun, launch, metrics

TOLERANCE = 1e-4


def clone_launch(small_run: SmallRun, run_dir: Path, *args: str) -> tuple[dict, list[dict], str]:
    """A 15-step cloned run (x2) of the session's small checkpoint; returns its clone record, evals and output."""
    proc = launch(["--init-from", str(small_run.ckpt), "--hyperclone", "2", "--config", TINY, "--run-dir",
                   str(run_dir), "--train-iters", "15", *args, *small_run.data_args(), "train.lr=1e-3",
                   "train.eval_interval=5"])
    (clone,) = metrics(run_dir, "clone")
    evals = metrics(run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 5, 10, 15], proc.stdout[-3000:]
    assert clone["preservation_rel_error"] <= TOLERANCE
    assert clone["wide_loss"] == pytest.approx(clone["small_loss"], rel=1e-5)
    return clone, evals, proc.stdout + proc.stderr


def _trains(evals: list[dict]) -> bool:
    return evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.02


def test_zero1_with_noise_breaks_symmetry(small_run: SmallRun, tmp_path: Path) -> None:
    clone, evals, _ = clone_launch(small_run, tmp_path, "--zero-stage", "1", "--clone-noise-db", "10")
    assert _trains(evals), evals
    assert clone["noise_db"] == 10 and clone["factor"] == 2
    assert all(e["clone_similarity"] < 0.99 for e in evals)  # the copies differ from the start


def test_zero2_without_noise_stays_symmetric(small_run: SmallRun, tmp_path: Path) -> None:
    clone, evals, output = clone_launch(small_run, tmp_path, "--zero-stage", "2", "--clone-variant", "symmetric",
                                        "--clone-noise-db", "none")
    assert _trains(evals), evals
    assert "cloned run without symmetry breaking" in output
    assert all(e["clone_similarity_min"] > 1 - 1e-6 for e in evals)  # a small model in disguise


def test_zero3_checkpoint_holds_the_trained_wide_model(small_run: SmallRun, tmp_path: Path) -> None:
    clone, evals, _ = clone_launch(small_run, tmp_path, "--zero-stage", "3", "--clone-noise-db", "20",
                                "--save", str(tmp_path / "ckpt"))
    assert _trains(evals), evals
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest.model.hidden_size == 128 and manifest.layout["zero_stage"] == 3
    assert manifest.provenance["hyperclone"]["source"] == str((small_run.ckpt / "step_00000030").resolve())
    model, cfg = load_model(tmp_path / "ckpt")
    assert cfg.num_heads == 8 and cfg.ffn_size == 512


def test_pp2_zero1_clone(small_run: SmallRun, tmp_path: Path) -> None:
    clone, evals, _ = clone_launch(small_run, tmp_path, "--pp", "2", "--zero-stage", "1", "--clone-noise-db", "10")
    assert _trains(evals), evals
    assert all(e["clone_similarity"] < 0.99 for e in evals)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@torch.no_grad()
def test_train_iters_0_writes_widened_checkpoint(small_run: SmallRun, tmp_path: Path, precision: str) -> None:
    """Plain `python launch/pretrain.py`. In bf16 the saved weights are the engine's fp32 masters, so they too
    must be the exact widened fp32 weights (a bf16 rounding would miss the tolerance by orders of magnitude)."""
    save = tmp_path / "wide"
    launch(["--init-from", str(small_run.ckpt), "--hyperclone", "2", "--train-iters", "0", "--save", str(save),
            "--run-dir", str(tmp_path), *small_run.data_args(), f"train.precision={precision}"], num_procs=1)
    manifest = read_manifest(save)
    assert manifest.step == 0 and manifest.model.hidden_size == 128 and manifest.layout["precision"] == precision
    record = manifest.provenance["hyperclone"]  # --hyperclone alone: the measured defaults
    assert (record["factor"], record["variant"], record["noise_db"]) == (2, "diagonal", 0.0)
    wide, _ = load_model(save)
    small, _ = load_model(small_run.ckpt)
    tokens = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    want = small(tokens)
    assert (wide(tokens) - want).abs().max() <= 1e-5 * want.abs().max()
    assert (save / "step_00000000" / "tokenizer.model").read_bytes() == \
        (small_run.ckpt / "step_00000030" / "tokenizer.model").read_bytes()
    (clone,) = metrics(tmp_path, "clone")
    if precision == "bf16":  # the engine computes in bf16: close, but not fp32-close
        assert 1e-5 < clone["preservation_rel_error"] < 5e-2
    else:
        assert clone["preservation_rel_error"] <= 1e-5


def test_fresh_clone_reads_on_from_the_small_runs_data_position(small_run: SmallRun, tmp_path: Path) -> None:
    """`--hyperclone-data continue`: the widened model (noise-free, so the small one's function) sees on its first
    step the batch the small run trained on after its checkpoint, so its loss is the small run's loss there.
    The default of a fresh optimizer restarts the corpus: another batch, another loss."""
    source = small_run.ckpt / "step_00000015"
    small = {r["step"]: r["loss"] for r in metrics(small_run.run_dir, "train")}

    def first_loss(run_dir: Path, *args: str) -> float:
        launch(["--init-from", str(source), "--hyperclone", "2", "--clone-noise-db", "none", "--config", TINY,
                "--run-dir", str(run_dir), "--train-iters", "1", *args, *small_run.data_args(),
                "train.eval_interval=0"], num_procs=1)
        (record,) = metrics(run_dir, "train")
        assert record["step"] == 1
        return record["loss"]

    assert first_loss(tmp_path / "continue", "--hyperclone-data", "continue") == pytest.approx(small[16], rel=1e-5)
    assert abs(first_loss(tmp_path / "restart") - small[16]) > 1e-3
