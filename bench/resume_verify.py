"""What verifying a checkpoint costs on `--load`, against loading it: the same files, the same run, alternated.

Each of `--procs` gloo ranks (spawned here, as a DeepSpeed launch would start them) builds a GPT engine of the
given shape at DP = procs (ZeRO-1, fp32), takes one step so that Adam has state, and saves a training checkpoint
(`save_training_checkpoint`: DeepSpeed's files, fp32 weights, Adam-state files, a sha256 of each). Then, for
`--rounds` rounds, in an order that alternates:
  verify    `verify_resume_checkpoint`, what `--load` runs first: every file of the step hashed (each rank a
            size-balanced share) and DeepSpeed's files checked for loading without unpickling
  verify-1  the same with every rank hashing all files itself (no split: what the split saves)
  load      `resume_training_checkpoint`: DeepSpeed's `load_checkpoint` through the weights-only engine, plus
            megaclone's data position and RNG (the exact-resume path of a launch)
Times are wall clock on rank 0 between barriers (the slowest rank's), files in the page cache (each round
reads what the previous wrote or read); medians are printed with the ratio verify / load.

    python bench/resume_verify.py                                  # 2 ranks, hidden 384 x 6 layers
    python bench/resume_verify.py --hidden-size 512 --num-layers 8 --rounds 7

Numbers are recorded in docs/performance.md ("Verifying a checkpoint on resume").
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megaclone import cluster  # noqa: E402
from megaclone.checkpoint import read_manifest, resolve_checkpoint  # noqa: E402
from megaclone.config import load_run_config  # noqa: E402
from megaclone.data import DistributedBatchSampler  # noqa: E402
from megaclone.parallel import TPRNGTracker, build_layout  # noqa: E402
from megaclone.train.checkpointing import (  # noqa: E402
    resume_training_checkpoint,
    save_training_checkpoint,
    verify_resume_checkpoint,
)
from megaclone.train.engine import build_engine, build_model  # noqa: E402
from megaclone.train.integrity import verify_resume  # noqa: E402
from megaclone.train.loop import train_step  # noqa: E402

TINY = ROOT / "configs" / "tiny.yaml"


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _rank(rank: int, args: argparse.Namespace, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.procs), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(args.procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cluster.init_process_group(cluster.detect_cluster_env())
    cfg = load_run_config(TINY, [f"model.hidden_size={args.hidden_size}", f"model.num_layers={args.num_layers}",
                                 f"model.num_heads={args.hidden_size // 64}", f"model.vocab_size={args.vocab_size}",
                                 "model.vocab_multiple=128", "parallel.zero_stage=1", "train.micro_batch_size=1"])
    layout = build_layout(cfg.parallel)
    tracker = TPRNGTracker(cfg.train.seed, layout.tp_rank)
    module = build_model(cfg, layout, tracker)
    engine = build_engine(cfg, layout, module, torch.device("cpu"))
    sampler = DistributedBatchSampler(1000, 1, layout.dp_rank, layout.dp_size, 0)
    tokens = torch.randint(0, args.vocab_size, (1, cfg.data.seq_len))
    train_step(engine, iter([(tokens, tokens)]), layout)
    root = Path(tmp) / "ckpt"
    saved = _timed(lambda: save_training_checkpoint(root, 1, cfg, layout, engine, module, sampler, tracker, None, {}))
    step_dir = resolve_checkpoint(root)
    manifest = read_manifest(step_dir)
    size = sum(entry["bytes"] for entry in manifest.digests().values())
    runs = {
        "verify": lambda: verify_resume_checkpoint(step_dir, manifest, cfg, layout, None),
        "verify-1": lambda: verify_resume(step_dir, manifest, [rank], rank),
        "load": lambda: resume_training_checkpoint(step_dir, engine, sampler, tracker),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(_timed(runs[name]))
    if rank == 0:
        params = sum(p.numel() for p in module.parameters())
        print(f"{args.procs} ranks, {params / 1e6:.1f}M parameters per rank (DP {layout.dp_size}, ZeRO-1, fp32); "
              f"checkpoint {len(manifest.digests())} files, {size / 2**20:.0f} MiB; save {saved:.2f} s")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:9s} median {median:6.3f} s  ({size / 2**20 / median:6.0f} MiB/s)  rounds: "
                  f"{' '.join(f'{v:.3f}' for v in values)}")
        verify, load = statistics.median(times["verify"]), statistics.median(times["load"])
        print(f"  verify / load = {verify / load:.2f}; verify-1 / verify = "
              f"{statistics.median(times['verify-1']) / verify:.2f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="ranks (DP size)")
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="resume_verify-") as tmp:
        mp.start_processes(_rank, args=(args, port, tmp), nprocs=args.procs, start_method="spawn", join=True)


if __name__ == "__main__":
    main()
