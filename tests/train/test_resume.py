"""`--load` as an operator meets it: a requeued job that repeats its first command line, and a checkpoint that was
tampered with or damaged.

- Auto-resume: `--save R --load R` on a root with nothing committed (only an interrupted save) starts from scratch
  with a warning and cleans the stale `.tmp-step_*` at its first save; the same command after a crash resumes the
  last complete step bit-exact.
- A launch on a checkpoint whose model states carry a pickle payload (digests forged) and whose other model-states
  file is truncated exits 2 before any step, naming both files, the refused type and the previous complete step;
  the payload's marker file is never created and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import resolve_checkpoint
from megaclone.train.cli import build_plan, parse_args
from megaclone.train.safe_load import load_torch_file
from tests.train.conftest import TINY, SmallRun, launch, losses
from tests.train.test_integrity import Payload

STALE = ".tmp-step_00000002"


def plan(argv: list[str]):
    return build_plan(parse_args(["--config", str(TINY), *argv]), 1)


def test_load_of_a_root_with_nothing_committed_starts_from_scratch(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    p = plan(["--save", str(root), "--load", str(root)])  # the first start of a requeued job: no root yet
    assert p.resume is None and p.cfg.checkpoint.load is None
    assert [w for w in p.warnings if "starting from scratch" in w] == [
        f"--load {root}: no complete checkpoint there yet: starting from scratch"]
    (root / STALE).mkdir(parents=True)  # it died during its first save
    p = plan(["--save", str(root), "--load", str(root)])
    assert p.resume is None
    assert f"--load {root}: no complete checkpoint there yet (only interrupted saves: {STALE}): starting from " \
           "scratch" in p.warnings
    assert any(w.startswith(f"{root / STALE}: a save interrupted before its commit") for w in p.warnings)
    assert (root / STALE).is_dir()  # planning writes nothing; the first save removes it
    with pytest.raises(ValueError, match=r"the model must come from --config"):
        build_plan(parse_args(["--save", str(root), "--load", str(root)]), 1)
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path / 'typo'} does not exist"):
        plan(["--save", str(root), "--load", str(tmp_path / "typo")])  # a missing --load other than --save


def _requeued(small_run: SmallRun, root: Path, run_dir: Path) -> str:
    """The command a Slurm requeue repeats: --save and --load on the same root, 4 steps, a checkpoint every 2."""
    proc = launch(["--config", str(TINY), "--save", str(root), "--load", str(root), "--run-dir", str(run_dir),
                   "--train-iters", "4", *small_run.data_args(), "checkpoint.save_interval=2",
                   "train.eval_interval=0", "train.log_interval=1"], num_procs=1)
    return proc.stdout + proc.stderr


def test_requeued_job_starts_then_resumes_with_the_same_command(small_run: SmallRun, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    (root / STALE).mkdir(parents=True)
    (root / STALE / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    out = _requeued(small_run, root, tmp_path / "first")
    assert "no complete checkpoint there yet (only interrupted saves: .tmp-step_00000002): starting from scratch" in out
    assert f"removed {root / STALE}: a save interrupted before its commit" in out
    first = losses(tmp_path / "first")
    assert sorted(first) == [1, 2, 3, 4] and resolve_checkpoint(root).name == "step_00000004"
    # Killed during the save of step 4: step 2 is the last complete one, and a stale .tmp-step_00000004 is left.
    shutil.rmtree(root / "step_00000004")
    (root / "latest").write_text("step_00000002\n")
    (root / ".tmp-step_00000004").mkdir()
    out = _requeued(small_run, root, tmp_path / "again")
    assert f"resumed from {root / 'step_00000002'} at step 2" in out
    assert losses(tmp_path / "again") == {3: first[3], 4: first[4]}  # bit-exact
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_tampered_checkpoint_is_refused_before_any_step(small_run: SmallRun, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(small_run.ckpt, ckpt)
    step_dir, marker = resolve_checkpoint(ckpt), tmp_path / "payload-ran"
    evil, cut = (step_dir / "deepspeed" / f"mp_rank_0{tp}_model_states.pt" for tp in (0, 1))
    state = load_torch_file(evil)  # our own fixture's file (DeepSpeed's types only)
    state["payload"] = Payload(marker)
    torch.save(state, evil)
    manifest = json.loads((step_dir / "manifest.json").read_text())  # forged to match, as an attacker would
    data = evil.read_bytes()
    manifest["other_files"]["deepspeed/mp_rank_00_model_states.pt"] = {
        "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    cut.write_bytes(cut.read_bytes()[:1000])
    run_dir, save = tmp_path / "run", tmp_path / "save"
    proc = launch(["--load", str(ckpt), "--tp", "2", "--run-dir", str(run_dir), "--save", str(save),
                   "--train-iters", "40", *small_run.data_args()], check=False)
    err = proc.stderr
    assert proc.returncode == 2, (proc.stdout + err)[-4000:]
    assert f"pretrain.py: error: --load: checkpoint {step_dir} refused before anything was loaded" in err
    assert f"{evil}: refused to load: it needs the type io.open" in err
    assert f"{cut}: 1000 bytes, the manifest records" in err
    assert f"The previous complete checkpoint is {ckpt / 'step_00000015'}" in err
    assert "Traceback" not in proc.stdout + err and err.count("pretrain.py: error:") == 1  # rank 0 says it once
    assert not marker.exists() and not run_dir.exists() and not save.exists()
