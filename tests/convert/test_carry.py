"""tools/reshard_expand.py --optimizer carry: the Adam state files are resharded with the weights, and a run
resumed from the converted checkpoint at the new layout reproduces the unconverted run's next losses."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megaclone.checkpoint import CheckpointError, read_manifest, resolve_checkpoint, storage_stage
from megaclone.checkpoint.optim_state import MOMENT_KEYS, OptimStateReader, moment_name, optim_file
from megaclone.convert import ConvertOptions, convert_checkpoint
from megaclone.convert.plan import ConvertError
from tests.train.conftest import losses
from tests.train.test_elastic import BASE_ITERS, SAVE_AT, assert_same_losses, elastic_base, resume  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def reshard_main(argv: list[str]) -> int:
    """tools/reshard_expand.py's main, loaded from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("reshard_expand", ROOT / "tools" / "reshard_expand.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _convert(src: Path, out: Path, tp: int, pp: int) -> Path:
    opts = ConvertOptions(input=src, output=out, tp_size=tp, pp_size=pp, optimizer="carry", progress=False)
    return convert_checkpoint(opts).output


def test_carry_reshards_moments_like_weights(elastic_base, tmp_path: Path) -> None:  # noqa: F811
    out = _convert(elastic_base.step_dir, tmp_path / "conv", tp=2, pp=2)
    src, dst = read_manifest(elastic_base.step_dir), read_manifest(out)
    assert dst.optimizer["step"] == src.optimizer["step"] == SAVE_AT
    assert dst.optimizer["scheduler"] == src.optimizer["scheduler"] and dst.data == src.data
    assert sorted(dst.optimizer["files"]) == sorted(optim_file(t, p) for t in range(2) for p in range(2))
    assert dst.deepspeed is None and dst.provenance["converter"]["optimizer"] == "carry"
    with OptimStateReader(elastic_base.step_dir) as ref, OptimStateReader(out) as conv:
        conv.verify()
        for p in range(2):
            for t in range(2):
                stored = load_file(str(out / optim_file(t, p)))
                specs = [s for s in conv.param_specs.values() if storage_stage(s, dst.model, 2) == p]
                assert len(stored) == 2 * len(specs)
                for spec in specs:  # each file holds exactly the TP slice of the source's full moment
                    for key in MOMENT_KEYS:
                        want = ref.read_moment(spec.name, key, spec.tp_slices(t, 2))
                        assert torch.equal(stored[f"{spec.name}.{key}"], want), (spec.name, key, t, p)


def test_resume_from_converted_checkpoint_matches(elastic_base, tmp_path: Path) -> None:  # noqa: F811
    """Convert DP=4 TP=1 -> TP=2 (no DeepSpeed state left), resume at TP=2 DP=1 ZeRO-2: same next losses."""
    assert reshard_main(["--input", str(elastic_base.step_dir), "--output", str(tmp_path / "conv"), "--tp", "2",
                         "--optimizer", "carry", "--no-progress"]) == 0
    got = resume(elastic_base, tmp_path / "run", resolve_checkpoint(tmp_path / "conv"), tp=2, dp=1, zero=2)
    assert_same_losses(got, losses(elastic_base.run_dir))
    assert sorted(got) == list(range(SAVE_AT + 1, BASE_ITERS + 1))


def test_carry_with_widening_scales_moments(elastic_base, tmp_path: Path) -> None:  # noqa: F811
    """--optimizer carry --hyperclone 2: each stored moment is clone_moment of the source (m o pi / p, v o pi / p^2)."""
    from megaclone.clone import clone_moment, widen_model_config
    from megaclone.config import CloneConfig

    opts = ConvertOptions(input=elastic_base.step_dir, output=tmp_path / "wide", tp_size=2, pp_size=1,
                          optimizer="carry", hyperclone=2, progress=False)
    out = convert_checkpoint(opts).output
    src, dst = read_manifest(elastic_base.step_dir), read_manifest(out)
    assert dst.model == widen_model_config(src.model, 2) and dst.optimizer["step"] == src.optimizer["step"]
    clone = CloneConfig(init_from=str(elastic_base.step_dir), factor=2)
    with OptimStateReader(elastic_base.step_dir) as ref:
        for t in range(2):
            stored = load_file(str(out / optim_file(t, 0)))
            for spec in dst.params:
                for key in MOMENT_KEYS:
                    want = clone_moment(spec, src.model, clone, lambda n, i, k=key: ref.read_moment(n, k, i),
                                        spec.tp_slices(t, 2), kind=key)
                    assert torch.equal(stored[moment_name(spec.name, key)], want), (spec.name, key, t)


def test_carry_with_depth_growth(elastic_base, tmp_path: Path) -> None:  # noqa: F811
    """--optimizer carry --grow-layers 3: a copied block's moments are its source block's, the zeroed output
    projections of the inserted block start at zero; the step and schedule are the source's."""
    from megaclone.clone import depth_plan
    from megaclone.config import CloneConfig
    from megaclone.spec import in_block

    opts = ConvertOptions(input=elastic_base.step_dir, output=tmp_path / "deep", tp_size=2, pp_size=1,
                          optimizer="carry", grow_layers=3, progress=False)
    out = convert_checkpoint(opts).output
    src, dst = read_manifest(elastic_base.step_dir), read_manifest(out)
    assert dst.model.num_layers == 3 and dst.optimizer["step"] == src.optimizer["step"]
    assert dst.optimizer["scheduler"] == src.optimizer["scheduler"]
    plan = depth_plan(src.model, CloneConfig(init_from="src", grow_layers=3))
    zeroed = 0
    with OptimStateReader(elastic_base.step_dir) as ref:
        for t in range(2):
            stored = load_file(str(out / optim_file(t, 0)))
            for spec in dst.params:
                source = plan.source_of(spec)
                for key in MOMENT_KEYS:
                    got = stored[moment_name(spec.name, key)]
                    if source is None:
                        zeroed += 1
                        assert not got.any(), (spec.name, key)
                        continue
                    assert source == (spec.name if not spec.name.startswith("blocks.") else
                                      in_block(spec.name, plan.sources[spec.layer - 1]))
                    assert torch.equal(got, ref.read_moment(source, key, spec.tp_slices(t, 2))), (spec.name, key)
    assert zeroed == 2 * 2 * 4  # TP ranks x moments x (attn out, mlp out) x (weight, bias)


def test_carry_errors(elastic_base, tmp_path: Path) -> None:  # noqa: F811
    weights_only = _convert_drop(elastic_base.step_dir, tmp_path / "drop")
    assert read_manifest(weights_only).optimizer is None
    with pytest.raises(ConvertError, match="no optimizer state"):
        _convert(weights_only, tmp_path / "again", tp=1, pp=1)
    assert not (tmp_path / "again").exists()
    bad = tmp_path / "bad"
    shutil.copytree(elastic_base.step_dir, bad / elastic_base.step_dir.name)
    (bad / elastic_base.step_dir.name / optim_file(0, 0)).write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match="optim/tp00-pp00"):
        _convert(bad / elastic_base.step_dir.name, tmp_path / "out", tp=2, pp=1)
    with pytest.raises(ConvertError, match="--optimizer carry with --hyperclone-groups 1 < --hyperclone 2"):
        convert_checkpoint(ConvertOptions(input=elastic_base.step_dir, output=tmp_path / "groups", optimizer="carry",
                                          hyperclone=2, hyperclone_groups=1, progress=False))
    assert not (tmp_path / "groups").exists()


def _convert_drop(src: Path, out: Path) -> Path:
    return convert_checkpoint(ConvertOptions(input=src, output=out, optimizer="drop", progress=False)).output
