"""What DeepSpeed's CPU communication op costs a launch: `deepspeed.init_distributed` on 2 gloo ranks, three ways.

    build    DeepSpeed's default on a machine where the op is not compiled yet (an empty TORCH_EXTENSIONS_DIR):
             init_distributed compiles deepspeed_shm_comm, then maps a 67 MB /dev/shm buffer per rank
    cached   DeepSpeed's default with the op already compiled (the same TORCH_EXTENSIONS_DIR every time): it is
             loaded, its build checked by ninja, and the buffers mapped
    skip     what megaclone does (megaclone.cluster.skip_deepspeed_shm_op): the op is never built nor loaded

Each trial starts 2 fresh processes (RANK 0 and 1 of one group) and times, in each, init_distributed plus a
barrier (after `import deepspeed`, which every variant pays alike). The variants run alternately, `--repeat`
times; the table gives the median over trials of the slower rank.

    python bench/deepspeed_init.py --repeat 3

Numbers are recorded in docs/performance.md ("Launch: DeepSpeed's CPU communication op").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("build", "cached", "skip")
WORLD = 2


def _worker(variant: str) -> None:
    sys.path.insert(0, str(ROOT))
    import deepspeed
    import torch.distributed as dist

    from megaclone.cluster import skip_deepspeed_shm_op

    start = time.perf_counter()
    if variant == "skip":
        skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dist.barrier()
    seconds = time.perf_counter() - start
    # DeepSpeed never unlinks the op's buffers; a benchmark of many launches must not fill /dev/shm.
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}_"
    Path("/dev/shm", name + os.environ["RANK"]).unlink(missing_ok=True)
    dist.destroy_process_group()
    print(json.dumps({"seconds": seconds}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trial(variant: str, extensions_dir: str) -> float:
    """Seconds to a ready process group (the slower of the two ranks)."""
    port = str(_free_port())
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "TORCH_EXTENSIONS_DIR": extensions_dir, "DS_ACCELERATOR": "cpu"}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", variant], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    times = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant}: rank failed ({proc.returncode}):\n{err[-3000:]}")
        times.append(json.loads(out.strip().splitlines()[-1])["seconds"])
    return max(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    results: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        cached = str(Path(tmp, "cached"))
        trial("build", cached)  # compile once into the cache the `cached` variant reuses
        for i in range(args.repeat):
            for variant in VARIANTS:
                where = str(Path(tmp, f"fresh{i}")) if variant == "build" else cached
                results[variant].append(trial(variant, where))
                print(f"  {variant:6s} trial {i + 1}: {results[variant][-1]:.2f} s", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    skip = statistics.median(results["skip"])
    print("| variant | init_distributed + barrier, median s | trials | vs skip |")
    print("|---|---|---|---|")
    for variant in VARIANTS:
        median = statistics.median(results[variant])
        trials = ", ".join(f"{t:.2f}" for t in results[variant])
        print(f"| {variant} | {median:.2f} | {trials} | {median - skip:+.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
