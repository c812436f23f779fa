"""What a widening did, read back from the two runs' metrics.jsonl: a summary for a person, and a plot.

`widening_summary` says how the small run's held-out loss went, how exactly the widening preserved its function,
how the wide run's held-out loss went from there (a rise after the widening included), what the clone-similarity
figures mean, and where every output of the two runs went. `plot_heldout_loss` draws the held-out loss of both runs
on one step axis, the small run first, the wide one from the widening on. tools/widening_report.py and the demo
(launch/demo.sh) call them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megaclone.train.dataset import DEFAULT_CORPUS_PREFIX
from megaclone.train.logging import read_metrics

SIMILARITY_MEANING = ("clone_similarity is the mean cosine similarity between the copies that the widening made of "
                      "each unit's weights (qkv and MLP-in of every block): 1 means identical copies, the small model "
                      "in disguise; the lower it goes, the more the copies differ and use the extra width")


def _last(records: list[dict[str, Any]], kind: str, run_dir: Path) -> dict[str, Any]:
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no '{kind}' record (did the run finish?)")
    return records[-1]


def _outputs(run_dir: Path, label: str) -> list[tuple[str, str]]:
    """(path, what it holds) for one run, from the configuration its 'start' record logged."""
    cfg = _last(read_metrics(run_dir, "start"), "start", run_dir)["config"]
    out = []
    save = cfg["checkpoint"]["save"]
    if save:
        latest = Path(save, "latest")
        tail = f" (latest: {latest.read_text().strip()})" if latest.is_file() else ""
        out.append((save, f"checkpoints of the {label} model{tail}"))
    out.append((str(run_dir / "metrics.jsonl"), f"the {label} run's per-step loss, learning rate and held-out "
                                                 "evaluations, one JSON record per line"))
    if (run_dir / "tensorboard").is_dir():
        out.append((str(run_dir / "tensorboard"), "the same, for TensorBoard"))
    prefix = cfg["data"]["data_prefix"]
    if not prefix:
        out.append((f"{run_dir / DEFAULT_CORPUS_PREFIX}_*", "the tokenizer and token shards built from the bundled "
                                                            "corpus"))
    return out


def widening_summary(small_dir: str | Path, wide_dir: str | Path, extra_outputs: list[tuple[str, str]] = ()) \
        -> list[str]:
    """Lines that say what happened in a widening (see the module docstring); raises ValueError naming the metrics
    file when a run has not logged what is needed."""
    small_dir, wide_dir = Path(small_dir), Path(wide_dir)
    small = read_metrics(small_dir, "eval")
    clone = _last(read_metrics(wide_dir, "clone"), "clone", wide_dir)
    wide = read_metrics(wide_dir, "eval")
    _last(small, "eval", small_dir)
    _last(wide, "eval", wide_dir)
    lines = [f"small model ({small_dir}): held-out loss {small[0]['eval_loss']:.4f} at step {small[0]['step']} -> "
             f"{small[-1]['eval_loss']:.4f} at step {small[-1]['step']}"]
    lines.append(f"widened x{clone['factor']}: max |logit diff| / max |logit| = {clone['preservation_rel_error']:.2e}"
                 f" on a held-out batch, loss {clone['small_loss']:.4f} (small) vs {clone['wide_loss']:.4f} (wide): "
                 "the wide model computes the small one's function")
    start, end = wide[0], wide[-1]
    peak = max(wide, key=lambda r: r["eval_loss"])
    line = f"wide model ({wide_dir}): held-out loss {start['eval_loss']:.4f} at the widening"
    if peak["eval_loss"] > start["eval_loss"] and peak is not start:
        optimizer = "the small run's optimizer state, carried" if clone.get("optimizer") == "carry" \
            else "a fresh optimizer (new Adam moments, warmed up to the full learning rate)"
        rise = peak["eval_loss"] - start["eval_loss"]
        line += (f", rose to {peak['eval_loss']:.4f} at step {peak['step']} (+{rise:.4f}: training went on with "
                 f"{optimizer}, which moves the widened weights away from where the small run left them before it "
                 "improves on them)")
    line += f", {end['eval_loss']:.4f} at step {end['step']}"
    lines.append(line)
    if "clone_similarity" in start:
        noise = clone.get("noise_db")
        cause = f"set by the {noise:g} dB zero-sum noise" if noise is not None else "no noise: the copies start equal"
        lines.append(f"{SIMILARITY_MEANING}; here {start['clone_similarity']:.3f} at the widening ({cause}) -> "
                     f"{end['clone_similarity']:.3f} at the end")
    lines.append("outputs:")
    outputs = _outputs(small_dir, "small") + _outputs(wide_dir, "wide") + list(extra_outputs)
    width = max(len(path) for path, _ in outputs)
    lines += [f"  {path:<{width}}  {what}" for path, what in outputs]
    return lines


def plot_heldout_loss(small_dir: str | Path, wide_dir: str | Path, png: str | Path) -> Path:
    """A PNG of the held-out loss: the small run, then the wide run from the widening on (one step axis, the wide
    run's steps shifted to start where the small run ended). Written under a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small, wide = read_metrics(small_dir, "eval"), read_metrics(wide_dir, "eval")
    clone = _last(read_metrics(wide_dir, "clone"), "clone", Path(wide_dir))
    at = small[-1]["step"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in small], [r["eval_loss"] for r in small], "o-", ms=3, label="small model")
    ax.plot([at + r["step"] for r in wide], [r["eval_loss"] for r in wide], "o-", ms=3,
            label=f"widened x{clone['factor']}, trained on")
    ax.axvline(at, color="grey", ls="--", lw=1)
    ax.annotate(f"widening x{clone['factor']}", (at, ax.get_ylim()[1]), xytext=(4, -12), textcoords="offset points",
                fontsize=8, color="grey")
    ax.set(xlabel="optimizer steps (the wide run's counted on from the small run's last)", ylabel="held-out loss",
           title="Held-out loss through the widening")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return png
