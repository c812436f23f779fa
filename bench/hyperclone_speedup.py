"""HyperCloning speedup on the bundled corpus, run the way a user runs it: `launch/pretrain.py` subprocesses.

1. S (d=64) is trained to near its held-out plateau and saved.
2. At the wide size (d=128, the x2 widening of S), with the same batches, data order and schedule shape (warmup +
   cosine over the same steps, min_lr = lr/10), one run per type: random init, symmetric clone, symmetric + zero-sum
   noise at +10, 0 and -10 dB, diagonal + 0 dB noise, symmetric with dropout 0.1 (all fresh optimizer).
3. On seed 0 each type is swept over the peak learning rates; each type's best is rerun on the other seeds.
4. The control "S-equivalent": S continued on the same batches with the schedule a noise-free symmetric clone with
   a fresh optimizer follows. Under Adam that schedule is per parameter: lr x s, weight decay / s, eps x p, with s
   the input widening of the parameter's value (2 for the block matrices, 2 for the final norm under tied
   embeddings, 1 for embeddings, norms and biases) and clipping on the wide model's gradient norm
   (docs/design.md, "Carrying the optimizer state"; megaclone.clone.carry_factors). The CLI has one `train.lr` and
   one `train.weight_decay`, so that schedule cannot be set on a d=64 run; the noise-free symmetric clone *is* S
   under that schedule (same function at every step, docs/design.md, "Symmetric and diagonal variants"), and its
   symmetry monitor proves it stays so (asymmetry ~0). It is therefore the S-equivalent curve, computed at the wide
   width; its FLOPs are not charged to any other run.
5. Report: held-out curves (tokens on x), final losses, speedups (wide tokens; with S's FLOPs; with S's tokens),
   the gain over S-equivalent, the copies' asymmetry (1 - clone_similarity) over time, all with the seed spread.

    nice -n 10 python bench/hyperclone_speedup.py --quick            # minutes: proves the pipeline end to end
    nohup nice -n 10 python bench/hyperclone_speedup.py > runs/hyperclone_speedup.log 2>&1 &   # the full run
    python bench/hyperclone_speedup.py --gpu --variants sym+0dB diag+0dB   # one H100/H200 (needs deepspeed there)

The GPU variant trains S (GPT-2 small's shape, 125M, seq 512, 32 sequences/step, bf16) 1500 steps and compares
wide runs (d=1536, about 420M) of 300 steps; each run is one `python launch/pretrain.py` process on the GPU.
Budget roughly 2-3 minutes per wide run on an H100: choose --variants to fit the time there.

Finished runs (metrics.jsonl with an "end" record) are reused, so a stopped full run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from report import save_png, write_section  # noqa: E402

from megaclone.checkpoint.manifest import atomic_write_text  # noqa: E402
from megaclone.clone import widen_model_config  # noqa: E402
from megaclone.config import model_config_from_dict  # noqa: E402
from megaclone.train import read_metrics  # noqa: E402
from megaclone.train.logging import model_flops_per_token  # noqa: E402

SMALL_MODEL = {"vocab_size": 0, "vocab_multiple": 64, "hidden_size": 64, "num_layers": 4, "num_heads": 4,
               "max_seq_len": 128, "dropout": 0.0}
FACTOR = 2
SEQ_LEN = 128
GLOBAL_BATCH = 8  # sequences per optimizer step, whatever the number of processes
TOKENS_PER_STEP = GLOBAL_BATCH * SEQ_LEN
VOCAB = 1024
PRECISION = "fp32"
# --gpu: the same study at about 125M -> 420M parameters (GPT-2 small's shape widened x2) on one GPU, bf16.
GPU_SHAPE = {"SMALL_MODEL": {"vocab_size": 0, "vocab_multiple": 128, "hidden_size": 768, "num_layers": 12,
                             "num_heads": 12, "max_seq_len": 512, "dropout": 0.0},
             "SEQ_LEN": 512, "GLOBAL_BATCH": 32, "TOKENS_PER_STEP": 32 * 512, "VOCAB": 8192, "PRECISION": "bf16"}

# name -> (extra launch flags, extra --set overrides); None flags: random init at the wide size.
VARIANTS: dict[str, tuple[list[str] | None, list[str]]] = {
    "random": (None, []),
    "symmetric": (["--clone-variant", "symmetric", "--clone-noise-db", "none"], []),
    "sym+10dB": (["--clone-variant", "symmetric", "--clone-noise-db", "10"], []),
    "sym+0dB": (["--clone-variant", "symmetric", "--clone-noise-db", "0"], []),
    "sym-10dB": (["--clone-variant", "symmetric", "--clone-noise-db", "-10"], []),
    "diag+0dB": (["--clone-variant", "diagonal", "--clone-noise-db", "0"], []),
    "sym+dropout0.1": (["--clone-variant", "symmetric", "--clone-noise-db", "none"], ["model.dropout=0.1"]),
}
S_EQUIVALENT = "symmetric"  # see the module docstring, point 4


@dataclass
class Budget:
    small_iters: int
    small_lr: float
    small_eval_interval: int
    wide_iters: int
    wide_eval_interval: int
    eval_iters: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]


FULL = Budget(small_iters=2000, small_lr=3e-3, small_eval_interval=100, wide_iters=400, wide_eval_interval=20,
              eval_iters=8, lrs=(1e-3, 2e-3, 4e-3), seeds=(0, 1, 2))
GPU = Budget(small_iters=1500, small_lr=1e-3, small_eval_interval=100, wide_iters=300, wide_eval_interval=25,
             eval_iters=8, lrs=(3e-4, 6e-4, 1.2e-3), seeds=(0, 1))
QUICK = Budget(small_iters=40, small_lr=3e-3, small_eval_interval=10, wide_iters=12, wide_eval_interval=4,
               eval_iters=2, lrs=(2e-3, 4e-3), seeds=(0, 1))


def train_section(budget: Budget, iters: int, lr: float, seed: int, eval_interval: int, nprocs: int) -> dict:
    """Warmup 5% then cosine to lr/10: the same shape for every wide run, only the peak differs."""
    return {"seed": seed, "micro_batch_size": GLOBAL_BATCH // nprocs, "grad_accum_steps": 1, "train_iters": iters,
            "lr": lr, "min_lr": lr / 10, "warmup_iters": max(1, iters // 20), "weight_decay": 0.1,
            "grad_clip": 1.0, "precision": PRECISION, "eval_interval": eval_interval, "eval_iters": budget.eval_iters,
            "log_interval": max(1, iters // 10)}


def write_config(path: Path, values: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path


def free_port() -> int:
    """A free TCP port for the rendezvous: two benchmarks (or a test run) on one machine must not share 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def finished(run_dir: Path) -> bool:
    try:
        return any(r.get("event") == "end" for r in read_metrics(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def launch(run_dir: Path, args: list[str], launcher: str, log_file: Path) -> float:
    """One `launch/pretrain.py` run (skipped when already finished); returns its wall seconds."""
    if finished(run_dir):
        print(f"  reuse {run_dir.name}", flush=True)
        return 0.0
    if run_dir.exists():  # a run stopped part-way: its metrics would be appended to, start it again
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    prefix = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())] if launcher == "deepspeed" \
        else [sys.executable]
    cmd = ["nice", "-n", "10", *prefix, str(ROOT / "launch" / "pretrain.py"), "--run-dir", str(run_dir), *args]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    for attempt in (1, 2):  # one retry: a two-hour benchmark should not die of one flaky launch
        start = time.time()
        with open(log_file, "w") as out:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
        wall = time.time() - start
        if rc == 0 and finished(run_dir):
            break
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        if attempt == 2:
            raise RuntimeError(f"run {run_dir} failed twice (exit {rc}); last lines of {log_file}:\n{tail}")
        log_file.rename(log_file.with_suffix(".failed.log"))
        print(f"  run {run_dir.name} failed (exit {rc}; log kept as {log_file.with_suffix('.failed.log').name}), "
              "retrying once", flush=True)
        shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    (run_dir / "wall_seconds.txt").write_text(f"{wall:.1f}\n")
    print(f"  done  {run_dir.name}: {wall:.0f} s", flush=True)
    return wall


def recorded_wall(run_dir: Path) -> float:
    """Launch-to-exit seconds of a run, kept beside it so a resumed benchmark still reports them."""
    path = run_dir / "wall_seconds.txt"
    return float(path.read_text()) if path.is_file() else math.nan


def train_small(root: Path, budget: Budget, launcher: str, nprocs: int) -> Path:
    run_dir = root / "small"
    cfg = {"run_dir": str(run_dir), "model": SMALL_MODEL,
           "parallel": {"tp_size": 1, "pp_size": 1, "zero_stage": 1},
           "train": train_section(budget, budget.small_iters, budget.small_lr, 0, budget.small_eval_interval, nprocs),
           "data": {"data_prefix": "", "seq_len": SEQ_LEN, "vocab_size": VOCAB},
           "checkpoint": {"save": str(run_dir / "ckpt"), "save_interval": 0}}
    config = write_config(root / "configs" / "small.yaml", cfg)
    launch(run_dir, ["--config", str(config)], launcher, root / "logs" / "small.log")
    return run_dir


def wide_model() -> dict:
    wide = widen_model_config(model_config_from_dict(SMALL_MODEL), FACTOR)
    return {k: getattr(wide, k) for k in ("vocab_size", "vocab_multiple", "hidden_size", "num_layers", "num_heads",
                                          "num_query_groups", "head_size", "ffn_size", "max_seq_len", "dropout")}


def run_wide(root: Path, budget: Budget, variant: str, lr: float, seed: int, launcher: str, nprocs: int) -> Path:
    flags, sets = VARIANTS[variant]
    name = f"{variant}_lr{lr:g}_seed{seed}"
    run_dir = root / "wide" / name
    cfg = {"model": wide_model(), "parallel": {"tp_size": 1, "pp_size": 1, "zero_stage": 1},
           "train": train_section(budget, budget.wide_iters, lr, seed, budget.wide_eval_interval, nprocs),
           "data": {"data_prefix": str(root / "small" / "data" / "corpus"), "seq_len": SEQ_LEN},
           "checkpoint": {"save": "", "save_interval": 0}}
    args = ["--config", str(write_config(root / "configs" / f"{name}.yaml", cfg))]
    if flags is not None:
        args += ["--init-from", str(root / "small" / "ckpt"), "--hyperclone", str(FACTOR), "--clone-seed", str(seed),
                 "--hyperclone-optimizer", "fresh", *flags]
    if sets:
        args += ["--set", *sets]
    launch(run_dir, args, launcher, root / "logs" / f"{name}.log")
    return run_dir


# ------------------------------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------------------------------

def curve(run_dir: Path) -> dict:
    """Held-out curve of one run: tokens, loss, asymmetry (1 - copy similarity; clones only), flops per token."""
    evals = read_metrics(run_dir, "eval")
    start = read_metrics(run_dir, "start")[0]
    model = start["config"]["model"]
    fpt = model_flops_per_token(start["num_params"], model["num_layers"], model["hidden_size"], SEQ_LEN)
    return {"steps": [e["step"] for e in evals], "tokens": [e["step"] * TOKENS_PER_STEP for e in evals],
            "loss": [e["eval_loss"] for e in evals],
            "asymmetry": [1.0 - e["clone_similarity"] if "clone_similarity" in e else None for e in evals],
            "num_params": start["num_params"], "flops_per_token": fpt}


def tokens_to_reach(c: dict, target: float) -> float | None:
    """Tokens at the first evaluation where the curve is at or below `target`, linearly interpolated; None: never."""
    pts = list(zip(c["tokens"], c["loss"]))
    for i, (tok, loss) in enumerate(pts):
        if loss <= target:
            if i == 0:
                return float(tok)
            t0, l0 = pts[i - 1]
            return t0 + (tok - t0) * (l0 - target) / (l0 - loss) if l0 != loss else float(tok)
    return None


def spread(values: list[float]) -> tuple[float, float, float]:
    """(mean, std, max - min) over seeds."""
    if not values:
        return math.nan, math.nan, math.nan
    if not all(math.isfinite(v) for v in values):  # a speedup with the target already met at the clone point
        return math.inf, math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, max(values) - min(values)


def analyse(curves: dict[str, dict], best: dict[str, float], sweep: dict[str, dict[float, float]], budget: Budget,
            small: dict) -> dict:
    s_tokens = budget.small_iters * TOKENS_PER_STEP
    s_flops = s_tokens * small["flops_per_token"]
    rows = {}
    for variant, lr in best.items():
        per_seed = []
        for seed in budget.seeds:
            c = curves[f"{variant}_lr{lr:g}_seed{seed}"]
            rand = curves[f"random_lr{best['random']:g}_seed{seed}"]
            seq = curves[f"{S_EQUIVALENT}_lr{best[S_EQUIVALENT]:g}_seed{seed}"]
            target, total = rand["loss"][-1], rand["tokens"][-1]
            need = total if variant == "random" else tokens_to_reach(c, target)
            fpt = c["flops_per_token"]
            per_seed.append({
                "seed": seed, "final_loss": c["loss"][-1], "tokens_to_random_final": need,
                "speedup": (total / need if need > 0 else math.inf) if need is not None else None,
                "speedup_with_s_tokens": total / (need + (0 if variant == "random" else s_tokens))
                if need is not None else None,
                "speedup_with_s_flops": (total * rand["flops_per_token"])
                / (need * fpt + (0 if variant == "random" else s_flops)) if need is not None else None,
                "gain_over_s_equivalent": seq["loss"][-1] - c["loss"][-1],
                "final_asymmetry": c["asymmetry"][-1]})
        row = {"lr": lr, "sweep": sweep[variant], "lr_at_sweep_edge": lr in (min(budget.lrs), max(budget.lrs)),
               "seeds": per_seed}
        for key in ("final_loss", "speedup", "speedup_with_s_tokens", "speedup_with_s_flops",
                    "gain_over_s_equivalent", "final_asymmetry"):
            vals = [s[key] for s in per_seed if s[key] is not None]
            row[key] = dict(zip(("mean", "std", "range"), spread(vals)), n=len(vals), of=len(per_seed))
        rows[variant] = row
    return rows


def verdict(rows: dict) -> list[str]:
    clones = {k: v for k, v in rows.items() if k not in ("random", S_EQUIVALENT)}
    if not clones:
        return ["no clone variant to judge"]
    best = max(clones, key=lambda k: -rows[k]["final_loss"]["mean"])
    r = rows[best]
    seq_spread = max(rows[S_EQUIVALENT]["final_loss"]["range"], r["final_loss"]["range"])
    gains = [s["gain_over_s_equivalent"] for s in r["seeds"]]
    g = r["gain_over_s_equivalent"]
    sp, spf = r["speedup"], r["speedup_with_s_flops"]
    out = [f"best variant by final loss: {best} (lr {r['lr']:g})"]
    out.append(f"- wide-token speedup {_fmt(sp, 2)} (reached random's final loss on {sp['n']}/{sp['of']} seeds; "
               f"goal >= 2x): {'met' if sp['n'] == sp['of'] and sp['mean'] >= 2 else 'NOT met'}")
    out.append(f"- gain over S-equivalent, paired by seed (the same batches): {g['mean']:+.4f} ± {g['std']:.4f}, "
               f"smallest {min(gains):+.4f}, spread of the gain over seeds {g['range']:.4f}: "
               f"{'met' if min(gains) > 0 and g['mean'] > g['range'] else 'NOT met'} (every seed gains, by more "
               f"than the gain's spread); unpaired, against the spread of final losses over seeds ({seq_spread:.4f}, "
               f"mostly the data order every run of a seed shares): "
               f"{'met' if g['mean'] > seq_spread else 'NOT met'}")
    out.append(f"- speedup with S's FLOPs counted {spf['mean']:.2f}x (goal >= 1.3x): "
               f"{'met' if spf['n'] == spf['of'] and spf['mean'] >= 1.3 else 'NOT met'}")
    return out


def plot(curves: dict[str, dict], best: dict[str, float], budget: Budget, small: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_w, ax_a) = plt.subplots(1, 3, figsize=(18, 5.5))
    ax_s.plot(small["tokens"], small["loss"], "k.-")
    ax_s.set(title=f"S (d={SMALL_MODEL['hidden_size']}): held-out loss", xlabel="tokens", ylabel="held-out loss")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (variant, lr) in enumerate(best.items()):
        for j, seed in enumerate(budget.seeds):
            c = curves[f"{variant}_lr{lr:g}_seed{seed}"]
            label = f"{variant} (lr {lr:g})" + (" = S-equivalent" if variant == S_EQUIVALENT else "")
            ax_w.plot(c["tokens"], c["loss"], color=colors[i % len(colors)], alpha=0.8,
                      label=label if j == 0 else None)
            if variant != "random":
                ax_a.plot(c["tokens"], [a if a is not None else math.nan for a in c["asymmetry"]],
                          color=colors[i % len(colors)], alpha=0.8, label=label if j == 0 else None)
    ax_w.set(title=f"wide (d={SMALL_MODEL['hidden_size'] * FACTOR}): held-out loss, {len(budget.seeds)} seeds",
             xlabel="wide-model tokens", ylabel="held-out loss")
    ax_w.legend(fontsize=8)
    ax_a.set(title="copy asymmetry (1 - clone_similarity)", xlabel="wide-model tokens", yscale="symlog")
    ax_a.set_yscale("symlog", linthresh=1e-6)
    ax_a.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _fmt(d: dict, digits: int = 3) -> str:
    if d["n"] == 0:
        return "not reached"
    if d["mean"] == math.inf:
        return "∞ (already below at the clone point)"
    text = f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"
    return text + (f" ({d['n']}/{d['of']} seeds)" if d["n"] < d["of"] else "")


def write_report(path: Path, name: str, rows: dict, small_info: dict, budget: Budget, quick: bool, command: str,
                 machine: str, timings: dict, verdict_lines: list[str]) -> None:
    lines = [f"## HyperCloning speedup{' on a GPU' if name.endswith('_gpu') else ''} (bench/hyperclone_speedup.py)",
             ""]
    if quick:
        lines += ["**QUICK RUN: a few steps per run to prove the pipeline end to end. The numbers below mean nothing "
                  "about HyperCloning; the full run is `python bench/hyperclone_speedup.py` (about 2 hours).**", ""]
    lines += [f"Command: `{command}`", "", f"Machine: {machine}", "",
              f"S: d={SMALL_MODEL['hidden_size']}, {SMALL_MODEL['num_layers']} layers, {SMALL_MODEL['num_heads']} "
              f"heads, vocab {VOCAB}, seq {SEQ_LEN}, {GLOBAL_BATCH} sequences/step, {PRECISION}, "
              f"{budget.small_iters} steps at lr {budget.small_lr:g} ({small_info['tokens']:,} tokens); held-out "
              f"loss {small_info['first']:.4f} -> {small_info['final']:.4f}; over the last 20% of its steps it fell "
              f"{small_info['late_drop']:.4f} ({small_info['late_drop_rel']:.2%}).", "",
              f"Wide: the x{FACTOR} widening (d={SMALL_MODEL['hidden_size'] * FACTOR}, "
              f"{SMALL_MODEL['num_heads'] * FACTOR} heads), {budget.wide_iters} steps "
              f"({budget.wide_iters * TOKENS_PER_STEP:,} tokens), warmup 5% + cosine to lr/10, the same batches "
              f"for every run of a seed; fresh AdamW for every clone. Learning rates swept on seed 0: "
              f"{', '.join(f'{x:g}' for x in budget.lrs)}; seeds {', '.join(map(str, budget.seeds))}.", "",
              "S-equivalent = the noise-free symmetric clone (identical function to S under the clone-equivalent "
              "schedule; see the docstring of the bench for why it is not a run of S: the CLI has no per-parameter "
              "lr/weight-decay multiplier).", "",
              "Values: mean ± std over seeds. Speedup: wide tokens random init needed for its final loss / tokens "
              "the run needed (linear interpolation between evaluations); 'with S FLOPs/tokens': S's training "
              "added to the run's cost. Gain: S-equivalent's final loss minus the run's (same seed).", "",
              "| run | best lr (sweep: final loss) | final loss | speedup | w/ S FLOPs | w/ S tokens | gain over "
              "S-eq | final asymmetry |", "|---|---|---|---|---|---|---|---|"]
    for variant, r in rows.items():
        sweep = ", ".join(f"{lr:g}: {loss:.3f}" for lr, loss in sorted(r["sweep"].items()))
        edge = " (edge)" if r["lr_at_sweep_edge"] else ""
        asym = "-" if variant == "random" else _fmt(r["final_asymmetry"], 2 if quick else 4).replace("nan", "-")
        lines.append(f"| {variant} | {r['lr']:g}{edge} ({sweep}) | {_fmt(r['final_loss'], 4)} | {_fmt(r['speedup'], 2)}"
                     f" | {_fmt(r['speedup_with_s_flops'], 2)} | {_fmt(r['speedup_with_s_tokens'], 2)} | "
                     f"{_fmt(r['gain_over_s_equivalent'], 4)} | {asym} |")
    lines += ["", f"![held-out loss curves](results/{name}.png)", "",
              f"Raw curves: [results/{name}.json](results/{name}.json).", "",
              "### Verdict", "", *verdict_lines, "",
              "### Timing", "", *[f"- {k}: {v}" for k, v in timings.items()], ""]
    write_section(path, name, lines)


def machine_line(launcher: str) -> str:
    load = os.getloadavg()
    import torch

    procs = "deepspeed --num_gpus 2: 2 processes, DP=2" if launcher == "deepspeed" else "python: 1 process"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, {gpu}; runs as {procs}, "
            f"one at a time under nice -n 10; load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
            "(the machine is shared with other jobs, so wall times are noisy)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps per run: proves the pipeline (minutes)")
    p.add_argument("--root", default=None, help="run directory (default runs/hyperclone_speedup[_quick])")
    p.add_argument("--launcher", choices=("deepspeed", "python"), default=None,
                   help="deepspeed --num_gpus 2 (DP=2: measured faster per step here; the default) or one python "
                        "process (starts faster: the default of --quick, whose runs are a few steps)")
    p.add_argument("--docs", default=str(ROOT / "docs"), help="where results.md and results/ go")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU variant: S of 125M parameters widened to about 420M, bf16, one process on one GPU")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS),
                   help="run types to compare (random and symmetric are always run: the baseline and S-equivalent)")
    p.add_argument("--wide-iters", type=int, default=None,
                   help="steps of every wide run (default: the budget's); evaluated 20 times in each run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the budget's; the first "
                   "one sweeps the learning rates)")
    args = p.parse_args(argv)
    name = "hyperclone_speedup" + ("_gpu" if args.gpu else "") + (f"_{args.wide_iters}" if args.wide_iters else "")
    if args.gpu:
        globals().update(GPU_SHAPE)
    budget = QUICK if args.quick else GPU if args.gpu else FULL
    if args.seeds:
        budget = replace(budget, seeds=tuple(args.seeds))
    if args.wide_iters:
        budget = replace(budget, wide_iters=args.wide_iters, wide_eval_interval=max(1, args.wide_iters // 20))
    args.launcher = args.launcher or ("python" if args.quick or args.gpu else "deepspeed")
    root = Path(args.root or ROOT / "runs" / (name + ("_quick" if args.quick else "")))
    variants = [v for v in VARIANTS if v in {"random", S_EQUIVALENT, *args.variants}]
    nprocs = 2 if args.launcher == "deepspeed" else 1
    (root / "logs").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] S: {budget.small_iters} steps", flush=True)
    small_dir = train_small(root, budget, args.launcher, nprocs)
    curves: dict[str, dict] = {}
    sweep: dict[str, dict[float, float]] = {}
    for variant in variants:  # learning-rate sweep, seed 0
        for lr in budget.lrs:
            print(f"[{time.strftime('%H:%M:%S')}] sweep {variant} lr {lr:g}", flush=True)
            run_dir = run_wide(root, budget, variant, lr, budget.seeds[0], args.launcher, nprocs)
            curves[run_dir.name] = curve(run_dir)
            sweep.setdefault(variant, {})[lr] = curves[run_dir.name]["loss"][-1]
    best = {v: min(losses, key=losses.get) for v, losses in sweep.items()}
    for seed in budget.seeds[1:]:
        for variant, lr in best.items():
            print(f"[{time.strftime('%H:%M:%S')}] seed {seed} {variant} lr {lr:g}", flush=True)
            run_dir = run_wide(root, budget, variant, lr, seed, args.launcher, nprocs)
            curves[run_dir.name] = curve(run_dir)
    small = curve(small_dir)
    late = [loss for step, loss in zip(small["steps"], small["loss"]) if step >= 0.8 * budget.small_iters]
    small_info = {"tokens": budget.small_iters * TOKENS_PER_STEP, "first": small["loss"][0], "final": small["loss"][-1],
                  "late_drop": late[0] - late[-1], "late_drop_rel": (late[0] - late[-1]) / late[0]}
    num_params = {curves[f"{v}_lr{lr:g}_seed{budget.seeds[0]}"]["num_params"] for v, lr in best.items()}
    if len(num_params) != 1:
        raise RuntimeError(f"wide runs have different parameter counts {num_params}: random init and the clones "
                           "must share one architecture")
    rows = analyse(curves, best, sweep, budget, small)
    verdict_lines = verdict(rows)
    docs = Path(args.docs)
    (docs / "results").mkdir(parents=True, exist_ok=True)
    plot(curves, best, budget, small, docs / "results" / f"{name}.png")
    raw = {"quick": args.quick, "budget": asdict(budget), "tokens_per_step": TOKENS_PER_STEP, "small": small,
           "small_summary": small_info, "best_lr": best, "rows": rows, "curves": curves}
    atomic_write_text(docs / "results" / f"{name}.json", json.dumps(raw, indent=1))
    command = " ".join(["python bench/hyperclone_speedup.py", *(argv if argv is not None else sys.argv[1:])])
    total = time.time() - t0
    walls = [recorded_wall(root / "wide" / name) for name in curves]
    timings = {"S training (wall, incl. launch)": f"{recorded_wall(small_dir):.0f} s",
               "wide runs (wall, incl. launch)": f"{sum(walls):.0f} s in all, {statistics.median(walls):.0f} s median",
               "this invocation (wall; finished runs are reused)": f"{total:.0f} s",
               "runs": f"1 S + {len(curves)} wide"}
    write_report(docs / "results.md", name, rows, small_info, budget, args.quick, command,
                 machine_line(args.launcher), timings, verdict_lines)
    print("\n".join(verdict_lines))
    print(f"[{time.strftime('%H:%M:%S')}] wrote {docs / 'results.md'} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
