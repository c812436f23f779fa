"""One line per finished wide run of a bench/hyperclone_speedup.py root, labelled by what its clone record says.

For a study stopped part-way (the full report needs every seed of every run type): final loss, tokens to reach
the same seed's random init final loss (at --random-lr), the wide-token speedup and the speedup with S's
training FLOPs counted.

    python bench/summarize_speedup_runs.py runs/hyperclone_speedup_2000 --random-lr 0.004
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyperclone_speedup import TOKENS_PER_STEP, curve, tokens_to_reach  # noqa: E402

from megaclone.train import read_metrics  # noqa: E402


def label(run_dir: Path) -> str:
    clone = read_metrics(run_dir, "clone")
    if not clone:
        return "random"
    noise = clone[0]["noise_db"]
    return clone[0]["variant"] + ("" if noise is None else f"+{noise:g}dB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--random-lr", default="0.004", help="the random-init runs to compare with (their lr, as named)")
    args = p.parse_args()
    small = curve(args.root / "small")
    s_flops = small["tokens"][-1] * small["flops_per_token"]
    runs = {d.name: (label(d), curve(d)) for d in sorted((args.root / "wide").iterdir())
            if any(r.get("event") == "end" for r in read_metrics(d))}
    for name, (kind, c) in runs.items():
        seed = name.split("_seed")[1]
        rand = runs.get(f"random_lr{args.random_lr}_seed{seed}")
        if rand is None:
            continue
        r = rand[1]
        need = tokens_to_reach(c, r["loss"][-1])
        speedup = r["tokens"][-1] / need if need else None
        with_s = (r["tokens"][-1] * r["flops_per_token"]) / (need * c["flops_per_token"] + s_flops) \
            if need and kind != "random" else None
        print(f"{name:32s} {kind:16s} final {c['loss'][-1]:.4f} tokens to random's final {need} "
              f"speedup {speedup and round(speedup, 3)} with S FLOPs {with_s and round(with_s, 3)} "
              f"(tokens per step {TOKENS_PER_STEP})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
