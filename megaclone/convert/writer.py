"""A safetensors file written tensor by tensor, chunk by chunk, with its sha256 computed on the way.

safetensors' own `save_file` needs every tensor of a file in memory at once (and copies each to bytes
first), so a converter built on it holds a whole target shard, twice. The format is simple enough to
stream: an 8-byte little-endian header length, a JSON header with every tensor's dtype, shape and byte
range, then the raw bytes in header order. Since all shapes are known before any data is computed,
the header is written first and each chunk is appended as soon as it exists. The bytes are exactly
those `save_file` writes (tensors sorted by name, compact JSON, space padding to 8 bytes), which the
tests check, so a converted file and one saved by training are interchangeable and hash the same.

Hashing and writing run on two background threads (both release the GIL), at most `depth` chunks behind
the caller, so computing the next chunk overlaps hashing and writing the previous ones. The file is not
fsynced here: the converter syncs every file once, at the end, before it commits the directory.

Where the filesystem allows it the data goes around the page cache (`DirectFile`, O_DIRECT): the kernel then
neither copies every byte into cache pages nor writes them back at the fsync, which was the largest cost of a
conversion (docs/performance.md). Elsewhere (tmpfs, other systems) the file is written through the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

Entry = tuple[str, tuple[int, ...]]  # (tensor name, shape); every tensor is F32
DTYPE_BYTES = 4
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of the block size (at most this)
STAGE_BYTES = 8 << 20  # DirectFile's staging buffer: data reaches the disk in writes of this size


def sorted_entries(entries: list[Entry]) -> list[Entry]:
    """The order safetensors stores tensors of one dtype in: by name (byte order)."""
    return sorted(entries, key=lambda e: e[0].encode())


def safetensors_header(entries: list[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header that `save_file` writes for these F32 tensors."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, shape in sorted_entries(entries):
        size = math.prod(shape) * DTYPE_BYTES
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def planned_file_bytes(entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    """Exact size of the file: header plus every tensor's bytes."""
    return len(safetensors_header(entries, metadata)) + sum(math.prod(s) for _, s in entries) * DTYPE_BYTES


class DirectFile:
    """A file written as one byte stream with O_DIRECT, or through the page cache where O_DIRECT is refused.

    O_DIRECT needs aligned buffers, offsets and lengths, and the stream's pieces (a header, 4 MiB chunks) are
    neither: they are gathered in a page-aligned staging buffer and written STAGE_BYTES at a time; the tail goes
    out padded to the block size, and the file is then truncated to the stream's length. The data is on the
    device when a write returns; an fsync still makes the length and the device's cache durable.
    """

    def __init__(self, path: Path, direct: bool = True):
        self.path = path
        self.size = 0  # bytes of the stream so far
        self._fill = 0  # bytes waiting in the staging buffer
        self._written = 0  # bytes of the staging buffer written so far
        self._fd = -1
        self._stage = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
                self._buffer = mmap.mmap(-1, STAGE_BYTES)  # anonymous: page aligned
                self._stage = np.frombuffer(self._buffer, dtype=np.uint8)
            except OSError:  # e.g. tmpfs: EINVAL
                self._fd = -1
        if self._fd < 0:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    @property
    def direct(self) -> bool:
        return self._stage is not None

    def write(self, data: Any) -> None:
        """Append `data` (bytes or any buffer)."""
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        src = np.frombuffer(view, dtype=np.uint8)
        while src.size:
            if not self.direct:  # from the start, or since a refused write
                self._write_all(memoryview(src))
                return
            take = min(src.size, STAGE_BYTES - self._fill)
            self._stage[self._fill: self._fill + take] = src[:take]  # numpy copies without the GIL
            self._fill += take
            src = src[take:]
            if self._fill == STAGE_BYTES:
                self._write_stage(STAGE_BYTES)

    def _write_stage(self, nbytes: int) -> None:
        try:
            self._write_all(memoryview(self._buffer)[:nbytes])
        except OSError:  # a filesystem that accepted the flag at open but refuses the write: go through the cache
            if self._written:
                raise
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._stage = None
            self._write_all(memoryview(self._buffer)[: self._fill])
        self._written += nbytes
        self._fill = 0

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        """Write what is staged (padded, then truncated to the stream's length) and close."""
        if self._fd < 0:
            return
        try:
            if self.direct and self._fill:
                padded = -(-self._fill // DIRECT_ALIGN) * DIRECT_ALIGN
                self._stage[self._fill: padded] = 0
                self._write_stage(padded)
                os.ftruncate(self._fd, self.size)
        finally:
            os.close(self._fd)
            self._fd = -1
            if self._stage is not None:
                self._stage = None
                self._buffer.close()


class StreamingShardWriter:
    """Write one safetensors file: `write(chunk)` in header order, then `finish()` renames it into place.

    The data goes to a temporary name beside `path` (os.replace at the end), so a crash never leaves
    a file under the final name that is incomplete. `finish` returns {"sha256", "bytes"}.
    """

    def __init__(self, path: str | Path, entries: list[Entry], metadata: dict[str, str] | None = None,
                 depth: int = 4, direct: bool = True):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this writer copies native bytes")
        self.path = Path(path)
        self.entries = sorted_entries(entries)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = DirectFile(self.tmp, direct)
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-hash")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-write")
        self._pending: deque[tuple[Future, Future]] = deque()
        self._depth = depth
        self._entry, self._left = -1, 0  # current tensor and its bytes still to come
        self.bytes_written = 0
        self._submit(safetensors_header(entries, metadata))

    def _submit(self, data: Any) -> None:
        """Queue `data` (bytes or a buffer kept alive by the closures) for hashing and writing, in order."""
        while len(self._pending) >= self._depth:
            for future in self._pending.popleft():
                future.result()
        self._pending.append((self._hasher.submit(self._hash.update, data),
                              self._writer.submit(self._file.write, data)))
        self.bytes_written += memoryview(data).nbytes

    def _drain(self) -> None:
        while self._pending:
            for future in self._pending.popleft():
                future.result()

    def _stop(self) -> None:
        for pool in (self._hasher, self._writer):
            pool.shutdown(wait=True, cancel_futures=True)
        self._file.close()

    def begin_tensor(self, name: str) -> None:
        """Start the next tensor of the header order; `name` must be it."""
        if self._left:
            raise ValueError(f"{self.path}: {self._left} bytes of {self.entries[self._entry][0]} not written")
        self._entry += 1
        if self._entry >= len(self.entries) or self.entries[self._entry][0] != name:
            want = self.entries[self._entry][0] if self._entry < len(self.entries) else "nothing"
            raise ValueError(f"{self.path}: got tensor {name}, the header order expects {want}")
        self._left = math.prod(self.entries[self._entry][1]) * DTYPE_BYTES

    def write(self, chunk: torch.Tensor) -> None:
        """Append the next row-major part of the current tensor (fp32, any shape)."""
        chunk = chunk.detach().to(device="cpu", dtype=torch.float32).contiguous()
        data = memoryview(chunk.reshape(-1).numpy()).cast("B")  # no copy; kept alive until written
        if data.nbytes > self._left:
            raise ValueError(f"{self.path}: {data.nbytes} bytes for {self.entries[self._entry][0]}, "
                             f"only {self._left} left")
        self._left -= data.nbytes
        if data.nbytes:
            self._submit(data)

    def finish(self) -> dict[str, Any]:
        """Flush, close and rename into place; returns the file's digest."""
        if self._left or self._entry != len(self.entries) - 1:
            raise ValueError(f"{self.path}: finish() before every tensor was written")
        self._drain()
        self._stop()
        os.replace(self.tmp, self.path)
        return {"sha256": self._hash.hexdigest(), "bytes": self.bytes_written}

    def abandon(self) -> None:
        """Stop without cleaning up, as a killed process would: the partial temporary file stays (test hook)."""
        self._stop()

    def abort(self) -> None:
        """Close and delete the temporary file (after an error; a hard crash leaves it for the rerun to remove)."""
        self._stop()
        self.tmp.unlink(missing_ok=True)
