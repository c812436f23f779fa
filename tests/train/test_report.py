"""The widening report: what the small and wide runs' metrics say, said so that a person can read it (the held-out
loss rise after a widening included), where the outputs went, and the held-out loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaclone.config import RunConfig
from megaclone.train.report import SIMILARITY_MEANING, plot_heldout_loss, widening_summary


def _run(run_dir: Path, evals: list[tuple[int, float, float | None]], save: str = "", data_prefix: str = "",
         clone: dict | None = None) -> Path:
    cfg = RunConfig(run_dir=str(run_dir))
    cfg.checkpoint.save, cfg.data.data_prefix = save, data_prefix
    records = [{"event": "start", "step": evals[0][0], "config": cfg.to_dict()}]
    if clone is not None:
        records.append({"event": "clone", "step": 0, **clone})
    for step, loss, similarity in evals:
        records.append({"event": "eval", "step": step, "eval_loss": loss,
                        **({"clone_similarity": similarity} if similarity is not None else {})})
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


CLONE = {"factor": 2, "preservation_rel_error": 1.3e-6, "small_loss": 3.7401, "wide_loss": 3.7402, "noise_db": 0.0,
         "optimizer": "fresh"}


def test_summary_shows_the_rise_after_the_widening_and_where_outputs_went(tmp_path: Path) -> None:
    (tmp_path / "small" / "ckpt").mkdir(parents=True)
    (tmp_path / "small" / "ckpt" / "latest").write_text("step_00000600\n")
    small = _run(tmp_path / "small" / "run", [(50, 6.1, None), (600, 3.74, None)], save=str(tmp_path / "small" /
                                                                                              "ckpt"))
    wide = _run(tmp_path / "wide", [(0, 3.74, 0.5), (20, 3.97, 0.45), (240, 3.60, 0.31)], clone=CLONE,
                save=str(tmp_path / "wide" / "ckpt"), data_prefix=str(small / "data" / "corpus"))
    lines = widening_summary(small, wide, [("x.png", "the plot")])
    assert lines[0] == f"small model ({small}): held-out loss 6.1000 at step 50 -> 3.7400 at step 600"
    assert "widened x2: max |logit diff| / max |logit| = 1.30e-06" in lines[1]
    assert lines[2].startswith(f"wide model ({wide}): held-out loss 3.7400 at the widening, rose to 3.9700 at step 20 "
                               "(+0.2300: training went on with a fresh optimizer")
    assert lines[2].endswith(", 3.6000 at step 240")
    assert lines[3].startswith(SIMILARITY_MEANING)
    assert lines[3].endswith("0.500 at the widening (set by the 0 dB zero-sum noise) -> 0.310 at the end")
    outputs = lines[lines.index("outputs:") + 1:]
    assert any(f"{tmp_path / 'small' / 'ckpt'}" in o and "(latest: step_00000600)" in o for o in outputs)
    assert any(f"{small / 'data' / 'corpus'}_*" in o and "bundled corpus" in o for o in outputs)  # built by the small
    assert not any(f"{wide / 'data'}" in o for o in outputs)  # the wide run read the small run's shards
    assert outputs[-1].split() == ["x.png", "the", "plot"]


def test_no_rise_is_reported_when_there_was_none(tmp_path: Path) -> None:
    small = _run(tmp_path / "small", [(600, 3.74, None)])
    wide = _run(tmp_path / "wide", [(0, 3.74, 1.0), (240, 3.60, 1.0)], clone={**CLONE, "noise_db": None})
    lines = widening_summary(small, wide)
    assert lines[2] == f"wide model ({wide}): held-out loss 3.7400 at the widening, 3.6000 at step 240"
    assert lines[3].endswith("1.000 at the widening (no noise: the copies start equal) -> 1.000 at the end")


def test_a_run_that_did_not_widen_is_named(tmp_path: Path) -> None:
    small = _run(tmp_path / "small", [(600, 3.74, None)])
    with pytest.raises(ValueError, match=rf"{small / 'metrics.jsonl'}: no 'clone' record"):
        widening_summary(small, small)


def test_plot_is_a_png(tmp_path: Path) -> None:
    small = _run(tmp_path / "small", [(50, 6.1, None), (600, 3.74, None)])
    wide = _run(tmp_path / "wide", [(0, 3.74, 0.5), (240, 3.60, 0.3)], clone=CLONE)
    png = plot_heldout_loss(small, wide, tmp_path / "out" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(png.parent.iterdir()) == [png]
