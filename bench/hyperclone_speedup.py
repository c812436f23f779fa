"""Does HyperCloning beat a well-tuned random init, and how does that change with scale? (issue 16)

On the bundled corpus, through `launch/pretrain.py` as a user runs it: one process, one torch thread, fp32,
ZeRO-1, every run cached as a committed record by bench/study_runs.py. At each size a small model S (4 layers) is
trained to near its plateau and widened x2. At the wide size every run of seed s reads the same batches (the
corpus from its start, in seed s's order). The run types:

  random        random init
  fresh         the default clone (diagonal + 0 dB) with a fresh AdamW at its own swept peak lr and warmup
  fresh@random  the same clone at random init's best peak lr and warmup
  carry0        the default clone with S's AdamW carried, the schedule restarted at the widening, transition 0
  carry100      the same with a 100-step transition from the exact-continuation values
  continued     S itself resumed (its optimizer, its final lr, data read on): a reference curve

Protocol: at the smallest size each swept type's peak lr runs on a x2 grid of 4 values on seed 0; a best value at
an edge is extended on that side until it is interior (at most 3 steps); fresh's warmup then runs at x4 around 5%
at its best lr; every type's best runs on seeds 1 and 2. At the two larger sizes random init and the best recipe
(the clone type with the largest speedup at the 100% target) get a 3-point sweep around the next smaller size's
optimum, extended likewise, and their best runs on seed 1 (S continued, a reference only, is run at the smallest
size alone). Speedup (bench/speedup_report.py): for random init's
held-out loss at 25/50/75/100% of its steps, the wide-model tokens each run needs to reach it, relative to random's,
as is, with S's training FLOPs added, and with S's tokens added; mean and spread over the seeds.

    python bench/hyperclone_speedup.py --quick                  # under 5 minutes on 2 idle cores: the pipeline
    nohup python bench/hyperclone_speedup.py --jobs 2 --commit > runs/study.log 2>&1 &   # the study, 2 h at most
    python bench/hyperclone_speedup.py --report-only            # the report from the committed records only
    python bench/hyperclone_speedup.py --gpu                    # one H100/H200: the large-size protocol, 91M -> 353M

An invocation stops starting runs when its --hours are up, writes the report of what is complete and exits with
75; the same command continues. Finished runs are never repeated: their records sit in docs/results/runs/.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from study_runs import (  # noqa: E402
    RECORDS,
    OutOfTime,
    RunCache,
    RunSpec,
    Scale,
    Sweep,
    model_dict,
    random_spec,
    run_sweeps,
    train_section,
    widened,
)

CLONE = ("--hyperclone", "2", "--clone-variant", "diagonal", "--clone-noise-db", "0")
SWEPT = ("random", "fresh", "carry0", "carry100")  # fresh@random takes random's values
CLONES = ("fresh", "fresh@random", "carry0", "carry100")
SMALL_SEED = 100  # S's init and data order, apart from the wide runs' seeds 0, 1, 2
EXIT_INCOMPLETE = 75  # the invocation's time was up before the study was complete: run it again


@dataclass(frozen=True)
class Size:
    name: str  # the small model's width, e.g. "d64"
    small: dict  # S
    small_iters: int
    wide_iters: int
    small_lr: float = 3e-3
    scale: Scale = Scale()

    @property
    def wide(self) -> dict:
        return widened(self.small)

    @property
    def warmup(self) -> int:
        return round(0.05 * self.wide_iters)

    def small_spec(self) -> RunSpec:
        iters = self.small_iters
        return RunSpec(f"{self.name}-small-lr{self.small_lr:g}-it{iters}", self.small,
                       train_section(self.scale, iters, self.small_lr, round(0.05 * iters), SMALL_SEED), self.scale,
                       save=True)

    def spec(self, kind: str, lr: float, seed: int, warmup: int | None = None) -> RunSpec:
        """The wide run of `kind` at peak `lr` (and warmup, default 5%) on `seed`."""
        warmup = self.warmup if warmup is None else int(warmup)
        n, small = self.wide_iters, self.small_spec()
        if kind == "random":
            return random_spec(self.scale, self.wide, lr, seed, n, warmup / n)
        slug = f"d{self.wide['hidden_size']}L{self.wide['num_layers']}-{kind}-from-{self.name}-lr{lr:g}-w{warmup}" \
               f"-it{n}-s{seed}"
        flags = (*CLONE, "--clone-seed", str(seed), "--hyperclone-data", "restart")
        if kind in ("fresh", "fresh@random"):
            return RunSpec(slug.replace("fresh@random", "fresh"), self.wide,
                           train_section(self.scale, n, lr, warmup, seed), self.scale,
                           (*flags, "--hyperclone-optimizer", "fresh"), small)
        transition = {"carry0": "0", "carry100": "100"}[kind]
        return RunSpec(slug, self.wide, train_section(self.scale, small.train["train_iters"] + n, lr, warmup, seed),
                       self.scale, (*flags, "--hyperclone-optimizer", "carry", "--hyperclone-schedule", "restart",
                                    "--hyperclone-lr-transition", transition), small)

    def continued_spec(self) -> RunSpec:
        """S resumed exactly (optimizer, data position) for the wide budget at its final learning rate."""
        small = self.small_spec()
        end = self.small_iters + self.wide_iters
        train = {**small.train, "train_iters": end, "lr_decay_iters": self.small_iters}
        return RunSpec(f"{self.name}-continued-it{end}", self.small, train, self.scale, source=small,
                       source_flag="--load")


def cpu_sizes() -> list[Size]:
    return [Size(f"d{h}", model_dict(h), 2000, 2000) for h in (64, 96, 128)]


def quick_sizes() -> list[Size]:
    scale = Scale(eval_interval=10, eval_iters=2)
    return [Size(f"q{h}", model_dict(h), 60, 40, scale=scale) for h in (32, 48)]


def gpu_size() -> Size:
    scale = Scale(seq_len=512, batch=32, vocab=8192, precision="bf16", eval_interval=25, eval_iters=8)
    small = {**model_dict(768, layers=12, head_size=64, max_seq_len=512), "vocab_multiple": 128}
    return Size("gpt125m", small, 1500, 300, small_lr=1e-3, scale=scale)


@dataclass
class TypeResult:
    """One run type at one size: its sweeps (seed 0) and the best setting's record per seed."""
    lr: float
    warmup: int
    sweep: dict[float, dict] = field(default_factory=dict)  # lr -> seed-0 record
    warmup_sweep: dict[float, dict] = field(default_factory=dict)  # warmup -> seed-0 record (fresh only)
    seeds: dict[int, dict] = field(default_factory=dict)
    at_edge: bool = False  # the best lr is still at an edge (extension limit reached)


@dataclass
class SizeResult:
    size: Size
    types: dict[str, TypeResult]
    small: dict  # S's record
    continued: dict | None  # S continued (the smallest size only)
    seeds: tuple[int, ...]


def study_smallest(cache: RunCache, size: Size, grid: dict[str, tuple[float, ...]], seeds: tuple[int, ...],
                   max_extend: int) -> SizeResult:
    """The full protocol: every type swept on seed 0, fresh's warmup after its lr, every best on `seeds`."""
    sweeps = {t: Sweep(lambda lr, t=t: size.spec(t, lr, seeds[0]), grid[t], max_extend=max_extend) for t in SWEPT}
    run_sweeps(cache, sweeps.values())
    fresh_lr, w = sweeps["fresh"].best, size.warmup
    warm = Sweep(lambda x: size.spec("fresh", fresh_lr, seeds[0], round(x)), (max(1, round(w / 4)), w, 4 * w), factor=4,
                 max_extend=max_extend, bounds=(1, size.wide_iters / 2))
    run_sweeps(cache, [warm])
    types = {t: TypeResult(s.best, size.warmup, dict(s.records), at_edge=s.at_edge) for t, s in sweeps.items()}
    types["fresh"].warmup, types["fresh"].warmup_sweep = round(warm.best), dict(warm.records)
    types["fresh@random"] = TypeResult(types["random"].lr, size.warmup)
    return finish(cache, size, types, seeds, continued=True)


def study_larger(cache: RunCache, size: Size, centers: dict[str, TypeResult], smaller: Size,
                 seeds: tuple[int, ...], max_extend: int) -> SizeResult:
    """Random init and the recipe: a 3-point sweep around the smaller size's optimum, the best on `seeds`."""
    swept = [t for t in centers if t != "fresh@random"]
    warmups = {t: round(centers[t].warmup / smaller.wide_iters * size.wide_iters) for t in centers}
    sweeps = {t: Sweep(lambda lr, t=t: size.spec(t, lr, seeds[0], warmups[t]),
                       (centers[t].lr / 2, centers[t].lr, centers[t].lr * 2), max_extend=max_extend) for t in swept}
    run_sweeps(cache, sweeps.values())
    types = {t: TypeResult(s.best, warmups[t], dict(s.records), at_edge=s.at_edge) for t, s in sweeps.items()}
    if "fresh@random" in centers:
        types["fresh@random"] = TypeResult(types["random"].lr, warmups["random"])
    return finish(cache, size, types, seeds, continued=False)


def finish(cache: RunCache, size: Size, types: dict[str, TypeResult], seeds: tuple[int, ...],
           continued: bool) -> SizeResult:
    """Each type's best on every seed, S's record and (`continued`) S continued."""
    pairs = [(t, s) for t in types for s in seeds]
    records = cache.ensure(size.spec(t, types[t].lr, s, types[t].warmup) for t, s in pairs)
    for (t, s), rec in zip(pairs, records):
        types[t].seeds[s] = rec
    small, *more = cache.ensure([size.small_spec(), *([size.continued_spec()] if continued else [])])
    # A resumed run does not evaluate before its first step: its curve starts where S's ends.
    cont = {**more[0], "steps": [0, *more[0]["steps"]], "loss": [small["loss"][-1], *more[0]["loss"]]} if more \
        else None
    return SizeResult(size, types, small, cont, seeds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and budgets: proves the pipeline (minutes)")
    p.add_argument("--gpu", action="store_true", help="the large-size protocol at S = GPT-2 small's shape (91M "
                   "parameters at its 8192 vocabulary), widened to 353M, bf16, on one GPU")
    p.add_argument("--gpu-lr", type=float, default=6e-4, help="--gpu: centre of the 3-point lr sweeps")
    p.add_argument("--recipe", choices=CLONES, default=None,
                   help="the clone type taken to the larger sizes (default: the best at the smallest size)")
    p.add_argument("--sizes", type=int, default=None, help="study the N smallest sizes only (default all): lets "
                   "another benchmark run between the smallest size and the larger ones")
    p.add_argument("--hours", type=float, default=2.0, help="start no run that would end after this many hours")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time, each one process with one thread "
                   "(default 1; --quick: 2)")
    p.add_argument("--commit", action="store_true", help="git-commit each run's record as it finishes")
    p.add_argument("--report-only", action="store_true", help="train nothing: report what the records hold")
    p.add_argument("--root", default=None, help="run directories (default runs/study[_quick])")
    p.add_argument("--docs", default=None, help="where results.md and results/ go (default docs/; --quick: the root)")
    args = p.parse_args(argv)
    from speedup_report import best_recipe, write_report

    root = Path(args.root or ROOT / "runs" / ("study_quick" if args.quick else "study"))
    docs = Path(args.docs or (root / "docs" if args.quick else ROOT / "docs"))
    records = root / "records" if args.quick else RECORDS
    cache = RunCache(root, records, jobs=args.jobs or (2 if args.quick else 1), commit=args.commit and not args.quick,
                     deadline=-1.0 if args.report_only else time.time() + 3600 * args.hours)
    study = quick_sizes() if args.quick else [gpu_size()] if args.gpu else cpu_sizes()
    sizes = study[:args.sizes] if args.sizes else study
    grid_lrs = (2e-3, 4e-3) if args.quick else (1e-3, 2e-3, 4e-3, 8e-3)
    grid = {t: grid_lrs for t in SWEPT} | {"random": tuple(2 * x for x in grid_lrs)}
    max_extend, t0 = (1 if args.quick else 3), time.time()
    results: list[SizeResult] = []
    try:
        if args.gpu:
            recipe = args.recipe or "fresh"
            centers = {t: TypeResult(args.gpu_lr, sizes[0].warmup) for t in ("random", recipe)}
            results.append(study_larger(cache, sizes[0], centers, sizes[0], (0, 1), max_extend))
        else:
            results.append(study_smallest(cache, sizes[0], grid, (0, 1) if args.quick else (0, 1, 2), max_extend))
            recipe = args.recipe or best_recipe(results[0])
            for size in sizes[1:]:
                prev = results[-1]
                centers = {t: prev.types[t] for t in ("random", recipe)}
                results.append(study_larger(cache, size, centers, prev.size, (0, 1), max_extend))
        complete = True
    except OutOfTime as e:
        print(f"[{time.strftime('%H:%M:%S')}] {e}; run the same command again to continue", flush=True)
        complete = False
    command = "python bench/hyperclone_speedup.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(docs, results, complete=complete and len(results) == len(study), quick=args.quick, gpu=args.gpu,
                 command=command.strip(), cache=cache, elapsed=time.time() - t0)
    return 0 if complete else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
