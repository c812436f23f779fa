"""One target model reached four ways, each against a tuned random init: which direction of growth pays? (issue 15)

Target T: d=128, 4 layers: the wide model of bench/hyperclone_speedup.py's smallest size, so random init's runs and
their learning-rate sweep are that study's records, shared through bench/study_runs.py (nothing is trained twice).
Four sources, each trained like that study's S (the same 2000 steps and tokens, peak lr 3e-3, warmup 5% + cosine,
seed 100), grown into T at the start of a fresh run:

  width  d64, 4 layers    --hyperclone 2                    (that study's S and its `fresh` clone: shared records)
  stack  d128, 2 layers   --grow-layers 4 --grow-method stack
  zero   d128, 2 layers   --grow-layers 4                   (new identity blocks)
  both   d64, 2 layers    --hyperclone 2 --grow-layers 4    (width and depth in one pass)

Every grown run: the launcher's clone defaults (diagonal, 0 dB noise), a fresh AdamW, warmup 5% + cosine to lr/10
over the same steps as random init, the corpus from its start in the seed's order (random init's batches). Each
path's peak lr runs on a x2 grid of 4 values on seed 0, extended at an edge until the best is interior (at most 3
steps per side), then the best on seeds 1 and 2. Report: the T-tokens each path needs to reach random init's final
held-out loss relative to random init's (the speedup), as is and with the source's training FLOPs added, mean and
spread over the seeds; the curves; which path is best, a difference inside the seed spread being a tie.

    python bench/depth_growth.py --quick                 # tiny models, a few minutes: the pipeline end to end
    nohup python bench/depth_growth.py --jobs 2 --commit > runs/depth_growth.log 2>&1 &   # the study
    python bench/depth_growth.py --report-only           # the report from the committed records alone

An invocation stops starting runs when its --hours are up, reports what is complete and exits with 75; the same
command continues. Finished runs are never repeated: their records sit in docs/results/runs/.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from hyperclone_speedup import CLONE, EXIT_INCOMPLETE, Size  # noqa: E402
from report import save_png, write_section  # noqa: E402
from speedup_report import fmt, stats  # noqa: E402
from study_runs import (  # noqa: E402
    RECORDS,
    OutOfTime,
    RunCache,
    RunSpec,
    Scale,
    SeededSweep,
    Sweep,
    machine_line,
    model_dict,
    random_init,
    run_sweeps,
    tokens_to_reach,
    train_section,
)

from megaclone.checkpoint.manifest import atomic_write_text  # noqa: E402

NAME = "depth_growth"
PATHS = ("width", "stack", "zero", "both")
LABELS = {"random": "random init", "width": "width x2 (d/2, L)", "stack": "depth x2 by stack (d, L/2)",
          "zero": "depth x2 by zero (d, L/2)", "both": "width and depth x2 (d/2, L/2)"}
DEPTH_FLAGS = ("--clone-variant", "diagonal", "--clone-noise-db", "0")  # the launcher's defaults, written out


@dataclass(frozen=True)
class Setup:
    """The target, the sources and the budgets of one invocation (the study, or --quick)."""
    hidden: int  # T's width
    layers: int  # T's depth
    source_iters: int
    target_iters: int
    scale: Scale = Scale()

    def size(self, hidden: int, layers: int) -> Size:
        """A source as bench/hyperclone_speedup.py trains its S (the same RunSpec, hence the same records)."""
        return Size(f"d{hidden}" + ("" if layers == self.layers else f"L{layers}"), model_dict(hidden, layers),
                    self.source_iters, self.target_iters, scale=self.scale)

    @property
    def target(self) -> dict:
        return model_dict(self.hidden, self.layers)

    def source(self, path: str) -> Size:
        hidden = self.hidden // 2 if path in ("width", "both") else self.hidden
        return self.size(hidden, self.layers // 2 if path != "width" else self.layers)

    def spec(self, path: str, lr: float, seed: int) -> RunSpec:
        source = self.source(path)
        if path == "width":  # exactly the speedup study's `fresh` clone
            return source.spec("fresh", lr, seed)
        grow = ("--grow-layers", str(self.layers), *(("--grow-method", "stack") if path == "stack" else ()))
        flags = (*(CLONE if path == "both" else DEPTH_FLAGS), *grow, "--clone-seed", str(seed),
                 "--hyperclone-data", "restart", "--hyperclone-optimizer", "fresh")
        n, warmup = self.target_iters, source.warmup
        slug = f"d{self.hidden}L{self.layers}-{path}-from-{source.name}-lr{lr:g}-w{warmup}-it{n}-s{seed}"
        return RunSpec(slug, self.target, train_section(self.scale, n, lr, warmup, seed), self.scale, flags,
                       source.small_spec())


STUDY = Setup(hidden=128, layers=4, source_iters=2000, target_iters=2000)
QUICK = Setup(hidden=64, layers=4, source_iters=60, target_iters=40, scale=Scale(eval_interval=10, eval_iters=2))


@dataclass
class Result:
    setup: Setup
    seeds: tuple[int, ...]
    random: SeededSweep
    paths: dict[str, SeededSweep] = field(default_factory=dict)
    sources: dict[str, dict] = field(default_factory=dict)  # path -> the source's record


def run_study(cache: RunCache, setup: Setup, grid: tuple[float, ...], seeds: tuple[int, ...],
              max_extend: int) -> Result:
    random = random_init(cache, setup.scale, setup.target, tuple(2 * x for x in grid), seeds, setup.target_iters)
    paths = {p: SeededSweep(Sweep(lambda lr, p=p: setup.spec(p, lr, seeds[0]), grid, max_extend=max_extend),
                            lambda lr, seed, p=p: setup.spec(p, lr, seed)) for p in PATHS}
    run_sweeps(cache, [s.sweep for s in paths.values()])
    pairs = [(p, seed) for p in PATHS for seed in seeds]
    for (p, seed), record in zip(pairs, cache.ensure(paths[p].seed_spec(paths[p].best, seed) for p, seed in pairs)):
        paths[p].seeds[seed] = record
    sources = dict(zip(PATHS, cache.ensure(setup.source(p).small_spec() for p in PATHS)))
    return Result(setup, seeds, random, paths, sources)


def speedups(res: Result) -> dict[str, dict[str, list[float | None]]]:
    """path -> {"tokens", "as_is", "with_source_flops"} -> per seed: the T-tokens needed to reach random init's final
    loss, and the speedups (None: not reached)."""
    out = {}
    for p, sweep in res.paths.items():
        src = res.sources[p]
        src_flops = src["steps_run"] * src["tokens_per_step"] * src["flops_per_token"]
        out[p] = {"tokens": [], "as_is": [], "with_source_flops": []}
        for seed in res.seeds:
            rand, rec = res.random.seeds[seed], sweep.seeds[seed]
            base = rand["steps"][-1] * rand["tokens_per_step"]
            need = tokens_to_reach(rec, rand["loss"][-1])
            out[p]["tokens"].append(need)
            out[p]["as_is"].append(None if need is None else (base / need if need > 0 else math.inf))
            out[p]["with_source_flops"].append(None if need is None else base * rand["flops_per_token"] / (
                need * rec["flops_per_token"] + src_flops))
    return out


def best_path(table: dict) -> tuple[str, list[str]]:
    """The path with the largest mean speedup with the source's FLOPs counted (the least total compute to reach
    random init's final loss), and the others whose seed ranges overlap it (ties)."""
    summary = {p: stats(v["with_source_flops"]) for p, v in table.items()}
    ranked = sorted(summary, key=lambda p: (summary[p]["n"], summary[p]["mean"] or 0.0), reverse=True)
    best = summary[ranked[0]]
    if best["n"] == 0:
        return ranked[0], []
    return ranked[0], [p for p in ranked[1:] if summary[p]["n"] and summary[p]["max"] >= best["min"]]


def plot(res: Result, table: dict, path: Path) -> None:
    """Held-out curves of random init and each path's best (every seed), the seed-0 sweeps, and the speedups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_c, ax_s, ax_b) = plt.subplots(1, 3, figsize=(19, 5.5))
    colors = dict(zip(["random", *PATHS], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for p, sweep in [("random", res.random), *res.paths.items()]:
        for i, rec in enumerate(sweep.seeds.values()):
            ax_c.plot([s * rec["tokens_per_step"] for s in rec["steps"]], rec["loss"], color=colors[p], lw=1,
                      label=f"{LABELS[p]} (lr {sweep.best:g})" if i == 0 else None)
        lrs = sorted(sweep.records)
        ax_s.plot(lrs, [sweep.records[x]["loss"][-1] for x in lrs], "o-", color=colors[p], label=LABELS[p])
    final = statistics.fmean(r["loss"][-1] for r in res.random.seeds.values())
    lowest = min(min(r["loss"]) for s in [res.random, *res.paths.values()] for r in s.seeds.values())
    ax_c.axhline(final, color="grey", ls=":", lw=0.8)
    ax_c.set(title="held-out loss, every seed (dotted: random init's final)", xlabel="target-model tokens",
             ylabel="held-out loss", ylim=(lowest - 0.05, final + 1.0))
    ax_s.set(title="peak lr sweep, seed 0", xscale="log", xlabel="peak learning rate", ylabel="final held-out loss")
    for k, (kind, title) in enumerate((("as_is", "as is"), ("with_source_flops", "with the source's FLOPs"))):
        for j, p in enumerate(PATHS):
            s = stats(table[p][kind])
            if s["mean"] not in (None, math.inf):
                ax_b.bar(j + 0.4 * k, s["mean"], 0.4, yerr=s["std"] or 0.0, capsize=3, color=colors[p],
                         alpha=1.0 if k == 0 else 0.5, label=title if j == 0 else None)
    ax_b.axhline(1, color="k", lw=0.5)
    ax_b.set(title="speedup at random init's final loss\n(solid: as is; light: with the source's FLOPs)",
             xticks=[j + 0.2 for j in range(len(PATHS))], xticklabels=list(PATHS), ylabel="speedup (mean ± std)")
    for ax in (ax_c, ax_s):
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def report(docs: Path, res: Result | None, complete: bool, command: str, cache: RunCache, elapsed: float) -> None:
    """docs/results.md's section (replaced), the plot and the numbers as JSON under docs/results/."""
    results = docs / "results"
    results.mkdir(parents=True, exist_ok=True)
    lines = [f"## Growing one model four ways: width, depth by stack, depth by zero, both ({NAME})", "",
             f"`{command}` ({'complete' if complete else 'INCOMPLETE: run the same command again to continue'}; "
             f"{cache.started} runs trained by this invocation, {cache.cpu_seconds / 3600:.2f} CPU hours, "
             f"{elapsed / 3600:.2f} h wall).", "", f"Machine: {machine_line()}", ""]
    if res is None or not all(len(s.seeds) == len(res.seeds) for s in res.paths.values()):
        lines.append("No complete result yet.")
        write_section(docs / "results.md", NAME, lines)
        return
    setup, table = res.setup, speedups(res)
    target = f"d={setup.hidden}, {setup.layers} layers"
    random_tokens = setup.target_iters * setup.scale.tokens_per_step
    lines += [f"Target: {target}, {setup.target_iters} steps of {setup.scale.tokens_per_step} tokens for every run; "
              f"each source trained {setup.source_iters} steps (the same tokens). Random init's final held-out loss: "
              + ", ".join(f"{r['loss'][-1]:.4f}" for r in res.random.seeds.values())
              + f" (seeds {', '.join(map(str, res.seeds))}, peak lr {res.random.best:g}).", "",
              "| path | source | best peak lr | final held-out loss | T-tokens to reach it "
              f"(random init: {random_tokens}) | speedup (T-tokens) | with the source's FLOPs |",
              "|---|---|---|---|---|---|---|"]
    for p, sweep in res.paths.items():
        src = res.sources[p]
        final = [r["loss"][-1] for r in sweep.seeds.values()]
        lines.append(f"| {LABELS[p]} | {src['num_params'] / 1e6:.2f}M params, held-out {src['loss'][-1]:.4f} | "
                     f"{sweep.best:g}{' (edge)' if sweep.sweep.at_edge else ''} | "
                     f"{statistics.fmean(final):.4f} ({min(final):.4f}-{max(final):.4f}) | "
                     f"{fmt(stats(table[p]['tokens']), 0)} | "
                     f"{fmt(stats(table[p]['as_is']))} | {fmt(stats(table[p]['with_source_flops']))} |")
    best, ties = best_path(table)
    lines += ["", f"Best path (the largest speedup with the source's FLOPs counted: the least compute in all to reach "
                  f"random init's final loss): {LABELS[best]}"
              + (f"; within its seed range: {', '.join(LABELS[p] for p in ties)}, so the ranking between them is not "
                 "measured" if ties else "") + ".",
              "", f"![curves, sweeps and speedups](results/{NAME}.png)"]
    plot(res, table, results / f"{NAME}.png")
    payload = {"setup": {"hidden": setup.hidden, "layers": setup.layers, "source_iters": setup.source_iters,
                         "target_iters": setup.target_iters}, "seeds": list(res.seeds),
               "random_lr": res.random.best, "best_lr": {p: s.best for p, s in res.paths.items()},
               "speedups": table, "best": best, "ties": ties}
    atomic_write_text(results / f"{NAME}.json", json.dumps(payload, indent=1, default=str) + "\n")
    write_section(docs / "results.md", NAME, lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and budgets: proves the pipeline (minutes)")
    p.add_argument("--hours", type=float, default=2.0, help="start no run that would end after this many hours")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time, one process and one thread each "
                   "(default 1; --quick: 2)")
    p.add_argument("--commit", action="store_true", help="git-commit each run's record as it finishes")
    p.add_argument("--report-only", action="store_true", help="train nothing: report what the records hold")
    p.add_argument("--root", default=None, help="run directories (default runs/study, shared with the speedup study; "
                   "--quick: runs/depth_growth_quick)")
    p.add_argument("--docs", default=None, help="where results.md and results/ go (default docs/; --quick: the root)")
    args = p.parse_args(argv)
    root = Path(args.root or ROOT / "runs" / ("depth_growth_quick" if args.quick else "study"))
    docs = Path(args.docs or (root / "docs" if args.quick else ROOT / "docs"))
    cache = RunCache(root, root / "records" if args.quick else RECORDS, jobs=args.jobs or (2 if args.quick else 1),
                     commit=args.commit and not args.quick,
                     deadline=-1.0 if args.report_only else time.time() + 3600 * args.hours)
    setup = QUICK if args.quick else STUDY
    grid = (2e-3, 4e-3) if args.quick else (1e-3, 2e-3, 4e-3, 8e-3)
    seeds = (0, 1) if args.quick else (0, 1, 2)
    t0, res = time.time(), None
    try:
        res = run_study(cache, setup, grid, seeds, max_extend=1 if args.quick else 3)
        complete = True
    except OutOfTime as e:
        print(f"[{time.strftime('%H:%M:%S')}] {e}; run the same command again to continue", flush=True)
        complete = False
    command = "python bench/depth_growth.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report(docs, res, complete, command.strip(), cache, time.time() - t0)
    return 0 if complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
