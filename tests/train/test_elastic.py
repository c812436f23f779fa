"""Elastic resume: a checkpoint saved at DP=4 continues at another DP size, ZeRO stage and TP degree with the
next losses of the uninterrupted run (fp32, CPU), through the optimizer-state files and train.state_io.

The global batch is kept (micro_batch 4 x DP x grad_accum = 16): the sampler's order does not depend on DP,
DeepSpeed averages the gradients over DP x accumulation and the logged loss is the mean of equal-sized
micro-batch means, so only the float summation order differs (measured: <= 3e-7 over 3 steps).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import CheckpointError, make_manifest, read_manifest, write_weights_checkpoint
from megaclone.checkpoint.optim_state import (
    MOMENT_KEYS,
    OptimStateReader,
    make_optimizer_record,
    optim_file,
    optim_file_digests,
    save_optim_shard,
)
from megaclone.config import ModelConfig, load_run_config
from megaclone.spec import build_param_specs
from megaclone.train.checkpointing import check_resume
from megaclone.train.state_io import elastic_reason
from tests.train.conftest import TINY, launch, losses

TOL = 1e-6
BASE_ITERS, SAVE_AT = 6, 3
COMMON = ["--config", str(TINY), "--train-iters", str(BASE_ITERS)]
SETTINGS = ["train.warmup_iters=2", "train.eval_interval=0"]  # after --set, last on the command line


@dataclass(frozen=True)
class ElasticBase:
    run_dir: Path
    ckpt: Path  # checkpoint root: step_00000003 and step_00000006

    @property
    def step_dir(self) -> Path:
        return self.ckpt / f"step_{SAVE_AT:08d}"

    def data_arg(self) -> str:
        return f"data.data_prefix={self.run_dir / 'data' / 'corpus'}"


_BUILT: list[ElasticBase] = []  # tests/convert/test_carry.py imports the fixture: one launch for both modules


@pytest.fixture(scope="session")
def elastic_base(tmp_path_factory: pytest.TempPathFactory) -> ElasticBase:
    """The uninterrupted run: DP=4, ZeRO-1, TP=1, 6 steps, checkpoints after steps 3 and 6."""
    if not _BUILT:
        run_dir = tmp_path_factory.mktemp("elastic_base")
        launch([*COMMON, "--run-dir", str(run_dir), "--save", str(run_dir / "ckpt"), "--zero-stage", "1",
                "--set", *SETTINGS, f"checkpoint.save_interval={SAVE_AT}"], num_procs=4)
        _BUILT.append(ElasticBase(run_dir, run_dir / "ckpt"))
    return _BUILT[0]


def resume(base: ElasticBase, run_dir: Path, load: Path, tp: int, dp: int, zero: int, pp: int = 1,
           save: Path | None = None) -> dict[int, float]:
    """Continue `load` to step 6 at TP x PP x DP with the same global batch; returns the logged losses."""
    accum = 4 // dp
    args = [*COMMON, "--run-dir", str(run_dir), "--load", str(load), "--tp", str(tp), "--pp", str(pp),
            "--zero-stage", str(zero)] + (["--save", str(save)] if save is not None else [])
    args += ["--set", *SETTINGS, f"train.grad_accum_steps={accum}", base.data_arg()]
    proc = launch(args, num_procs=tp * pp * dp)
    assert "through the layout-free path" in proc.stdout + proc.stderr
    return losses(run_dir)


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    steps = list(range(SAVE_AT + 1, BASE_ITERS + 1))
    assert sorted(got) == steps
    diffs = {s: abs(got[s] - want[s]) for s in steps}
    assert max(diffs.values()) <= TOL, diffs


def test_checkpoint_records_optimizer_state(elastic_base: ElasticBase) -> None:
    manifest = read_manifest(elastic_base.step_dir)
    assert manifest.optimizer is not None and manifest.optimizer["step"] == SAVE_AT
    assert manifest.optimizer["scheduler"]["last_epoch"] == SAVE_AT
    assert list(manifest.optimizer["files"]) == [optim_file(0, 0)]
    assert manifest.data["consumed_samples"] == SAVE_AT * 16
    with OptimStateReader(elastic_base.step_dir) as reader:
        reader.verify()
        for name, spec in reader.param_specs.items():
            m, v = reader.read_moment(name, "exp_avg"), reader.read_moment(name, "exp_avg_sq")
            assert m.shape == spec.shape and bool((v >= 0).all()) and float(v.abs().max()) > 0, name


def test_resume_dp2_zero2_and_carry_back(elastic_base: ElasticBase, tmp_path: Path) -> None:
    """DP 4 -> 2 and ZeRO 1 -> 2; its own step-6 checkpoint (exported from ZeRO-2) holds the moments the
    uninterrupted ZeRO-1 run saved, so export is layout-free too."""
    got = resume(elastic_base, tmp_path / "run", elastic_base.step_dir, tp=1, dp=2, zero=2, save=tmp_path / "ckpt")
    assert_same_losses(got, losses(elastic_base.run_dir))
    final = tmp_path / "ckpt" / f"step_{BASE_ITERS:08d}"
    assert read_manifest(final).optimizer["step"] == BASE_ITERS
    with OptimStateReader(final) as mine, OptimStateReader(elastic_base.ckpt / f"step_{BASE_ITERS:08d}") as ref:
        for name in ref.param_specs:
            for key in MOMENT_KEYS:
                a, b = mine.read_moment(name, key), ref.read_moment(name, key)
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-9), (name, key, float((a - b).abs().max()))


def test_resume_tp2_dp1_zero1(elastic_base: ElasticBase, tmp_path: Path) -> None:
    """TP 1 -> 2 and DP 4 -> 1 (grad_accum 4): each rank takes its TP slice of the masters and moments."""
    got = resume(elastic_base, tmp_path / "run", elastic_base.step_dir, tp=2, dp=1, zero=1)
    assert_same_losses(got, losses(elastic_base.run_dir))


# --- fast checks of the format and the resume decision (no launch) -------------------------------------------

def _tiny_model() -> ModelConfig:
    return ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16)


def _write_optim_checkpoint(root: Path, cfg: ModelConfig, tp: int) -> dict[str, dict[str, torch.Tensor]]:
    """A weights checkpoint at TP=`tp` plus optim/ files with known random moments; returns the full moments."""
    g = torch.Generator().manual_seed(0)
    specs = build_param_specs(cfg)
    full = {s.name: torch.randn(s.shape, generator=g) for s in specs}
    moments = {s.name: {k: torch.rand(s.shape, generator=g) for k in MOMENT_KEYS} for s in specs}
    step_dir = write_weights_checkpoint(root, cfg, full, tp, 1, step=7, data={"consumed_samples": 112})
    for t in range(tp):
        save_optim_shard(step_dir / optim_file(t, 0), {s.name: {k: moments[s.name][k][s.tp_slices(t, tp)]
                                                                for k in MOMENT_KEYS} for s in specs})
    manifest = read_manifest(step_dir)
    manifest.optimizer = make_optimizer_record(7, {"last_epoch": 7}, optim_file_digests(step_dir, tp, 1))
    from megaclone.checkpoint import write_manifest

    write_manifest(step_dir, manifest)
    return moments


def test_optim_reader_reads_any_tp_slice(tmp_path: Path) -> None:
    cfg = _tiny_model()
    moments = _write_optim_checkpoint(tmp_path / "ckpt", cfg, tp=2)
    with OptimStateReader(tmp_path / "ckpt") as reader:
        assert reader.step == 7 and reader.scheduler == {"last_epoch": 7}
        for spec in build_param_specs(cfg):
            for tp in (1, 4) if spec.tp_axis is not None else (1,):
                for rank in range(tp):
                    got = reader.read_moment(spec.name, "exp_avg_sq", spec.tp_slices(rank, tp))
                    assert torch.equal(got, moments[spec.name]["exp_avg_sq"][spec.tp_slices(rank, tp)])
        reader.verify()
    (tmp_path / "ckpt" / "step_00000007" / optim_file(1, 0)).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="tp01-pp00"):
        OptimStateReader(tmp_path / "ckpt").verify()


def test_manifest_optimizer_field_is_optional_and_validated(tmp_path: Path) -> None:
    cfg = _tiny_model()
    old = make_manifest(cfg, 3, 1, 1).to_dict()
    assert "optimizer" not in old  # old manifests are unchanged, and read back with optimizer None
    from megaclone.checkpoint import Manifest

    assert Manifest.from_dict(old).optimizer is None
    bad = dict(old, optimizer={"step": -1, "scheduler": {"last_epoch": 0}, "files": {}})
    with pytest.raises(CheckpointError, match="optimizer.step"):
        Manifest.from_dict(bad)
    bad = dict(old, optimizer={"step": 1, "scheduler": {"last_epoch": 0}, "files": {"weights/x": {}}})
    with pytest.raises(CheckpointError, match="under optim/"):
        Manifest.from_dict(bad)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        write_weights_checkpoint(tmp_path / "w", cfg, {s.name: torch.zeros(s.shape) for s in build_param_specs(cfg)},
                                 1, 1)
        OptimStateReader(tmp_path / "w")


def test_check_resume_takes_the_layout_free_path_only_with_optimizer_files(tmp_path: Path) -> None:
    cfg = load_run_config(TINY, ["model.vocab_size=100"])
    manifest = make_manifest(cfg.model, 3, 1, 1, dp_size=4, zero_stage=1, deepspeed="deepspeed")
    with pytest.raises(CheckpointError, match="no optimizer files"):
        check_resume(manifest, tmp_path, cfg, world_size=2)  # an older checkpoint: refused as before
    assert elastic_reason(manifest, cfg, 4) is None
    manifest.optimizer = {"step": 3, "scheduler": {"last_epoch": 3}, "files": {}}
    check_resume(manifest, tmp_path, cfg, world_size=2)
    assert elastic_reason(manifest, cfg, 4) is None  # same layout: DeepSpeed's exact resume
    assert "dp_size 4 -> 2" in elastic_reason(manifest, cfg, 2)
    manifest.deepspeed = None
    assert "no DeepSpeed state" in elastic_reason(manifest, cfg, 4)
    json.dumps(manifest.to_dict())  # the record is JSON
