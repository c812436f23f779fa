"""Checkpoint conversion: tools/reshard_expand.py against a plain file copy and a Megatron-style converter.

For synthetic GPT checkpoints (random fp32 weights, TP2 x PP2) of three sizes spanning about 4x, measures
in one run, each in a fresh process (so its peak RSS is its own):
  convert   megaclone.convert (streaming, shard-local): checks, source checksums, widening/resharding,
            output checksums, commit
  copy      a plain file copy of the same bytes: every source weight byte read once and every output byte
            written once, 8 MiB buffers, one process (the I/O floor)
  gather    the Megatron-style baseline written here: load every tensor whole into one process
            (checksums checked), widen each whole tensor, then split into the target shards and save
  floor     a process that only imports megaclone.convert (the RSS every Python+torch process pays)
The conversion is run alternately with the copy, `--repeat` times; the ratio uses the medians.

Every measured process starts its clock `--settle` seconds after it was launched (after its imports), so all
of them write into memory in the same state: this VM hands freed memory back to the host after a few
seconds (virtio-balloon free page reporting), and a page-cache write into handed-back memory costs about 8x
the kernel CPU (measured: 1.2-1.6 s instead of 0.15 s of system time per 800 MiB). Without the wait, the
copy (which starts 0.1 s after the previous output is deleted) writes into warm memory and the conversion
(which first imports torch, 2-5 s) into cold memory.

    python bench/reshard_expand.py                      # all three sizes, widening x2 to TP4 x PP2
    python bench/reshard_expand.py --sizes 0 --repeat 1 # the smallest only (quick)
    python bench/reshard_expand.py --rng-speed          # the noise generator's elements/s, one thread

Numbers are recorded in docs/performance.md ("Checkpoint conversion").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (hidden, layers): gelu, head size 64, vocab 16384, tied; about 0.24, 0.53 and 0.97 GB of fp32 weights
SIZES = [(512, 16), (768, 17), (1024, 18)]
VOCAB = 16384
BUF = 8 << 20


def model_config(hidden: int, layers: int):
    from megaclone.config import ModelConfig

    return ModelConfig(vocab_size=VOCAB, vocab_multiple=128, hidden_size=hidden, num_layers=layers,
                       num_heads=hidden // 64, max_seq_len=256)


def make_source(path: Path, hidden: int, layers: int, tp: int, pp: int) -> Path:
    """A weight checkpoint with random N(0, 0.02) values (each stored slice from its own seeded generator)."""
    import torch

    from megaclone.checkpoint import write_weights_checkpoint

    def slice_values(name: str, index: tuple[slice, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}{index}".encode()))
        shape = [sl.indices(n)[1] - sl.indices(n)[0] for sl, n in zip(index, specs[name].shape)]
        return 0.02 * torch.randn(shape, generator=g)

    from megaclone.spec import spec_table

    cfg = model_config(hidden, layers)
    specs = spec_table(cfg)
    return write_weights_checkpoint(path, cfg, slice_values, tp, pp)


def weight_bytes(step_dir: Path) -> int:
    return sum(p.stat().st_size for p in (step_dir / "weights").glob("*.safetensors"))


def vm_hwm_mib(pid: int | str = "self") -> float:
    """Peak resident set of a process (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def wait_until(start_at: float | None) -> None:
    """Sleep until the wall-clock time `start_at` (see --settle); None: return at once."""
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) and of its waited-for children (workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class ChildPeaks:
    """Samples the peak RSS of this process's descendants (the spawned workers) every 50 ms."""

    def __init__(self) -> None:
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _descendants(self, pid: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
        return out + [d for c in out for d in self._descendants(c)]

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self._descendants(os.getpid()):
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), vm_hwm_mib(pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peaks.values(), default=0.0)


# --- the measured operations (each runs in its own process) ------------------------------------------------

def child_convert(a: argparse.Namespace) -> dict:
    from megaclone.convert import ConvertOptions, convert_checkpoint, tune_process

    tune_process()  # as tools/reshard_expand.py does
    peaks = ChildPeaks()
    wait_until(a.start_at)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    report = convert_checkpoint(ConvertOptions(input=Path(a.input), output=Path(a.output), tp_size=a.tp,
                                               pp_size=a.pp, hyperclone=a.hyperclone, clone_noise_db=a.noise_db,
                                               workers=a.workers, progress=False, overwrite=True,
                                               direct_io=not a.buffered))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu0, "out_bytes": weight_bytes(report.output),
            "rss_mib": vm_hwm_mib(),
            "worker_rss_mib": peaks.stop(), "read_bytes": sum(f.bytes_read for f in report.files)}


def child_copy(a: argparse.Namespace) -> dict:
    """Read every source weight byte once, write files of the given sizes, fsync them: the I/O floor.

    The fsync matches the conversion, which syncs its files before it commits (`--no-fsync`: page cache only).
    `--direct 1` writes around the page cache with the converter's own `DirectFile`, as the conversion does.
    """
    from megaclone.convert.writer import DirectFile

    sources = sorted((Path(a.input) / "weights").glob("*.safetensors"))
    sizes = json.loads(a.out_sizes)
    out = Path(a.output)
    wait_until(a.start_at)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    out.mkdir(parents=True)
    buf = bytearray(BUF)
    view = memoryview(buf)
    inputs = iter(sources)
    current = open(next(inputs), "rb")
    read_total = 0
    for i, size in enumerate(sizes):
        f = DirectFile(out / f"file{i:03d}") if a.direct else open(out / f"file{i:03d}", "wb")
        try:
            left = size
            while left:
                n = min(left, BUF)
                got = current.readinto(view[:n]) if current else 0
                while current and got < n:  # this input is done: continue with the next one
                    current.close()
                    nxt = next(inputs, None)
                    current = open(nxt, "rb") if nxt else None
                    got += current.readinto(view[got:n]) if current else 0
                read_total += got
                f.write(view[:n])
                left -= n
        finally:
            f.close()
    while current:  # an output smaller than the input: read the rest anyway
        while (got := current.readinto(view)):
            read_total += got
        current.close()
        nxt = next(inputs, None)
        current = open(nxt, "rb") if nxt else None
    if a.fsync:
        for i in range(len(sizes)):
            fd = os.open(out / f"file{i:03d}", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return {"seconds": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu0, "read_bytes": read_total,
            "out_bytes": sum(sizes), "rss_mib": vm_hwm_mib()}


def child_gather(a: argparse.Namespace) -> dict:
    """Megatron-style: every tensor whole in one process, widen whole tensors, then split and save each shard."""
    import torch

    from megaclone.checkpoint import load_full_state, read_manifest, write_weights_checkpoint
    from megaclone.clone import clone_tensor, widen_model_config
    from megaclone.config import CloneConfig
    from megaclone.spec import build_param_specs

    wait_until(a.start_at)
    start, cpu0 = time.perf_counter(), cpu_seconds()
    small_cfg = read_manifest(a.input).model
    full = load_full_state(a.input, verify=True)  # gather: every tensor of every shard, whole
    if a.hyperclone:
        clone = CloneConfig(init_from=a.input, factor=a.hyperclone, noise_db=a.noise_db)
        wide_cfg = widen_model_config(small_cfg, a.hyperclone)
        with torch.no_grad():
            full = {s.name: clone_tensor(s, small_cfg, clone, lambda name, idx: full[name][idx])
                    for s in build_param_specs(wide_cfg)}
    else:
        wide_cfg = small_cfg
    step = write_weights_checkpoint(a.output, wide_cfg, full, a.tp, a.pp)  # split + save every shard
    return {"seconds": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu0, "out_bytes": weight_bytes(step),
            "rss_mib": vm_hwm_mib()}


def child_floor(a: argparse.Namespace) -> dict:
    import megaclone.convert  # noqa: F401

    return {"seconds": 0.0, "cpu_s": cpu_seconds(), "rss_mib": vm_hwm_mib()}


def rng_speed() -> None:
    """Elements/s of the noise generator on one thread (CPU time, best of 3), against its first implementation."""
    import torch

    from megaclone.rng import counter_normal
    from tests.test_rng import reference_counter_normal

    torch.set_num_threads(1)
    shape, index = (4096, 4096), (slice(0, 1024),)  # 4.2 M elements: one noise chunk of clone_tensor
    for label, generate in (("first implementation (tests/test_rng.py)", reference_counter_normal),
                            ("megaclone.rng.counter_normal", counter_normal)):
        seconds = []
        for _ in range(3):
            start = time.thread_time()
            generate(5, "w", shape, index)
            seconds.append(time.thread_time() - start)
        print(f"{label}: {1024 * 4096 / min(seconds) / 1e6:.1f} M elements/s per core")


CHILDREN = {"convert": child_convert, "copy": child_copy, "gather": child_gather, "floor": child_floor}


def run_child(kind: str, settle: float = 0.0, **kw) -> dict:
    """Run one measurement in a fresh process; its clock starts `settle` seconds after this call at the earliest."""
    args = [sys.executable, __file__, "--child", kind, "--start-at", repr(time.time() + settle)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# The copy baselines (kind, fsync, O_DIRECT): through the page cache with and without the fsync, and around it as
# the converter writes. What the page-cache copy costs depends on what the VM charges for writing into fresh memory,
# which varied 20x between measurements here (docs/performance.md, table 5); the O_DIRECT copy is the honest floor.
COPIES = (("copy", 1, 0), ("copy_nosync", 0, 0), ("copy_direct", 1, 1))


def measure_size(work: Path, hidden: int, layers: int, a: argparse.Namespace, results: list[dict]) -> None:
    src_root = work / f"src-{hidden}"
    t0 = time.perf_counter()
    src = make_source(src_root, hidden, layers, 2, 2)
    in_bytes = weight_bytes(src)
    print(f"\n== hidden {hidden}, {layers} layers: source {in_bytes / 1e9:.2f} GB at TP2 x PP2 "
          f"(made in {time.perf_counter() - t0:.1f} s)", flush=True)
    widen = dict(tp=4, pp=2, hyperclone=2, **({"noise_db": a.noise_db} if a.noise_db is not None else {}))
    jobs = [("widen x2 -> TP4 x PP2" + (f" noise {a.noise_db} dB" if a.noise_db is not None else ""), widen)]
    if a.reshard or hidden == SIZES[-1][0]:
        jobs.append(("reshard -> TP4 x PP1", dict(tp=4, pp=1, hyperclone=0)))
    for label, job in jobs:
        row: dict = {"hidden": hidden, "layers": layers, "in_bytes": in_bytes, "job": label}
        runs: dict[str, list[dict]] = {"convert": [], **{kind: [] for kind, *_ in COPIES}}
        if a.compare_buffered:
            runs["convert_buffered"] = []
        for rep in range(a.repeat):  # alternate, so that load on the machine hits all alike
            r = run_child("convert", a.settle, input=src, output=work / "out", workers=1, **job)
            runs["convert"].append(r)
            sizes = [p.stat().st_size for p in sorted((work / "out").rglob("weights/*.safetensors"))]
            drop(work / "out")
            if a.compare_buffered:  # the same conversion through the page cache (--no-direct-io)
                runs["convert_buffered"].append(run_child("convert", a.settle, input=src, output=work / "out",
                                                          workers=1, buffered=1, **job))
                drop(work / "out")
            for kind, fsync, direct in COPIES:
                runs[kind].append(run_child("copy", a.settle, input=src, output=work / "copy",
                                            out_sizes=json.dumps(sizes), fsync=fsync, direct=direct))
                drop(work / "copy")
            print(f"  {label} rep {rep}: " + ", ".join(f"{k} {v[-1]['seconds']:.2f} s" for k, v in runs.items()),
                  flush=True)
        for kind, rs in runs.items():
            row[f"{kind}_s"] = statistics.median(r["seconds"] for r in rs)
            row[f"{kind}_rss_mib"] = max(r["rss_mib"] for r in rs)
            row[f"{kind}_cpu_s"] = statistics.median(r["cpu_s"] for r in rs)
        row["ratio"] = row["convert_s"] / row["copy_s"]
        if a.compare_buffered:
            row["ratio_buffered"] = row["convert_buffered_s"] / row["copy_s"]
        row["ratio_nosync"] = row["convert_s"] / row["copy_nosync_s"]
        row["ratio_direct"] = row["convert_s"] / row["copy_direct_s"]
        row["out_bytes"] = runs["convert"][0]["out_bytes"]
        row["read_bytes"] = runs["convert"][0]["read_bytes"]
        if a.workers > 1:
            w = run_child("convert", a.settle, input=src, output=work / "out", workers=a.workers, **job)
            drop(work / "out")
            row["workers"] = a.workers
            row["convert_workers_s"], row["convert_workers_cpu_s"] = w["seconds"], w["cpu_s"]
            row["convert_workers_rss_mib"] = {"main": w["rss_mib"], "max_worker": w["worker_rss_mib"]}
        if not a.skip_gather:
            g = run_child("gather", a.settle, input=src, output=work / "gather", **job)
            drop(work / "gather")
            row["gather_s"], row["gather_rss_mib"], row["gather_cpu_s"] = g["seconds"], g["rss_mib"], g["cpu_s"]
        row["loadavg_after"] = os.getloadavg()
        results.append(row)
        print("  " + json.dumps(row), flush=True)
    drop(src_root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=list(range(len(SIZES))), help="indices into SIZES")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="also time --workers K (0 or 1: skip)")
    p.add_argument("--reshard", action="store_true", help="time plain resharding at every size, not only the largest")
    p.add_argument("--skip-gather", action="store_true")
    p.add_argument("--compare-buffered", action="store_true",
                   help="also time each conversion writing through the page cache (--no-direct-io), alternated")
    p.add_argument("--rng-speed", action="store_true", help="only time the noise generator (one thread) and exit")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--settle", type=float, default=8.0,
                   help="seconds from launching a measured process to starting its clock (0: at once; see above)")
    # child-process arguments
    p.add_argument("--child", choices=sorted(CHILDREN))
    p.add_argument("--input")
    p.add_argument("--output")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--hyperclone", type=int, default=0)
    p.add_argument("--noise-db", type=float, default=None, help="widen with zero-sum noise at this SNR")
    p.add_argument("--buffered", type=int, default=0, help="child: convert with direct_io=False")
    p.add_argument("--out-sizes")
    p.add_argument("--fsync", type=int, default=1)
    p.add_argument("--direct", type=int, default=0, help="child copy: write with O_DIRECT (DirectFile)")
    p.add_argument("--start-at", type=float, default=None)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child](a)))
        return 0
    if a.rng_speed:
        rng_speed()
        return 0

    floor = run_child("floor")
    print(f"floor: a process that imports megaclone.convert peaks at {floor['rss_mib']:.0f} MiB RSS; "
          f"load average at the start: {os.getloadavg()}; settle {a.settle} s")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        for i in a.sizes:
            measure_size(Path(tmp), *SIZES[i], a, results)
    print(f"\nload average at the end: {os.getloadavg()}")
    print("\n| job | source GB | output GB | convert s (CPU s) | copy+fsync s (CPU s) | ratio | copy, page cache s | "
          "ratio | copy O_DIRECT+fsync s | ratio | "
          f"convert x{a.workers} workers s | convert peak RSS MiB | gather s (CPU s) | gather peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in results:
        print(f"| {r['job']} (d={r['hidden']}) | {r['in_bytes'] / 1e9:.2f} | {r['out_bytes'] / 1e9:.2f} | "
              f"{r['convert_s']:.2f} ({r['convert_cpu_s']:.1f}) | {r['copy_s']:.2f} ({r['copy_cpu_s']:.1f}) | "
              f"{r['ratio']:.2f} | {r['copy_nosync_s']:.2f} | {r['ratio_nosync']:.2f} | "
              f"{r['copy_direct_s']:.2f} | {r['ratio_direct']:.2f} | "
              f"{r.get('convert_workers_s', nan):.2f} | {r['convert_rss_mib']:.0f} | "
              f"{r.get('gather_s', nan):.2f} ({r.get('gather_cpu_s', nan):.1f}) | {r.get('gather_rss_mib', nan):.0f} |")
    for r in results if a.compare_buffered else []:
        print(f"{r['job']} (d={r['hidden']}) through the page cache (--no-direct-io): {r['convert_buffered_s']:.2f} s "
              f"({r['convert_buffered_cpu_s']:.1f} CPU s), ratio {r['ratio_buffered']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"floor_rss_mib": floor["rss_mib"], "settle_s": a.settle,
                                            "noise_db": a.noise_db, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
