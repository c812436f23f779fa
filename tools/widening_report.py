"""What a widening did: the held-out loss of the small run and of the widened run, how exactly the widening kept the
small model's function, what the clone-similarity figures mean, and where every output went; optionally a PNG of
the held-out loss from the small run through the widening to the end. Reads the two runs' metrics.jsonl.

    python tools/widening_report.py --small runs/demo/small --wide runs/demo/wide --png runs/demo/heldout_loss.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclone.train.report import plot_heldout_loss, widening_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", required=True, type=Path, help="the small run's directory (its --run-dir)")
    p.add_argument("--wide", required=True, type=Path, help="the widened run's directory (its --run-dir)")
    p.add_argument("--png", type=Path, help="write the held-out loss plot here")
    args = p.parse_args(argv)
    extra = [(str(args.png), "the held-out loss from the small run through the widening to the end")] if args.png \
        else []
    try:
        lines = widening_summary(args.small, args.wide, extra)
        if args.png:
            plot_heldout_loss(args.small, args.wide, args.png)
    except (ValueError, FileNotFoundError) as e:
        print(f"widening_report.py: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
