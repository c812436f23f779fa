"""Crash safety: an interrupted conversion leaves the destination absent (or the previous one complete), and a
rerun with the same arguments finishes with files identical to an uninterrupted run, keeping what was done."""

from __future__ import annotations

import pytest

from megaclone.checkpoint import load_full_state, read_manifest, resolve_checkpoint
from megaclone.convert import ABORT_ENV, ConversionAborted, ConvertOptions, convert_checkpoint
from tests.convert import ARCHS, bit_equal, layout_digests, make_source

ARCH = "mha-gelu-ln-rope-bias-tied"
WIDEN = dict(hyperclone=2, clone_noise_db=10.0, clone_seed=1)
PER_FILE = 27  # tensors per target file at TP4 x PP1: embedding, 2 x 12 block tensors, final norm weight and bias


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src") / "ckpt", ARCH, 2, 2)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """The uninterrupted conversion TP2xPP2 -> TP4 widened x2, one process."""
    out = tmp_path_factory.mktemp("ref") / "out"
    step = convert_checkpoint(ConvertOptions(input=source, output=out, tp_size=4, pp_size=1, progress=False,
                                             **WIDEN)).output
    return layout_digests(step, 4, 1)


def options(source, out, **kw) -> ConvertOptions:
    return ConvertOptions(input=source, output=out, tp_size=4, pp_size=1, progress=False, chunk_bytes=96,
                          **WIDEN, **kw)


@pytest.mark.parametrize("file_index, offset", [(0, 1), (1, 3), (2, PER_FILE), (3, PER_FILE)])
def test_abort_then_rerun(file_index: int, offset: int, source, reference, tmp_path, monkeypatch) -> None:
    """Abort inside the first file, the second, at the last tensor of the third and of the last (of 4 files)."""
    out = tmp_path / "out"
    monkeypatch.setenv(ABORT_ENV, str(file_index * PER_FILE + offset))
    with pytest.raises(ConversionAborted):
        convert_checkpoint(options(source, out))
    assert not (out / "latest").exists() and not (out / "step_00000007").exists()  # the destination is absent
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(out / "step_00000007")
    tmp = out / ".tmp-step_00000007"
    assert list(tmp.glob("weights/.tp*.tmp-*")), "a simulated crash leaves the partial file, like a kill"

    monkeypatch.delenv(ABORT_ENV)
    report = convert_checkpoint(options(source, out))
    assert layout_digests(report.output, 4, 1) == reference
    assert not tmp.exists() and (out / "latest").read_text().strip() == "step_00000007"
    written = {r.rel for r in report.files}
    assert written.isdisjoint(report.resumed) and len(written) + len(report.resumed) == 4
    assert len(report.resumed) == file_index  # the files finished before the crash are kept, not rewritten


def test_crash_keeps_previous_output_then_replaces_it(source, reference, tmp_path, monkeypatch) -> None:
    """With --overwrite, an interrupted run leaves the old checkpoint in place and readable."""
    out = tmp_path / "out"
    old = convert_checkpoint(ConvertOptions(input=source, output=out, tp_size=4, pp_size=1, progress=False)).output
    old_state = load_full_state(old)
    monkeypatch.setenv(ABORT_ENV, str(PER_FILE + 15))
    with pytest.raises(ConversionAborted):
        convert_checkpoint(options(source, out, overwrite=True))
    assert read_manifest(out).model.hidden_size == 16
    now = load_full_state(out)
    assert all(bit_equal(now[k], v) for k, v in old_state.items())
    monkeypatch.delenv(ABORT_ENV)
    report = convert_checkpoint(options(source, out, overwrite=True))
    assert report.output == old and read_manifest(out).model.hidden_size == 32
    assert layout_digests(report.output, 4, 1) == reference


def test_a_changed_request_does_not_reuse_files(source, reference, tmp_path, monkeypatch) -> None:
    """Files of an interrupted run with other clone settings are discarded, not mixed in."""
    out = tmp_path / "out"
    monkeypatch.setenv(ABORT_ENV, str(2 * PER_FILE + 1))
    with pytest.raises(ConversionAborted):
        convert_checkpoint(ConvertOptions(input=source, output=out, tp_size=4, pp_size=1, progress=False,
                                          hyperclone=2, clone_noise_db=10.0, clone_seed=2))
    monkeypatch.delenv(ABORT_ENV)
    assert len(list((out / ".tmp-step_00000007" / "weights").glob("tp*.safetensors"))) == 2
    report = convert_checkpoint(options(source, out))
    assert report.resumed == [] and layout_digests(report.output, 4, 1) == reference


def test_workers_abort_and_resume(source, reference, tmp_path, monkeypatch) -> None:
    """Two spawned workers: each finishes a file and crashes in its next; the abort stops the run, the files
    the workers finished are kept, and the rerun (one process) completes to the one-process bytes."""
    assert ARCH in ARCHS
    out = tmp_path / "out"
    monkeypatch.setenv(ABORT_ENV, str(PER_FILE + 5))  # counted per worker process
    with pytest.raises(ConversionAborted):
        convert_checkpoint(options(source, out, workers=2))
    assert not (out / "latest").exists()
    monkeypatch.delenv(ABORT_ENV)
    report = convert_checkpoint(options(source, out, workers=1))
    assert layout_digests(report.output, 4, 1) == reference
    assert len(report.resumed) >= 1  # written by a worker, byte-identical to the one-process file


def test_per_file_tensor_count(source, tmp_path) -> None:
    from megaclone.convert import plan_conversion

    plan = plan_conversion(options(source, tmp_path / "out"))
    assert [len(f.tensors) for f in plan.files] == [PER_FILE] * 4
