"""The speedup study's numbers, plots and docs/results.md section, from the run records alone (no training here).

Speedup at a target: random init's held-out loss after k% of its steps is the target; a run's cost to reach it is
the wide-model tokens from which on its held-out curve stays at or below it (the last crossing, linear between
evaluations), relative to the tokens random init took (k% of its steps). A clone starts below an early target and
rises above it after the widening: it has reached the target when it is back down for good, not at step 0.
"With S's FLOPs": the run's FLOPs plus all of S's training FLOPs against random init's FLOPs; "with S's tokens":
the same in tokens. A clone never above the target needs 0 tokens: infinite as is, finite with S counted.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from report import save_png, write_section
from study_runs import loss_at, machine_line, tokens_to_reach

from megaclone.checkpoint.manifest import atomic_write_text

if TYPE_CHECKING:
    from hyperclone_speedup import Size, SizeResult
    from study_runs import RunCache

TARGETS = (0.25, 0.5, 0.75, 1.0)
KINDS = ("as_is", "with_s_flops", "with_s_tokens")
KIND_TITLES = {"as_is": "wide-model tokens", "with_s_flops": "with S's FLOPs counted",
               "with_s_tokens": "with S's tokens counted"}
LABELS = {"random": "random init", "fresh": "clone, fresh AdamW, own lr + warmup",
          "fresh@random": "clone, fresh AdamW, random init's lr + warmup",
          "carry0": "clone, carried AdamW, restart, T=0", "carry100": "clone, carried AdamW, restart, T=100",
          "continued": "S continued (reference, its own held-out batches)"}
GOAL_AS_IS, GOAL_FLOPS = 2.0, 1.3
NAME = "speedup_study"


def speedups(res: SizeResult) -> dict[str, dict[str, dict[float, list[float | None]]]]:
    """type -> kind -> target -> per-seed speedup (inf: never above the target; None: not reached by the end).

    Paired by seed: the held-out batches follow the run's seed, so a run is measured against the random init of
    its own seed. S continued is left out: it resumes S, whose seed (and so whose held-out batches) are S's own.
    """
    n, small = res.size.wide_iters, res.small
    s_tokens = small["steps_run"] * small["tokens_per_step"]
    s_flops = s_tokens * small["flops_per_token"]
    out: dict = {}
    for t, by_seed in ((t, r.seeds) for t, r in res.types.items()):
        out[t] = {k: {x: [] for x in TARGETS} for k in KINDS}
        for seed in res.seeds:
            rand, rec = res.types["random"].seeds[seed], by_seed[seed]
            for x in TARGETS:
                step = round(x * n)
                base = step * rand["tokens_per_step"]
                need = float(base) if t == "random" else tokens_to_reach(rec, loss_at(rand, step))
                extra = (0.0, 0.0) if t == "random" else (s_tokens, s_flops)
                values = (None, None, None) if need is None else (
                    base / need if need > 0 else math.inf,
                    base * rand["flops_per_token"] / (need * rec["flops_per_token"] + extra[1]),
                    base / (need + extra[0]))
                for k, v in zip(KINDS, values):
                    out[t][k][x].append(v)
    return out


def stats(values: list[float | None]) -> dict:
    """mean, std, min, max over the seeds that reached the target (n of them, of all); inf if any is inf."""
    got = [v for v in values if v is not None]
    if not got:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "of": len(values)}
    inf = any(math.isinf(v) for v in got)
    return {"mean": math.inf if inf else statistics.fmean(got),
            "std": None if inf or len(got) < 2 else statistics.stdev(got),
            "min": min(got), "max": max(got), "n": len(got), "of": len(values)}


def fmt(s: dict, digits: int = 2) -> str:
    if s["n"] == 0:
        return "not reached"
    if math.isinf(s["mean"]):
        low = "" if math.isinf(s["min"]) else f", lowest {s['min']:.{digits}f}"
        return f"∞ (never above it{low})"
    text = f"{s['mean']:.{digits}f}" + ("" if s["std"] is None else f" ± {s['std']:.{digits}f}")
    text += f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})" if s["of"] > 1 else ""
    return text + (f", reached on {s['n']}/{s['of']} seeds" if s["n"] < s["of"] else "")


def best_recipe(res: SizeResult) -> str:
    """The clone type with the largest speedup at the 100% target (seeds reaching it first, then the mean), ties
    broken by the mean final loss."""
    table = speedups(res)

    def key(t: str) -> tuple:
        s = stats(table[t]["as_is"][1.0])
        return s["n"], s["mean"] or 0.0, -statistics.fmean(r["loss"][-1] for r in res.types[t].seeds.values())

    return max((t for t in res.types if t != "random"), key=key)


def trend(results: list[SizeResult], recipe: str) -> dict:
    """The recipe's 100%-target speedups against the wide model's parameter count, and a log-log line through
    them: where it reaches the goals (an extrapolation from the sizes measured)."""
    points = []
    for res in results:
        table = speedups(res)
        row = {"size": res.size.name, "wide_params": res.types["random"].seeds[res.seeds[0]]["num_params"]}
        for k in KINDS:
            row[k] = stats(table[recipe][k][1.0])
        points.append(row)
    fits = {}
    for k, goal in (("as_is", GOAL_AS_IS), ("with_s_flops", GOAL_FLOPS)):
        pts = [(math.log(p["wide_params"]), math.log(p[k]["mean"])) for p in points
               if p[k]["mean"] not in (None, math.inf) and p[k]["mean"] > 0]
        if len(pts) < 2:
            continue
        mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
        slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
        fits[k] = {"slope": slope, "intercept": my - slope * mx, "goal": goal, "points": len(pts),
                   "params_at_goal": math.exp((math.log(goal) - (my - slope * mx)) / slope) if slope > 0 else None}
    return {"recipe": recipe, "points": points, "fits": fits}


def predict(fit: dict, params: float) -> float:
    return math.exp(fit["intercept"] + fit["slope"] * math.log(params))


def wide_params(size: Size) -> int:
    """Parameters of `size`'s wide model (vocabulary padded as a run pads it)."""
    import dataclasses

    from megaclone.config import model_config_from_dict
    from megaclone.spec import build_param_specs

    cfg = dataclasses.replace(model_config_from_dict(size.wide), vocab_size=size.scale.vocab)
    return sum(s.numel for s in build_param_specs(cfg))


def plot_size(res: SizeResult, table: dict, path: Path) -> None:
    """Curves of every type's best (each seed), the seed-0 sweeps, the copies' asymmetry, and the three speedups
    against the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    (ax_c, ax_s, ax_a), bottom = axes
    colors = dict(zip([*res.types, "continued"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    n, tps = res.size.wide_iters, res.small["tokens_per_step"]
    for t, tr in [*res.types.items(), *([("continued", None)] if res.continued else [])]:
        by_seed = tr.seeds if tr is not None else {res.seeds[0]: res.continued}
        for i, rec in enumerate(by_seed.values()):
            label = f"{LABELS[t]}" + (f" (lr {tr.lr:g}, warmup {tr.warmup})" if tr else "") if i == 0 else None
            ax_c.plot([s * tps for s in rec["steps"]], rec["loss"], color=colors[t], lw=1, alpha=0.8, label=label,
                      ls="--" if t == "continued" else "-")
            if tr is not None and rec["asymmetry"] is not None:
                ax_a.plot([s * tps for s in rec["steps"]], rec["asymmetry"], color=colors[t], lw=1,
                          label=LABELS[t] if i == 0 else None)
        if tr is not None and tr.sweep:
            lrs = sorted(tr.sweep)
            ax_s.plot(lrs, [tr.sweep[x]["loss"][-1] for x in lrs], "o-", color=colors[t], label=LABELS[t])
    for x in TARGETS:
        ax_c.axhline(statistics.fmean(loss_at(r, round(x * n)) for r in res.types["random"].seeds.values()),
                     color="grey", ls=":", lw=0.8)
    top = res.small["loss"][-1] + 0.6
    ax_c.set(title=f"{res.size.name}: held-out loss, every seed (dotted: random init at 25/50/75/100%)",
             xlabel="wide-model tokens after the widening", ylabel="held-out loss", ylim=(None, top))
    ax_c.legend(fontsize=7)
    ax_s.set(title="peak lr sweep, seed 0: final held-out loss", xscale="log", xlabel="peak learning rate",
             ylabel="final held-out loss")
    ax_s.legend(fontsize=7)
    ax_a.set(title="copy asymmetry (1 - clone similarity)", xlabel="wide-model tokens")
    ax_a.legend(fontsize=7)
    for ax, k in zip(bottom, KINDS):
        for t in res.types:
            s = [stats(table[t][k][x]) for x in TARGETS]
            ys = [v["mean"] if v["mean"] not in (None, math.inf) else math.nan for v in s]
            err = [v["std"] or 0.0 for v in s]
            ax.errorbar([100 * x for x in TARGETS], ys, yerr=err, marker="o", capsize=3, color=colors[t],
                        label=LABELS[t])
        ax.axhline(1, color="k", lw=0.5)
        if k != "with_s_tokens":
            ax.axhline(GOAL_AS_IS if k == "as_is" else GOAL_FLOPS, color="green", ls=":", label="goal")
        ax.set(title=f"speedup, {KIND_TITLES[k]} (∞ and unreached not drawn)",
               xlabel="target: random init's loss at % of its steps", ylabel="speedup (mean ± std over seeds)",
               yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def plot_trend(tr: dict, gpu_params: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for k, color in (("as_is", "C0"), ("with_s_flops", "C1")):
        pts = [(p["wide_params"], p[k]) for p in tr["points"] if p[k]["mean"] not in (None, math.inf)]
        ax.errorbar([x for x, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] or 0 for _, s in pts],
                    marker="o", capsize=3, ls="none", color=color, label=f"{KIND_TITLES[k]}, measured")
        fit = tr["fits"].get(k)
        if fit:
            xs = [min(x for x, _ in pts), gpu_params]
            xs = [xs[0] * (xs[1] / xs[0]) ** (i / 50) for i in range(51)]
            ax.plot(xs, [predict(fit, x) for x in xs], color=color, ls="--", lw=1,
                    label=f"log-log line through {fit['points']} sizes (extrapolation)")
        goal = GOAL_AS_IS if k == "as_is" else GOAL_FLOPS
        ax.axhline(goal, color=color, ls=":", lw=1, label=f"goal, {KIND_TITLES[k]}: {goal:g}x")
    ax.axvline(gpu_params, color="grey", lw=0.8)
    ax.text(gpu_params, 0.02, " --gpu wide model", transform=ax.get_xaxis_transform(), fontsize=8, rotation=90,
            va="bottom", ha="right")
    ax.set(xscale="log", yscale="log", xlabel="wide-model parameters",
           ylabel="speedup at random init's final loss (mean ± std over seeds)",
           title=f"{LABELS[tr['recipe']]}: speedup against size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def size_lines(res: SizeResult, table: dict) -> list[str]:
    size, small = res.size, res.small
    late = [v for s, v in zip(small["steps"], small["loss"]) if s >= 0.8 * small["steps_run"]]
    n, tps = size.wide_iters, small["tokens_per_step"]
    at_widening = stats([r["loss"][0] for t, tr in res.types.items() if t != "random" for r in tr.seeds.values()])
    lines = [f"### {size.name}: S d={size.small['hidden_size']} -> wide d={size.wide['hidden_size']}", "",
             f"S: {small['num_params']:,} parameters, {small['steps_run']} steps ({small['steps_run'] * tps:,} tokens) "
             f"at lr {size.small_lr:g}, held-out {small['loss'][0]:.4f} -> {small['loss'][-1]:.4f}, over its last "
             f"20% of steps {late[0] - late[-1]:.4f} ({(late[0] - late[-1]) / late[0]:.2%}). Wide: "
             f"{res.types['random'].seeds[res.seeds[0]]['num_params']:,} parameters, {n} steps ({n * tps:,} tokens), "
             f"seeds {', '.join(map(str, res.seeds))}. At the widening the clones are at {fmt(at_widening, 4)} on the "
             f"wide runs' held-out batches" + (f"; S continued (on S's) goes from {small['loss'][-1]:.4f} to "
                                                f"{res.continued['loss'][-1]:.4f} in the same number of steps"
                                                if res.continued else "") + ".", "",
             "| run type | peak lr sweep, seed 0 (lr: final loss) | best lr, warmup | final loss |",
             "|---|---|---|---|"]
    for t, tr in res.types.items():
        sweep = ", ".join(f"{x:g}: {tr.sweep[x]['loss'][-1]:.4f}" for x in sorted(tr.sweep)) or "random init's"
        if tr.warmup_sweep:
            sweep += "; warmup " + ", ".join(f"{x:g}: {tr.warmup_sweep[x]['loss'][-1]:.4f}"
                                             for x in sorted(tr.warmup_sweep))
        edge = " (at the sweep's edge)" if tr.at_edge else ""
        lines.append(f"| {LABELS[t]} | {sweep} | {tr.lr:g}{edge}, {tr.warmup} | "
                     f"{fmt(stats([r['loss'][-1] for r in tr.seeds.values()]), 4)} |")
    for k in KINDS:
        lines += ["", f"Speedup, {KIND_TITLES[k]} (mean ± std (lowest-highest) over seeds), at random init's "
                  "loss after:", "", "| run type | " + " | ".join(f"{100 * x:.0f}% ({round(x * n)} steps)"
                                                                   for x in TARGETS) + " |",
                  "|---|" + "---|" * len(TARGETS)]
        lines += [f"| {LABELS[t]} | " + " | ".join(fmt(stats(table[t][k][x])) for x in TARGETS) + " |"
                  for t in table]
    lines += ["", f"![{size.name}](results/{NAME}_{size.name}.png)", ""]
    return lines


def trend_lines(tr: dict, gpu_params: int) -> list[str]:
    lines = [f"### Speedup against size: {LABELS[tr['recipe']]} (`{tr['recipe']}`), at random init's final loss", "",
             "| size | wide parameters | wide tokens | with S's FLOPs | with S's tokens |", "|---|---|---|---|---|"]
    lines += [f"| {p['size']} | {p['wide_params']:,} | {fmt(p['as_is'])} | {fmt(p['with_s_flops'])} | "
              f"{fmt(p['with_s_tokens'])} |" for p in tr["points"]]
    lines.append("")
    for k, fit in tr["fits"].items():
        largest = tr["points"][-1][k]["mean"]
        if largest is not None and largest >= fit["goal"]:
            where = f"is at or above {fit['goal']:g}x at the largest size already"
        elif fit["params_at_goal"]:
            where = f"reaches {fit['goal']:g}x at about {fit['params_at_goal']:.3g} wide parameters"
        else:
            where = f"does not rise with size, so it never reaches {fit['goal']:g}x"
        lines.append(f"- {KIND_TITLES[k]}: a line in log-log through {fit['points']} sizes has slope "
                     f"{fit['slope']:+.3f} (speedup x{2 ** fit['slope']:.3f} per doubling of the parameters); it "
                     f"{where}, and predicts {predict(fit, gpu_params):.2f}x for `--gpu` ({gpu_params / 1e6:.0f}M "
                     "wide parameters). **An extrapolation from these points, not a measurement.**")
    return [*lines, "", f"![trend](results/{NAME}_trend.png)", ""]


def verdict_lines(tr: dict) -> list[str]:
    last = tr["points"][-1]
    a, f = last["as_is"], last["with_s_flops"]
    low_a = 0.0 if a["n"] < a["of"] else a["min"]
    low_f = 0.0 if f["n"] < f["of"] else f["min"]
    return [f"Goal at the largest size ({last['size']}): every seed at least {GOAL_AS_IS:g}x fewer wide-model tokens "
            f"to random init's final loss (lowest seed {low_a:.2f}x: "
            f"{'met' if low_a >= GOAL_AS_IS else f'NOT met, short by {GOAL_AS_IS / max(low_a, 1e-9):.2f}x'}), and "
            f"at least {GOAL_FLOPS:g}x with S's FLOPs (mean {f['mean'] or 0:.2f}x, lowest seed {low_f:.2f}x: "
            f"{'met' if low_f >= GOAL_FLOPS else 'NOT met'}).", ""]


def write_report(docs: Path, results: list[SizeResult], complete: bool, quick: bool, gpu: bool,
                 command: str, cache: RunCache, elapsed: float) -> None:
    """The section of docs/results.md, the plots and docs/results/speedup_study[_gpu].json."""
    name = NAME + ("_gpu" if gpu else "")
    (docs / "results").mkdir(parents=True, exist_ok=True)
    tables = {res.size.name: speedups(res) for res in results}
    records = [r for res in results for tr in res.types.values() for r in [*tr.sweep.values(),
               *tr.warmup_sweep.values(), *tr.seeds.values()]] + [x for res in results for x in (res.small,
                                                                                                  res.continued) if x]
    unique = {r["name"]: r for r in records}.values()
    lines = [f"## Does cloning beat a tuned random init, and how does that change with scale? "
             f"(bench/hyperclone_speedup.py{' --gpu' if gpu else ''})", ""]
    if quick:
        lines += ["**QUICK RUN: tiny models, a few dozen steps. The numbers mean nothing about HyperCloning.**", ""]
    if not complete:
        done = ", ".join(r.size.name for r in results) or "none"
        lines += [f"**In progress: sizes complete: {done}; the rest resumes with the same command (without "
                  "--sizes).**", ""]
    cpu_h = sum(r["cpu_seconds"] for r in unique) / 3600
    ran = (f"; this invocation ran {cache.started} of them ({cache.cpu_seconds / 3600:.2f} CPU hours), {cache.jobs} "
           f"at a time, in {elapsed / 3600:.2f} h" if cache.started else "")
    lines += [f"Command: `{command}`", "",
              f"Machine: {machine_line(list(unique))}.", "",
              f"Runs reported here: {len(unique)}, {cpu_h:.2f} CPU hours{ran}. Records: "
              f"[results/runs/](results/runs/).", ""]
    for res in results:
        lines += size_lines(res, tables[res.size.name])
        plot_size(res, tables[res.size.name], docs / "results" / f"{name}_{res.size.name}.png")
    summary: dict = {"complete": complete, "quick": quick, "sizes": {}}
    for res in results:
        summary["sizes"][res.size.name] = {
            "types": {t: {"lr": tr.lr, "warmup": tr.warmup, "at_edge": tr.at_edge,
                          "sweep": {f"{x:g}": r["loss"][-1] for x, r in sorted(tr.sweep.items())},
                          "warmup_sweep": {f"{x:g}": r["loss"][-1] for x, r in sorted(tr.warmup_sweep.items())},
                          "runs": {s: r["name"] for s, r in tr.seeds.items()}} for t, tr in res.types.items()},
            "small": res.small["name"], "continued": res.continued and res.continued["name"],
            "speedups": {t: {k: {f"{x:g}": v for x, v in by_x.items()} for k, by_x in kinds.items()}
                         for t, kinds in tables[res.size.name].items()}}
    if complete and len(results) > 1:
        recipe = next(t for t in results[-1].types if t != "random")
        tr = trend(results, recipe)
        gpu_params = wide_params(_gpu_size())
        lines += trend_lines(tr, gpu_params) + verdict_lines(tr)
        plot_trend(tr, gpu_params, docs / "results" / f"{NAME}_trend.png")
        summary["trend"] = tr
    atomic_write_text(docs / "results" / f"{name}.json", json.dumps(summary, indent=1, default=_json))
    write_section(docs / "results.md", name, lines)
    print("\n".join(lines))
    print(f"[{time.strftime('%H:%M:%S')}] wrote {docs / 'results.md'}", flush=True)


def _gpu_size() -> Size:
    from hyperclone_speedup import gpu_size

    return gpu_size()


def _json(x: object) -> object:
    return None if isinstance(x, float) and math.isinf(x) else str(x)
