"""Reshard a megaclone checkpoint to another TP x PP layout, optionally growing it (width, depth), in one pass.

    python tools/reshard_expand.py --input runs/small/ckpt --output runs/wide/ckpt --tp 4 --pp 2 \\
        --hyperclone 2 --workers 2 --verify
    python tools/reshard_expand.py --input runs/small/ckpt --output runs/deep/ckpt --pp 2 --grow-layers 8 --verify

Streams: each target file (one TP rank x PP stage) is built row chunk by row chunk from the source byte
ranges it needs, so memory stays bounded whatever the model size (see megaclone/convert/run.py). Checks
everything (layout, source files, checksums, disk space, existing output) before writing; writes into
a temporary directory that is renamed into place when complete; an interrupted run, rerun with the same
arguments, keeps the files it finished. `--optimizer carry` converts the Adam state files (optim/) with
the weights and keeps the step, schedule and data position, so training resumes at the new layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclone.config import GROW_METHODS, HYPERCLONE_DEFAULTS, NO_NOISE, parse_factor, parse_noise_db  # noqa: E402
from megaclone.convert import ConvertOptions, VerificationError, convert_checkpoint, tune_process  # noqa: E402


def parse_args(argv: list[str] | None = None) -> ConvertOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="source checkpoint: a ROOT (follows `latest`) or step dir")
    p.add_argument("--output", required=True, type=Path,
                   help="target ROOT (the step directory keeps the source's step) or a path named step_XXXXXXXX")
    p.add_argument("--tp", type=int, default=None, help="target tensor-parallel size (default: the source's)")
    p.add_argument("--pp", type=int, default=None, help="target pipeline-parallel size (default: the source's)")
    g = p.add_argument_group("HyperCloning (widening)")
    g.add_argument("--hyperclone", type=parse_factor(1), default=0, metavar="N",
                   help="widen hidden size, heads and groups N times (1: keep the width; without it: reshard only)")
    g.add_argument("--hyperclone-ffn", type=parse_factor(1), default=None, metavar="M",
                   help="widen the FFN M times (default N)")
    g.add_argument("--hyperclone-groups", type=parse_factor(1), default=None, metavar="G",
                   help="widen the query groups (KV heads) G times, G dividing N (default N)")
    g.add_argument("--grow-layers", type=parse_factor(1), default=0, metavar="L", help="grow the depth to L layers")
    g.add_argument("--grow-method", default="zero", choices=GROW_METHODS,
                   help="zero (default, lossless): new identity blocks; stack: [1..L, 1..L]; interleave: [1, 1, 2, 2]")
    g.add_argument("--clone-variant", default=None, choices=("symmetric", "diagonal"),
                   help=f"weight layout of the copies (default {HYPERCLONE_DEFAULTS['variant']}, as at launch)")
    g.add_argument("--clone-noise-db", type=parse_noise_db, default=None, metavar="DB|none",
                   help=f"zero-sum symmetry-breaking noise at this signal-to-noise ratio, or none (default "
                        f"{HYPERCLONE_DEFAULTS['noise_db']:g} dB, as at launch)")
    g.add_argument("--clone-seed", type=int, default=0, metavar="S")
    p.add_argument("--optimizer", default="drop", choices=("carry", "drop"),
                   help="drop (default): weights only; carry: also the Adam moments (optim/ files), step and schedule")
    p.add_argument("--workers", type=int, default=1, metavar="K", help="processes, each owning whole target files")
    p.add_argument("--verify", action="store_true",
                   help="reload the output and compare its logits with the source's before committing it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output step / add to an existing ROOT")
    p.add_argument("--no-direct-io", action="store_true",
                   help="write through the page cache even where the filesystem allows O_DIRECT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.hyperclone or a.grow_layers:  # the launcher's defaults, so that both grow a checkpoint bit for bit alike
        a.clone_variant = a.clone_variant or HYPERCLONE_DEFAULTS["variant"]
        a.clone_noise_db = {None: HYPERCLONE_DEFAULTS["noise_db"], NO_NOISE: None}.get(a.clone_noise_db,
                                                                                        a.clone_noise_db)
    a.clone_variant = a.clone_variant or "symmetric"  # without --hyperclone, any clone flag given is refused
    return ConvertOptions(input=a.input, output=a.output, tp_size=a.tp, pp_size=a.pp, hyperclone=a.hyperclone,
                          hyperclone_ffn=a.hyperclone_ffn, hyperclone_groups=a.hyperclone_groups,
                          grow_layers=a.grow_layers, grow_method=a.grow_method, clone_variant=a.clone_variant,
                          clone_noise_db=a.clone_noise_db, clone_seed=a.clone_seed, optimizer=a.optimizer,
                          workers=a.workers, verify=a.verify, overwrite=a.overwrite, direct_io=not a.no_direct_io,
                          progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        report = convert_checkpoint(options)
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept = f", {len(report.resumed)} kept from an interrupted run" if report.resumed else ""
    print(f"wrote {report.output}: {len(report.files)} files, {report.bytes_written / 2**20:.1f} MiB in "
          f"{report.seconds:.1f} s{kept}")
    if report.verify is not None:
        v = report.verify
        if v["preserving"]:
            print(f"verify: max |logit diff| {v['max_abs_diff']:.3e} (max |logit| {v['max_abs_logit']:.3e}, "
                  f"{'bit-exact' if v['exact'] else 'within tolerance'})")
        else:
            print(f"verify: --grow-method {options.grow_method} does not preserve the function; loss on a fixed random "
                  f"batch: {v['small_loss']:.6f} -> {v['loss']:.6f} ({v['loss'] - v['small_loss']:+.6f})")
    return 0


if __name__ == "__main__":
    tune_process()  # process-wide, so here and not in main(), which tests call in-process
    sys.exit(main())
