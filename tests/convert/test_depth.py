"""tools/reshard_expand.py --grow-layers (and --hyperclone 1, --hyperclone-groups): every target file is what a
launch builds for that rank, bit for bit, at any source and target layout; the lossless methods verify, the
others report their loss change; the provenance records the growth; bad requests write nothing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megaclone.checkpoint import ShardReader, read_manifest, storage_stage, weight_file
from megaclone.clone import build_clone_shard, depth_plan, grown_model_config
from megaclone.config import CloneConfig
from megaclone.convert import ConvertError, ConvertOptions, convert_checkpoint
from megaclone.spec import build_param_specs, spec_table
from tests.convert import ARCHS, bit_equal, make_source, read_file_tensors
from tests.convert.test_errors import fails

A, B = sorted(ARCHS)  # A: gqa-swiglu-rms-learned-nobias-untied, B: mha-gelu-ln-rope-bias-tied
ROOT = Path(__file__).resolve().parents[2]
CASES = [  # (arch, source (tp, pp), target (tp, pp), growth options)
    (B, (2, 2), (1, 3), dict(hyperclone=2, grow_layers=3, clone_variant="diagonal", clone_noise_db=0.0)),
    (A, (1, 2), (2, 1), dict(hyperclone=1, hyperclone_ffn=2, grow_layers=4)),
    (A, (2, 1), (1, 2), dict(hyperclone=2, hyperclone_groups=1, grow_layers=4, grow_method="stack",
                             clone_variant="diagonal", clone_noise_db=10.0)),
    (B, (1, 1), (2, 2), dict(grow_layers=4, grow_method="interleave")),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_grown_conversion_is_what_a_launch_builds(case: int, tmp_path: Path) -> None:
    arch, (stp, spp), (tp, pp), grow = CASES[case]
    src = make_source(tmp_path / "src", arch, stp, spp)
    report = convert_checkpoint(ConvertOptions(input=src, output=tmp_path / "out", tp_size=tp, pp_size=pp,
                                               chunk_bytes=64, verify=True, progress=False, **grow))
    small = read_manifest(src).model
    clone = CloneConfig(init_from=str(src), factor=grow.get("hyperclone", 0), ffn_factor=grow.get("hyperclone_ffn"),
                        groups_factor=grow.get("hyperclone_groups"), grow_layers=grow["grow_layers"],
                        grow_method=grow.get("grow_method", "zero"), variant=grow.get("clone_variant", "symmetric"),
                        noise_db=grow.get("clone_noise_db"))
    grown, plan = grown_model_config(small, clone), depth_plan(small, clone)
    manifest = read_manifest(report.output)
    assert manifest.model == grown and (manifest.tp_size, manifest.pp_size) == (tp, pp)
    record = manifest.provenance["hyperclone"]
    assert record["grow_layers"] == grow["grow_layers"] and record["depth"]["sources"] == list(plan.sources)
    specs, small_specs = spec_table(grown), spec_table(small)
    for p in range(pp):
        for t in range(tp):
            with ShardReader(src) as reader:
                want = build_clone_shard(reader.read, small, clone, t, tp, p, pp)
            stored = read_file_tensors(report.output / weight_file(t, p))
            assert set(stored) == {k for k in want if storage_stage(specs[k], grown, pp) == p}
            for name, tensor in stored.items():
                assert bit_equal(tensor, want[name]), (name, t, p)
            copied = {plan.source_of(s) for s in build_param_specs(grown) if storage_stage(s, grown, pp) == p}
            files = {weight_file(r, storage_stage(small_specs[name], small, spp)) for name in copied - {None}
                     for r in range(stp)}
            result = next(r for r in report.files if r.rel == weight_file(t, p))
            assert set(result.reads) <= files
    verify = report.verify
    assert verify["preserving"] == plan.preserving
    if plan.preserving:
        assert verify["max_abs_diff"] <= verify["tolerance"]
    else:
        assert abs(verify["loss"] - verify["small_loss"]) > 1e-4  # measured, not judged


def test_tool_reports_the_loss_change_of_stack(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("reshard_expand", ROOT / "tools" / "reshard_expand.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src = make_source(tmp_path / "src", B, 1, 1)
    args = ["--input", str(src), "--grow-layers", "4", "--verify", "--no-progress"]
    assert tool.main([*args, "--output", str(tmp_path / "stack"), "--grow-method", "stack", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "verify: --grow-method stack does not preserve the function; loss on a fixed random batch:" in out
    record = read_manifest(tmp_path / "stack").provenance["hyperclone"]
    assert (record["factor"], record["variant"], record["noise_db"]) == (1, "diagonal", 0.0)  # the launch defaults
    assert tool.main([*args, "--output", str(tmp_path / "zero")]) == 0
    assert "verify: max |logit diff|" in capsys.readouterr().out


@pytest.mark.parametrize("kw, error, match", [
    (dict(grow_method="stack"), ConvertError, r"--grow-method stack given without --grow-layers"),
    (dict(hyperclone_groups=1), ConvertError, r"--hyperclone-groups given without --hyperclone N"),
    (dict(grow_layers=2), ValueError, r"--grow-layers\) = 2: the target number of layers must exceed the source's 2"),
    (dict(grow_layers=3, grow_method="stack"), ValueError, r"--grow-layers 3 must be a multiple of the source's 2"),
    (dict(grow_layers=3, pp_size=4), ConvertError, r"--pp 4 does not fit the model grown x1 .*2 -> 3 layers by zero "
                                                   r".*model.num_layers=3 must be >= parallel.pp_size=4"),
    (dict(hyperclone=2, hyperclone_groups=4), ValueError, r"--hyperclone-groups=4 must divide --hyperclone=2"),
    (dict(hyperclone=2, hyperclone_groups=1, tp_size=8), ConvertError, r"--tp 8 .*groups x1.*num_query_groups=4"),
])
def test_bad_growth_requests_write_nothing(tmp_path: Path, kw: dict, error: type, match: str) -> None:
    src = make_source(tmp_path / "src", A, 2, 2)
    fails(ConvertOptions(input=src, output=tmp_path / "out", progress=False, **kw), error, match)
