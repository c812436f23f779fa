"""Depth growth at launch: the launcher builds the converter's tensors bit for bit, logs the method and (for a
method that changes the function) the measured loss change, watches the inserted blocks come alive, and a run
that carries the small run's optimizer across a `zero` growth resumes exactly from its own checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from megaclone.checkpoint import load_full_state, read_manifest
from tests.clone import bit_equal
from tests.train.conftest import ROOT, TINY, SmallRun, launch, metrics


def reshard_main(argv: list[str]) -> int:
    spec = importlib.util.spec_from_file_location("reshard_expand", ROOT / "tools" / "reshard_expand.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_launch_grows_like_the_converter_and_logs_the_loss_change(small_run: SmallRun, tmp_path: Path) -> None:
    grow = ["--hyperclone", "2", "--grow-layers", "4", "--grow-method", "stack"]
    proc = launch(["--init-from", str(small_run.ckpt), *grow, "--train-iters", "0", "--save", str(tmp_path / "launch"),
                   "--run-dir", str(tmp_path), *small_run.data_args()], num_procs=1)
    assert reshard_main(["--input", str(small_run.ckpt), "--output", str(tmp_path / "convert"), *grow, "--tp", "1",
                         "--no-progress"]) == 0
    launched, converted = load_full_state(tmp_path / "launch"), load_full_state(tmp_path / "convert")
    assert launched.keys() == converted.keys() and len([k for k in launched if k.startswith("blocks.3.")]) > 4
    for name, tensor in launched.items():
        assert bit_equal(tensor, converted[name]), name
    assert read_manifest(tmp_path / "launch").provenance["hyperclone"]["depth"]["sources"] == [0, 1, 0, 1]
    (clone,) = metrics(tmp_path, "clone")
    assert clone["grow_method"] == "stack" and abs(clone["loss_change"]) > 1e-3
    assert "hyperclone x2 (ffn x2, groups x2), 2 -> 4 layers by stack: not function-preserving (stack)" in proc.stdout
    (evaluation,) = metrics(tmp_path, "eval")  # the stacked copies add to the stream from the start
    assert evaluation["depth_contribution_block2"] > 0.01 and evaluation["depth_contribution_block3"] > 0.01


def test_zero_growth_with_carry_resumes_exactly(small_run: SmallRun, tmp_path: Path) -> None:
    config = tmp_path / "tiny-no-model.yaml"  # a resume takes the (grown) model from the checkpoint
    config.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(TINY.read_text()).items() if k != "model"}))
    common = ["--config", str(config), "--train-iters", "34", "--tp", "2", *small_run.data_args(),
              "train.eval_interval=2", "train.log_interval=1"]
    launch(["--init-from", str(small_run.ckpt), "--grow-layers", "3", "--hyperclone-optimizer", "carry",
            "--save", str(tmp_path / "ckpt"), "--run-dir", str(tmp_path / "full"), *common,
            "checkpoint.save_interval=2"])
    (clone,) = metrics(tmp_path / "full", "clone")
    assert clone["optimizer"] == "carry" and clone["grow_method"] == "zero" and clone["depth"]["inserted"] == [2]
    assert clone["preservation_rel_error"] <= 1e-5
    evals = {e["step"]: e for e in metrics(tmp_path / "full", "eval")}
    assert sorted(evals) == [30, 32, 34]
    assert evals[30]["depth_contribution_block2"] == 0.0  # an identity block at the widening ...
    assert evals[34]["depth_contribution_block2"] > 1e-4  # ... whose output projections have started to learn
    launch(["--load", str(tmp_path / "ckpt" / "step_00000032"), "--run-dir", str(tmp_path / "resumed"), *common])
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full", "train")}
    resumed = {r["step"]: r["loss"] for r in metrics(tmp_path / "resumed", "train")}
    assert sorted(full) == [31, 32, 33, 34] and sorted(resumed) == [33, 34]
    assert all(resumed[s] == full[s] for s in resumed)  # bit for bit: DeepSpeed's own state, same layout
