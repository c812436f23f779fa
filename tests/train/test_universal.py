"""DeepSpeed's own `ds_to_universal` converts megaclone's training checkpoints as they are (issue 20, item 4).

Every checkpoint carries the metadata the tool asks for (`universal_checkpoint_info`, from the spec table), so it
runs in its strict mode without `--inject_missing_state`, and the TP=2 slices it merges are the full fp32
weights that megaclone's own safetensors files hold: norms and row-parallel biases taken once, row-parallel
weights joined along their input axis, every other split tensor along dim 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from megaclone.checkpoint import load_full_state, read_manifest
from megaclone.spec import build_param_specs
from tests.train.conftest import ROOT, SmallRun


def test_ds_to_universal_merges_the_tp_slices_into_our_weights(small_run: SmallRun, tmp_path: Path) -> None:
    step = small_run.ckpt / "step_00000030"
    manifest = read_manifest(step)
    assert manifest.layout["tp_size"] == 2
    done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(step / manifest.deepspeed), "--output_folder", str(tmp_path / "universal"),
                           "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    full = load_full_state(step)
    specs = build_param_specs(manifest.model)
    assert {s.tp_axis for s in specs} == {None, 0, 1}  # replicated, column- and row-parallel all checked
    for spec in specs:
        folder = tmp_path / "universal" / "zero" / spec.name
        merged = torch.load(folder / "fp32.pt", weights_only=True)["param"]
        assert torch.equal(merged, full[spec.name]), spec.name
        moments = [torch.load(folder / f"{k}.pt", weights_only=True)["param"] for k in ("exp_avg", "exp_avg_sq")]
        assert all(m.shape == full[spec.name].shape for m in moments), spec.name
