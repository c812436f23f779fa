"""Every bad request fails before anything is written, naming the file or flag and the numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import megaclone.convert.plan as plan_module
from megaclone.checkpoint import (
    CheckpointError,
    file_digest,
    load_full_state,
    read_manifest,
    save_weight_shard,
    weight_file,
    write_weights_checkpoint,
)
from megaclone.convert import (
    ConvertError,
    ConvertOptions,
    VerificationError,
    convert_checkpoint,
    plan_conversion,
    verify_conversion,
)
from tests.convert import make_source, read_file_tensors, snapshot

ARCH = "gqa-swiglu-rms-learned-nobias-untied"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def src(tmp_path) -> Path:
    return make_source(tmp_path / "src", ARCH, 2, 2)


def fails(options: ConvertOptions, error: type[Exception], match: str) -> None:
    """The conversion raises `error` matching `match`, and nothing appeared in or changed under the output."""
    out_root = Path(options.output)
    before = snapshot(out_root)
    with pytest.raises(error, match=match):
        convert_checkpoint(options)
    assert snapshot(out_root) == before
    assert not out_root.is_dir() or not [p for p in out_root.iterdir() if p.name.startswith(".tmp-")]


def opts(src: Path, out: Path, **kw) -> ConvertOptions:
    return ConvertOptions(input=src, output=out, progress=False, **kw)


def test_existing_output(src, tmp_path) -> None:
    out = tmp_path / "out"
    first = convert_checkpoint(opts(src, out, tp_size=4, pp_size=1)).output
    fails(opts(src, out, tp_size=1), ConvertError, rf"output {first} already exists; pass --overwrite")
    fails(opts(src, out / "step_00000009", tp_size=1), ConvertError,
          r"already holds a checkpoint \('latest' names 'step_00000007'\); pass --overwrite")
    report = convert_checkpoint(opts(src, out, tp_size=1, overwrite=True))
    assert report.output == first and read_manifest(out).tp_size == 1
    step9 = convert_checkpoint(opts(src, out / "step_00000009", tp_size=2, overwrite=True)).output
    assert read_manifest(out).step == 9 and read_manifest(step9).tp_size == 2 and read_manifest(first).tp_size == 1
    fails(opts(src, src / "step_00000007", overwrite=True), ConvertError, "is the input checkpoint")
    (tmp_path / "a_file").write_text("x")
    fails(opts(src, tmp_path / "a_file"), ValueError, rf"--output {tmp_path / 'a_file'} is a file")
    fails(opts(src, tmp_path / "a_file" / "ckpt"), ValueError, rf"lies under {tmp_path / 'a_file'}, which is a file")
    fails(opts(src, Path("/sys/megaclone-out")), ValueError, r"--output /sys/megaclone-out: cannot write in /sys")


@pytest.mark.parametrize("kw, match", [
    (dict(tp_size=3), r"--tp 3 --pp 2 does not fit the model \(num_query_groups=4.*num_query_groups=4 .* "
                      r"must be divisible by parallel.tp_size=3"),
    (dict(tp_size=8, hyperclone=3), r"--tp 8 --pp 2 does not fit the model grown x3 .*\(num_query_groups=12, "
                                    r"ffn_size=192.*parallel.tp_size=8"),
    (dict(pp_size=3), r"--tp 2 --pp 3 .*model.num_layers=2 must be >= parallel.pp_size=3"),
    (dict(tp_size=32), r"ffn_size=64, padded vocab=64.*must be divisible by parallel.tp_size=32"),
])
def test_layout_does_not_divide(src, tmp_path, kw, match) -> None:
    fails(opts(src, tmp_path / "out", **kw), ConvertError, match)


@pytest.mark.parametrize("kw, error, match", [
    (dict(optimizer="carry"), ConvertError, r"--optimizer carry: .* holds no optimizer state"),  # weights only
    (dict(optimizer="keep"), ConvertError, r"--optimizer 'keep': expected 'drop'"),
    (dict(clone_noise_db=10.0, clone_seed=3), ConvertError,
     r"--clone-noise-db, --clone-seed given without --hyperclone"),
    (dict(hyperclone=1), ValueError, r"--hyperclone=1 keeps the width and --hyperclone-ffn is 1: nothing grows"),
    (dict(hyperclone=2, hyperclone_ffn=0), ValueError, r"--hyperclone-ffn=0: expected an integer >= 1"),
    (dict(hyperclone=2, clone_variant="mirror"), ValueError, r"variant='mirror'"),
    (dict(workers=0), ConvertError, r"--workers 0: expected an integer >= 1"),
    (dict(pp_size=0), ConvertError, r"--pp 0: expected an integer >= 1"),
])
def test_bad_options(src, tmp_path, kw, error, match) -> None:
    fails(opts(src, tmp_path / "out", **kw), error, match)


def test_missing_source(tmp_path) -> None:
    fails(opts(tmp_path / "nowhere", tmp_path / "out"), FileNotFoundError, "nowhere does not exist")
    (tmp_path / "empty").mkdir()
    fails(opts(tmp_path / "empty", tmp_path / "out"), CheckpointError, r"not a megaclone checkpoint \(no manifest")


def test_missing_shard(src, tmp_path) -> None:
    victim = src / "step_00000007" / weight_file(1, 1)
    victim.unlink()
    fails(opts(src, tmp_path / "out", tp_size=1), CheckpointError, rf"missing shard file {victim}")


def _rewrite_shard(src: Path, rel: str, edit) -> Path:
    """Replace one source file's tensors with `edit(tensors)` and fix the manifest checksum, so only the
    content check can notice."""
    step = src / "step_00000007"
    tensors = edit(read_file_tensors(step / rel))
    save_weight_shard(step / rel, tensors)
    path = step / "manifest.json"
    d = json.loads(path.read_text())
    d["files"][rel] = file_digest(step / rel)
    path.write_text(json.dumps(d))
    return step / rel


def test_shape_disagrees_with_manifest(src, tmp_path) -> None:
    name = "blocks.1.mlp.fc_out.weight"
    bad = _rewrite_shard(src, weight_file(0, 1), lambda t: {**t, name: torch.zeros(16, 31)})
    fails(opts(src, tmp_path / "out", tp_size=4), CheckpointError,
          rf"shard file {bad}: {name} is F32 \[16, 31\], the manifest implies F32 \[16, 32\] \(global \[16, 64\]")


def test_tensor_missing_in_file(src, tmp_path) -> None:
    name = "blocks.0.attn.qkv.weight"
    bad = _rewrite_shard(src, weight_file(1, 0), lambda t: {k: v for k, v in t.items() if k != name})
    fails(opts(src, tmp_path / "out", tp_size=4), CheckpointError, rf"tensor {name} missing in shard file {bad}")


def test_checksum_mismatch(src, tmp_path) -> None:
    victim = src / "step_00000007" / weight_file(0, 0)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor's data: same size, valid header
    victim.write_bytes(bytes(data))
    fails(opts(src, tmp_path / "out", tp_size=1, workers=2), CheckpointError, rf"checksum mismatch for {victim}")


def test_truncated_source(src, tmp_path) -> None:
    victim = src / "step_00000007" / weight_file(1, 0)
    victim.write_bytes(victim.read_bytes()[:-8])
    fails(opts(src, tmp_path / "out", tp_size=1), CheckpointError, rf"shard file {victim} is \d+ bytes, the manifest")


def test_not_enough_disk(src, tmp_path, monkeypatch) -> None:
    need = plan_conversion(opts(src, tmp_path / "out", tp_size=4, pp_size=1, hyperclone=2)).total_bytes
    tokenizer = (src / "step_00000007" / "tokenizer.model").stat().st_size
    monkeypatch.setattr(plan_module, "free_disk_bytes", lambda path: need - 1)
    fails(opts(src, tmp_path / "out", tp_size=4, pp_size=1, hyperclone=2), ConvertError,
          rf"not enough free disk for the output in {tmp_path / 'out'}: the plan writes {need + tokenizer} bytes.* "
          rf"{need - 1} bytes .* are free")


def test_verify_catches_a_different_function(src, tmp_path) -> None:
    state = load_full_state(src)
    state["blocks.0.mlp.fc_out.weight"][3, 5] += 1e-3
    other = write_weights_checkpoint(tmp_path / "other", read_manifest(src).model, state, 1, 1)
    with pytest.raises(VerificationError, match=r"logits of .*other.* differ from .*max \|diff\| = "):
        verify_conversion(src, other, widened=False)
    state["blocks.0.mlp.fc_out.weight"][3, 5] += 1.0
    other = write_weights_checkpoint(tmp_path / "other2", read_manifest(src).model, state, 1, 1)
    with pytest.raises(VerificationError, match="allowed"):
        verify_conversion(src, other, widened=True)
    assert verify_conversion(src, src, widened=False)["exact"]


def _cli():
    spec = importlib.util.spec_from_file_location("reshard_expand", ROOT / "tools" / "reshard_expand.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli(src, tmp_path, capsys) -> None:
    cli = _cli()
    out = tmp_path / "wide"
    argv = ["--input", str(src), "--output", str(out), "--tp", "4", "--pp", "1", "--hyperclone", "2",
            "--clone-noise-db", "10", "--clone-seed", "4", "--verify", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'step_00000007'}: 4 files" in printed and "within tolerance" in printed
    manifest = read_manifest(out)
    conv = manifest.provenance["converter"]
    assert conv["source"]["path"] == str((src / "step_00000007").resolve())
    assert conv["source"]["files"] == read_manifest(src).files  # the source's weight checksums
    assert conv["arguments"]["hyperclone"] == 2 and conv["arguments"]["clone_noise_db"] == 10.0
    assert conv["arguments"]["tp_size"] == 4 and conv["optimizer"] == "drop"
    assert manifest.provenance["hyperclone"]["factor"] == 2 and manifest.provenance["hyperclone"]["seed"] == 4
    for rel, entry in manifest.files.items():  # a checksum per file, matching the bytes on disk
        assert file_digest(out / "step_00000007" / rel) == entry
    assert sorted(manifest.files) == [weight_file(t, 0) for t in range(4)]

    assert cli.main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["--input", str(src), "--output", str(tmp_path / "x"), "--optimizer", "carry"]) == 2
    assert "holds no optimizer state" in capsys.readouterr().err


def test_cli_clone_defaults_are_the_launchers(capsys) -> None:
    """--hyperclone alone widens like `launch/pretrain.py --hyperclone` alone (HYPERCLONE_DEFAULTS), so the
    converter and a launch give the same bits; `--clone-noise-db none` turns the noise off."""
    from megaclone.config import HYPERCLONE_DEFAULTS

    cli = _cli()
    base = ["--input", "a", "--output", "b"]
    o = cli.parse_args([*base, "--hyperclone", "2"])
    assert (o.clone_variant, o.clone_noise_db) == (HYPERCLONE_DEFAULTS["variant"], HYPERCLONE_DEFAULTS["noise_db"])
    o = cli.parse_args([*base, "--hyperclone", "2", "--clone-variant", "symmetric", "--clone-noise-db", "none"])
    assert (o.clone_variant, o.clone_noise_db) == ("symmetric", None)
    o = cli.parse_args(base)  # resharding only: nothing clone-related is set
    assert (o.hyperclone, o.clone_variant, o.clone_noise_db) == (0, "symmetric", None)
    assert cli.main([*base, "--clone-noise-db", "none"]) == 2
    assert "--clone-noise-db given without --hyperclone N" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--hyperclone", "0"], "argument --hyperclone: expected an integer >= 1, got 0"),  # was a plain copy, exit 0
    (["--hyperclone", "2", "--hyperclone-ffn", "0"], "argument --hyperclone-ffn: expected an integer >= 1, got 0"),
    (["--grow-layers", "-4"], "argument --grow-layers: expected an integer >= 1, got -4"),
])
def test_cli_refuses_factors_the_launcher_refuses(argv: list[str], message: str, tmp_path,
                                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli().main(["--input", str(tmp_path / "a"), "--output", str(tmp_path / "b"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
