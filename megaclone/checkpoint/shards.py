"""Weight shard files: one safetensors file per (TP rank, PP stage), read slice by slice.

Files are keyed by global parameter name and hold each rank's TP slice, so a reader at any other
layout maps a global index range onto the few files (and the byte ranges in them) that hold it.
safetensors is used because loading it can never run code, and its `get_slice` reads only the
requested part of a memory-mapped file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megaclone.checkpoint.manifest import CheckpointError, Manifest, read_manifest, resolve_checkpoint
from megaclone.config import ModelConfig
from megaclone.spec import ParamSpec, build_param_specs, normalize_index, stages_of

Index = tuple[slice, ...]


def weight_file(tp_rank: int, pp_rank: int) -> str:
    """Path of a rank's weight file relative to the step directory."""
    return f"weights/tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def storage_stage(spec: ParamSpec, cfg: ModelConfig, pp_size: int) -> int:
    """The one stage whose files store `spec`: the first that holds it (stage 0 for a tied embedding)."""
    return stages_of(spec, cfg, pp_size)[0]


def save_weight_shard(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save contiguous fp32 CPU copies of `tensors` as safetensors, via a temporary name and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    copies = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_weight_shard({path}): value for {name!r} is {type(t).__name__}, not a Tensor")
        # copy=True: never share storage (safetensors refuses aliased tensors) and never hold a view
        copies[name] = t.detach().to(device="cpu", dtype=torch.float32, memory_format=torch.contiguous_format,
                                     copy=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(copies, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_digest(path: str | Path) -> dict[str, Any]:
    """{"sha256": hex, "bytes": int} of a file, read in 1 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def layout_file_digests(ckpt_dir: str | Path, tp_size: int, pp_size: int,
                        file_name: Callable[[int, int], str] | None = None,
                        what: str = "shard file") -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of the file of every (tp, pp) rank of a layout (all must exist)."""
    ckpt_dir, file_name = Path(ckpt_dir), file_name or weight_file
    out = {}
    for pp in range(pp_size):
        for tp in range(tp_size):
            rel = file_name(tp, pp)
            if not (ckpt_dir / rel).is_file():
                raise CheckpointError(f"missing {what} {ckpt_dir / rel} (layout tp={tp_size}, pp={pp_size})")
            out[rel] = file_digest(ckpt_dir / rel)
    return out


def weight_file_digests(ckpt_dir: str | Path, tp_size: int, pp_size: int) -> dict[str, dict[str, Any]]:
    """The manifest's `files` entry for every weight file of a layout (all must exist)."""
    return layout_file_digests(ckpt_dir, tp_size, pp_size)


def local_weight_shard(cfg: ModelConfig, params: dict[str, torch.Tensor], tp_size: int, pp_rank: int,
                       pp_size: int) -> dict[str, torch.Tensor]:
    """The part of a rank's parameters (global name -> TP-local tensor) its weight file stores.

    Drops the copy of the tied embedding on the last stage; checks every stored tensor's shape.
    """
    specs = {s.name: s for s in build_param_specs(cfg)}
    out = {}
    for name, t in params.items():
        if name not in specs:
            raise ValueError(f"parameter {name!r} is not in the spec table of this model config")
        spec = specs[name]
        if storage_stage(spec, cfg, pp_size) != pp_rank:
            continue
        if tuple(t.shape) != spec.tp_shape(tp_size):
            raise ValueError(f"parameter {name}: local shape {list(t.shape)}, expected {list(spec.tp_shape(tp_size))} "
                             f"at tp_size={tp_size}")
        out[name] = t
    return out


class ShardReader:
    """Reads slices of global parameters from a checkpoint of any layout, touching only what they need.

    Each weight file is opened once, on first use, and the handle is reused. Every read is appended
    to `accesses` as (name, file, [(start, stop) per dim within the stored tensor]).
    """

    file_kind = "shard file"  # in error messages
    files_key = "'files'"  # the manifest entry listing this reader's files

    def __init__(self, ckpt_path: str | Path):
        self.path: Path = resolve_checkpoint(ckpt_path)
        self.manifest: Manifest = read_manifest(self.path)
        self.config: ModelConfig = self.manifest.model
        self.specs: dict[str, ParamSpec] = {s.name: s for s in self.manifest.params}
        self.tp_size, self.pp_size = self.manifest.tp_size, self.manifest.pp_size
        self.accesses: list[tuple[str, str, list[tuple[int, int]]]] = []
        self.files: dict[str, dict[str, Any]] = self.manifest.files  # digests of the files this reader reads
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the open file handles (their memory maps close when released)."""
        self._handles.clear()
        self._keys.clear()

    def file_for(self, tp_rank: int, pp_rank: int) -> str:
        """The file (relative to the step directory) holding a rank's tensors; subclasses read other files."""
        return weight_file(tp_rank, pp_rank)

    def _open(self, rel: str) -> Any:
        handle = self._handles.get(rel)
        if handle is not None:
            return handle
        full = self.path / rel
        if not full.is_file():
            raise CheckpointError(f"missing shard file {full} (the manifest's layout tp={self.tp_size}, "
                                  f"pp={self.pp_size} needs it)")
        entry = self.files.get(rel)
        if entry is not None and full.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"shard file {full} is {full.stat().st_size} bytes, the manifest expects "
                                  f"{entry['bytes']} (truncated or replaced)")
        try:
            handle = safe_open(str(full), framework="pt")
            keys = set(handle.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"shard file {full} is not a readable safetensors file: {e}") from e
        self._handles[rel], self._keys[rel] = handle, keys
        return handle

    def _read_part(self, spec: ParamSpec, rel: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """`ranges` of the tensor `spec.name` as stored (TP-local) in file `rel`."""
        handle = self._open(rel)
        full = self.path / rel
        if spec.name not in self._keys[rel]:
            raise CheckpointError(f"tensor {spec.name} missing in shard file {full}")
        try:
            sl = handle.get_slice(spec.name)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        except SafetensorError as e:
            raise CheckpointError(f"shard file {full}: cannot read {spec.name}: {e}") from e
        want = spec.tp_shape(self.tp_size)
        if shape != want:
            raise CheckpointError(f"shard file {full}: {spec.name} has shape {list(shape)}, expected the TP shard "
                                  f"shape {list(want)} (tp_size={self.tp_size})")
        if dtype != "F32":
            raise CheckpointError(f"shard file {full}: {spec.name} has dtype {dtype}, expected F32")
        self.accesses.append((spec.name, rel, list(ranges)))
        try:
            return sl[tuple(slice(a, b) for a, b in ranges)]
        except SafetensorError as e:
            raise CheckpointError(f"shard file {full}: cannot read {spec.name}: {e}") from e

    def read(self, name: str, index: Index | slice = ()) -> torch.Tensor:
        """The slice `index` of the global fp32 tensor `name`, from the overlapping TP shard files only."""
        spec = self.specs.get(name)
        if spec is None:
            raise CheckpointError(f"parameter {name!r} is not in checkpoint {self.path} "
                                  f"({len(self.specs)} parameters in its manifest)")
        ranges = normalize_index(spec.shape, index, spec.name)
        stage = storage_stage(spec, self.config, self.pp_size)
        ax = spec.tp_axis
        if ax is None:  # replicated: every TP file holds it, read the first
            return self._read_part(spec, self.file_for(0, stage), ranges)
        start, stop = ranges[ax]
        per = spec.tp_shape(self.tp_size)[ax]
        parts = []
        for tp in range(start // per, -(-stop // per)):  # shards overlapping [start, stop)
            lo = tp * per
            local = list(ranges)
            local[ax] = (max(start, lo) - lo, min(stop, lo + per) - lo)
            parts.append(self._read_part(spec, self.file_for(tp, stage), local))
        if not parts:  # empty range along the split axis
            return torch.empty([b - a for a, b in ranges], dtype=torch.float32)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=ax)

    def read_shard(self, name: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The TP shard `tp_rank` of `name` at a (possibly different) TP degree `tp_size`."""
        return self.read(name, self.specs[name].tp_slices(tp_rank, tp_size))

    def verify(self) -> None:
        """Check every file the layout needs is listed, present, and matches its sha256 and size."""
        for pp in range(self.pp_size):
            for tp in range(self.tp_size):
                rel = self.file_for(tp, pp)
                if rel not in self.files:
                    raise CheckpointError(f"{self.path / 'manifest.json'}: {self.files_key} does not list {rel}")
        for rel, entry in self.files.items():
            full = self.path / rel
            if not full.is_file():
                raise CheckpointError(f"missing {self.file_kind} {full} (listed in the manifest)")
            got = file_digest(full)
            if got != {"sha256": entry["sha256"], "bytes": entry["bytes"]}:
                raise CheckpointError(f"checksum mismatch for {full}: sha256 {got['sha256']} ({got['bytes']} bytes), "
                                      f"manifest expects {entry['sha256']} ({entry['bytes']} bytes)")
