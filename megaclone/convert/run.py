"""Executing a conversion plan: target file by target file, row chunk by row chunk, resumable.

Memory bound (per process): one row chunk of one target tensor (`ConvertOptions.chunk_bytes`, 4 MiB by
default) plus what computing it needs: the source slice it copies and, when widening, `clone_tensor`'s
temporaries (a few chunk-sized tensors; about 5 with noise), plus up to 4 chunks queued on the writer's
threads, plus at most `UNMAP_BYTES` of memory-mapped source pages (the reader is closed, and its maps
released, after every 64 MiB of output). Neither the model size nor the layout enters the bound.
`--workers K` multiplies it by K. Small chunks are also faster: the clone's gathers then run in cache.
Each process computes with one torch thread; the parallelism is the hashing and writing threads beside
it, and the workers.

Every chunk comes from the same functions a training launch uses: `ShardReader.read` for plain
resharding, `megaclone.clone.clone_tensor` (what `build_clone_shard` calls) for widening, at the same
global indices, so the bytes match. Crash safety: files go to `ROOT/.tmp-step_X/` (each file under a
temporary name until complete), a journal there records the finished files, and a rerun with the same
arguments keeps those (after re-hashing them) and redoes the rest; `commit_checkpoint` renames the
directory and moves `latest` last.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import megaclone
from megaclone.checkpoint import (
    ShardReader,
    begin_checkpoint,
    commit_checkpoint,
    file_digest,
    load_model,
    make_manifest,
    write_manifest,
)
from megaclone.checkpoint.io import tokenizer_digests
from megaclone.checkpoint.manifest import atomic_write_text
from megaclone.checkpoint.optim_state import is_optim_file
from megaclone.clone import clone_tensor, depth_plan, growth_record
from megaclone.config import CloneConfig, ModelConfig
from megaclone.convert.carry import carried_record, open_reader, read_moment_chunk
from megaclone.convert.jobs import SHARD_METADATA, ConvertError, FileJob, TensorJob
from megaclone.convert.plan import ConversionPlan, ConvertOptions, plan_conversion
from megaclone.convert.writer import StreamingShardWriter
from megaclone.spec import spec_table

ABORT_ENV = "MEGACLONE_CONVERT_ABORT_AFTER"  # test hook: crash after this many tensors (per process)
STATE_NAME = ".convert-state.json"  # the journal of finished files inside the temporary directory
UNMAP_BYTES = 64 << 20  # close the source files (dropping their mapped pages) after this much output
VERIFY_TOLERANCE = 1e-5  # widened logits: max |wide - small| <= this * max |small|


class ConversionAborted(BaseException):
    """Raised by the test hook. A BaseException, so no cleanup handler runs: it leaves what a kill would."""


class VerificationError(ConvertError):
    """--verify found that the output does not compute the source's function (the output is not committed)."""


@dataclass(frozen=True)
class FileResult:
    rel: str
    digest: dict[str, Any]
    tensors: int
    bytes_read: int  # source bytes read, all files
    reads: dict[str, int]  # source file -> bytes read from it


@dataclass
class ConversionReport:
    output: Path  # the committed step directory
    files: list[FileResult] = field(default_factory=list)  # the files written by this run
    resumed: list[str] = field(default_factory=list)  # files kept from an interrupted run
    seconds: float = 0.0
    bytes_written: int = 0
    verify: dict[str, Any] | None = None


@dataclass(frozen=True)
class WorkContext:
    """What converting one file needs; picklable, sent to every worker."""

    source: Path
    source_cfg: ModelConfig
    target_cfg: ModelConfig
    clone: CloneConfig | None
    tmp_dir: Path
    chunk_bytes: int
    direct_io: bool = True


def tune_process() -> None:
    """Process-wide settings for converting: chunk-sized allocations on the heap, no garbage collector scans
    of the objects that exist at start-up.

    By default glibc serves every multi-MiB tensor with a fresh mmap, so each chunk's temporaries are
    page-faulted in again: measured here, about 40% of the widening's CPU time. And the collector's full
    collections walk every object torch's import made (about 170k; 75 ms each on this machine): `gc.freeze`
    leaves them out. Process-wide, so only the CLI and the worker processes call it, not the library
    functions. The malloc part is a no-op without glibc.
    """
    gc.freeze()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: allocations below 64 MiB come from the heap
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MiB of freed heap for reuse


class _AbortHook:
    """Counts finished tensors in this process and raises ConversionAborted at MEGACLONE_CONVERT_ABORT_AFTER."""

    def __init__(self) -> None:
        value = os.environ.get(ABORT_ENV)
        self.limit = int(value) if value else None
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.limit is not None and self.count >= self.limit:
            raise ConversionAborted(f"{ABORT_ENV}={self.limit}: aborted after {self.count} tensors")


def row_chunks(job: TensorJob, chunk_bytes: int) -> Iterator[tuple[slice, ...]]:
    """Global indices of consecutive row blocks of the target slice, each at most `chunk_bytes` (at least one row).

    Rows of a row-major tensor are contiguous in the file, so the blocks are written in order.
    """
    rows = job.shape[0] if job.shape else 1
    row_bytes = job.nbytes // rows if rows else 0
    per = max(1, chunk_bytes // row_bytes) if row_bytes else max(rows, 1)
    rest = tuple(slice(a, b) for a, b in job.ranges[1:])
    start0 = job.ranges[0][0]
    for a in range(0, max(rows, 1), per):
        yield (slice(start0 + a, start0 + min(rows, a + per)),) + rest


def convert_file(job: FileJob, ctx: WorkContext, on_tensor: Callable[[int], None]) -> FileResult:
    """Write one target file into `ctx.tmp_dir`; `on_tensor(nbytes)` after each tensor (progress, abort hook)."""
    wide_specs = spec_table(ctx.target_cfg) if ctx.clone else {}
    writer = StreamingShardWriter(ctx.tmp_dir / job.rel, [(t.name, t.shape) for t in job.tensors], SHARD_METADATA,
                                  direct=ctx.direct_io)
    optim_reader = open_reader(job.rel, ctx.source)  # optim/ files: --optimizer carry
    reader = optim_reader or ShardReader(ctx.source)
    mapped = 0  # output bytes since the source files were last closed
    try:
        for t in job.tensors:
            writer.begin_tensor(t.name)
            for index in row_chunks(t, ctx.chunk_bytes):
                if optim_reader is not None:
                    part = read_moment_chunk(optim_reader, t.name, index, ctx.source_cfg, ctx.clone, wide_specs)
                elif ctx.clone:
                    part = clone_tensor(wide_specs[t.name], ctx.source_cfg, ctx.clone, reader.read, index)
                else:
                    part = reader.read(t.name, index)  # a view of the memory-mapped file when contiguous
                mapped += part.numel() * 4
                writer.write(part)
                del part
                if mapped >= UNMAP_BYTES:
                    reader.close()  # unmap: the source pages read so far leave the RSS
                    mapped = 0
            on_tensor(t.nbytes)
        reader.close()
        digest = writer.finish()
    except Exception:
        writer.abort()
        raise
    except BaseException:
        writer.abandon()  # a simulated crash: the partial temporary file stays, as after a kill
        raise
    reads: dict[str, int] = {}
    for _, rel, ranges in reader.accesses:
        reads[rel] = reads.get(rel, 0) + math.prod(b - a for a, b in ranges) * 4
    return FileResult(job.rel, digest, len(job.tensors), sum(reads.values()), reads)


# --- worker processes (spawn): each owns whole target files ------------------------------------------------

_WORKER: dict[str, Any] = {}  # per worker process: the progress queue and the abort hook


def _init_worker(progress: Any) -> None:
    torch.set_num_threads(1)
    tune_process()
    _WORKER["queue"], _WORKER["abort"] = progress, _AbortHook()


def _convert_in_worker(job: FileJob, ctx: WorkContext) -> FileResult:
    def on_tensor(nbytes: int) -> None:
        _WORKER["queue"].put(nbytes)
        _WORKER["abort"].tick()

    return convert_file(job, ctx, on_tensor)


def _run_pool(jobs: list[FileJob], ctx: WorkContext, workers: int, on_bytes: Callable[[int], None],
              on_file: Callable[[FileResult], None]) -> None:
    spawn = mp.get_context("spawn")
    progress = spawn.Queue()
    pool = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker, initargs=(progress,))

    def drain() -> None:
        while True:
            try:
                on_bytes(progress.get_nowait())
            except queue.Empty:
                return

    try:
        pending = {pool.submit(_convert_in_worker, job, ctx) for job in jobs}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            failed = [f for f in finished if f.exception() is not None]
            for future in finished - set(failed):  # journal what finished before raising, so a rerun keeps it
                on_file(future.result())
            if failed:
                raise failed[0].exception()
        drain()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# --- the temporary directory and its journal ---------------------------------------------------------------

def _write_state(tmp: Path, fingerprint: str, done: dict[str, dict[str, Any]]) -> None:
    atomic_write_text(tmp / STATE_NAME, json.dumps({"fingerprint": fingerprint, "done": done}, indent=1))


def _prepare_tmp(plan: ConversionPlan) -> dict[str, dict[str, Any]]:
    """Resume from an interrupted run of the same plan (keeping its finished, re-hashed files), or start fresh."""
    tmp, fingerprint = plan.tmp_dir, plan.fingerprint()
    state = None
    if (tmp / STATE_NAME).is_file():
        try:
            state = json.loads((tmp / STATE_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            state = None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        begin_checkpoint(plan.root, plan.step)  # removes a stale temporary directory
        _write_state(tmp, fingerprint, {})
        return {}
    planned = {f.rel for f in plan.files}
    kept = {rel: d for rel, d in dict(state.get("done") or {}).items()
            if rel in planned and (tmp / rel).is_file() and file_digest(tmp / rel) == d}
    for path in sorted(tmp.rglob("*"), reverse=True):  # partial files, unjournaled files, an old manifest
        rel = path.relative_to(tmp).as_posix()
        if path.is_file() and rel != STATE_NAME and rel not in kept:
            path.unlink()
    _write_state(tmp, fingerprint, kept)
    return kept


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- provenance, manifest, verification ----------------------------------------------------------------------

def _provenance(plan: ConversionPlan) -> dict[str, Any]:
    src = plan.source_manifest
    out: dict[str, Any] = {"converter": {
        "tool": "tools/reshard_expand.py", "megaclone_version": megaclone.__version__,
        "arguments": plan.options.arguments(),
        "source": {"path": str(plan.source.resolve()), "step": src.step, "layout": dict(src.layout),
                   "model": dataclasses.asdict(src.model), "files": dict(src.files),
                   "provenance": dict(src.provenance)},
        "target_layout": {"tp_size": plan.tp_size, "pp_size": plan.pp_size}, "optimizer": plan.options.optimizer,
        "fingerprint": plan.fingerprint()}}
    if plan.clone:  # the same record a grown training launch writes
        out["hyperclone"] = growth_record(plan.source, src.step, src.layout, src.model, plan.clone)
    return out


def verify_conversion(source: Path, output: Path, widened: bool, batch: int = 2, seq_len: int = 16,
                      seed: int = 0, preserving: bool = True) -> dict[str, Any]:
    """Logits of `output` (loaded whole, checksums checked) against `source` on a fixed random batch, fp32.

    Without widening they must be equal bit for bit; with widening max |diff| <= 1e-5 * max |source logit|.
    Raises VerificationError otherwise; returns the measured numbers. A growth that is not `preserving` (depth by
    stack or interleave) is measured, not judged: the numbers include the next-token loss of both on the batch.
    """
    small, cfg = load_model(source, verify=False)
    wide, _ = load_model(output, verify=True)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, min(seq_len, cfg.max_seq_len) + 1), generator=g)
    tokens, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        a, b = small(tokens), wide(tokens)
    diff, scale = float((a - b).abs().max()), float(a.abs().max())
    result = {"max_abs_diff": diff, "max_abs_logit": scale, "exact": bool(torch.equal(a, b)),
              "tolerance": 0.0 if not widened else VERIFY_TOLERANCE * scale,
              "small_loss": float(F.cross_entropy(a.flatten(0, 1), labels.flatten())),
              "loss": float(F.cross_entropy(b.flatten(0, 1), labels.flatten())), "preserving": preserving}
    if not preserving:
        return result
    if (not widened and not result["exact"]) or diff > result["tolerance"]:
        raise VerificationError(f"--verify: logits of {output} differ from {source}: max |diff| = {diff:.3e}, "
                                f"allowed {result['tolerance']:.3e} (max |logit| {scale:.3e}); not committed")
    return result


# --- the whole conversion -----------------------------------------------------------------------------------

def execute_plan(plan: ConversionPlan) -> ConversionReport:
    """Write every planned file (resuming an interrupted run), the manifest, verify if asked, then commit."""
    start = time.perf_counter()
    o = plan.options
    done = _prepare_tmp(plan)
    tmp, fingerprint = plan.tmp_dir, plan.fingerprint()
    report = ConversionReport(output=plan.final_dir, resumed=sorted(done))
    todo = [f for f in plan.files if f.rel not in done]
    ctx = WorkContext(plan.source, plan.source_manifest.model, plan.target_cfg, plan.clone, tmp, o.chunk_bytes,
                      o.direct_io)
    data_bytes = {f.rel: sum(t.nbytes for t in f.tensors) for f in plan.files}
    bar = tqdm(total=sum(data_bytes.values()), initial=sum(data_bytes[r] for r in done), unit="B",
               unit_scale=True, unit_divisor=1024, desc=f"convert -> tp{plan.tp_size} pp{plan.pp_size}",
               disable=not o.progress, dynamic_ncols=True)
    tensors_done = [sum(len(f.tensors) for f in plan.files if f.rel in done)]

    def on_bytes(nbytes: int) -> None:
        tensors_done[0] += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"tensors {tensors_done[0]}/{plan.num_tensors}", refresh=False)

    def on_file(result: FileResult) -> None:
        done[result.rel] = result.digest
        report.files.append(result)
        _write_state(tmp, fingerprint, done)

    threads = torch.get_num_threads()
    try:
        if o.workers == 1 or len(todo) <= 1:
            torch.set_num_threads(1)  # as in a worker: small chunks run fastest on one thread
            abort = _AbortHook()
            for job in todo:
                on_file(convert_file(job, ctx, lambda nbytes: (on_bytes(nbytes), abort.tick())))
        else:
            _run_pool(todo, ctx, min(o.workers, len(todo)), on_bytes, on_file)
    finally:
        torch.set_num_threads(threads)
        bar.close()

    src = plan.source_manifest
    if src.tokenizer:
        shutil.copyfile(plan.source / src.tokenizer, tmp / "tokenizer.model")
    synced = [tmp / f.rel for f in plan.files] + ([tmp / "tokenizer.model"] if src.tokenizer else [])
    with ThreadPoolExecutor(max_workers=4) as pool:  # durable before the manifest and the rename
        list(pool.map(_fsync_file, synced))
    files = {f.rel: done[f.rel] for f in sorted(plan.files, key=lambda f: f.rel) if not is_optim_file(f.rel)}
    manifest = make_manifest(plan.target_cfg, plan.step, plan.tp_size, plan.pp_size,
                             tokenizer="tokenizer.model" if src.tokenizer else None, data=dict(src.data),
                             files=files, provenance=_provenance(plan),
                             optimizer=carried_record(src, {f.rel: done[f.rel] for f in plan.files}),
                             other_files=tokenizer_digests(tmp, src.tokenizer), settings=src.settings)
    write_manifest(tmp, manifest)
    if o.verify:
        report.verify = verify_conversion(plan.source, tmp, widened=plan.clone is not None,
                                          preserving=plan.clone is None or
                                          depth_plan(plan.source_manifest.model, plan.clone).preserving)
    (tmp / STATE_NAME).unlink()  # the journal must not be committed with the checkpoint
    report.output = commit_checkpoint(tmp)
    report.bytes_written = sum(f.digest["bytes"] for f in report.files)
    report.seconds = time.perf_counter() - start
    return report


def convert_checkpoint(options: ConvertOptions) -> ConversionReport:
    """Plan (every check, nothing written) and execute one conversion; see tools/reshard_expand.py."""
    return execute_plan(plan_conversion(options))
