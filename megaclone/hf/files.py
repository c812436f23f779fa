"""Hugging Face model directories on disk: reading config and safetensors lazily, writing one atomically.

Only safetensors weights are read (a `pytorch_model.bin` is a pickle that could run code). A sharded
checkpoint is found through `model.safetensors.index.json`; every file it names must lie inside the
directory. Output directories are written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# Small JSON files carried through a megaclone checkpoint's provenance so that export can restore them.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
SIDE_FILE_MAX_BYTES = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of an HF model directory, as a plain dict."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--hf-dir {path} is not a directory")
    config = path / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"{config} does not exist: a Hugging Face model directory needs its config.json")
    values = read_json(config)
    if not isinstance(values, dict):
        raise ValueError(f"{config}: expected a JSON object")
    return values


class HFCheckpoint:
    """An HF model directory: its config.json, and its safetensors tensors opened lazily by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config: dict[str, Any] = read_hf_config(self.path)
        self.files = self._weight_files()
        self._handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}  # tensor name -> file
        for rel in self.files:
            for name in self._open(rel).keys():
                if name in self.where:
                    raise ValueError(f"{self.path}: tensor {name} is in both {self.where[name]} and {rel}")
                self.where[name] = rel

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: expected a non-empty 'weight_map' object")
            files = sorted(set(weight_map.values()))
            for rel in files:
                if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise ValueError(f"{index}: weight file {rel!r} must be a path inside {self.path}")
                if not (self.path / rel).is_file():
                    raise FileNotFoundError(f"{self.path / rel} (named in {index}) does not exist")
            return files
        if (self.path / SINGLE_NAME).is_file():
            return [SINGLE_NAME]
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        if found:
            return found
        pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
        hint = f" (found {pickles}: pickled weights are never loaded; save them as safetensors first)" \
            if pickles else ""
        raise FileNotFoundError(f"no safetensors weights in {self.path}: expected {SINGLE_NAME} or {INDEX_NAME}{hint}")

    def _open(self, rel: str) -> Any:
        if rel not in self._handles:
            try:
                self._handles[rel] = safe_open(str(self.path / rel), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{self.path / rel} is not a readable safetensors file: {e}") from e
        return self._handles[rel]

    def names(self) -> list[str]:
        return sorted(self.where)

    def slice(self, name: str) -> Any:
        """A lazy safetensors slice of tensor `name` (indexing it reads only that part of the file)."""
        if name not in self.where:
            raise ValueError(f"{self.path}: tensor {name} is missing from the safetensors files {self.files}")
        return self._open(self.where[name]).get_slice(name)

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self.slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenizer_file(self) -> Path | None:
        """tokenizer.model (sentencepiece) when present, else tokenizer.json (HF tokenizers), else None."""
        for name in ("tokenizer.model", "tokenizer.json"):
            if (self.path / name).is_file():
                return self.path / name
        return None

    def side_files(self) -> dict[str, Any]:
        """The small tokenizer/generation JSON files, parsed, to carry in provenance."""
        out = {}
        for name in SIDE_FILES:
            path = self.path / name
            if path.is_file() and path.stat().st_size <= SIDE_FILE_MAX_BYTES:
                out[name] = read_json(path)
        return out


class OutputExistsError(FileExistsError, ValueError):
    """The output path is taken: nothing is ever written over (catchable as ValueError too)."""


def check_output_dir(out: Path, flag: str) -> None:
    """Refuse to write over anything: the output must not exist or be an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{flag} {out} already exists and is not empty; choose a new path")


def write_hf_dir(out: str | Path, config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]],
                 extra_files: dict[str, bytes] | None = None, max_shard_bytes: int = 5 << 30) -> Path:
    """Write config.json, safetensors shards (+ index when more than one) and `extra_files` into `out`.

    Everything goes to a temporary sibling directory first, which is renamed to `out` when complete.
    """
    out = Path(out)
    check_output_dir(out, "--hf-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards: list[dict[str, torch.Tensor]] = []
        current: dict[str, torch.Tensor] = {}
        size = 0
        paths: list[Path] = []

        def flush() -> None:
            nonlocal current, size
            if current:
                paths.append(tmp / f".shard-{len(paths):05d}.safetensors")
                save_file(current, str(paths[-1]), metadata={"format": "pt"})
                shards.append({k: v.shape for k, v in current.items()})
                current, size = {}, 0

        total = 0
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[name] = t.contiguous()
            size += nbytes
            total += nbytes
        flush()
        if len(paths) == 1:
            os.replace(paths[0], tmp / SINGLE_NAME)
        else:
            weight_map = {}
            for i, (path, names) in enumerate(zip(paths, shards)):
                final = f"model-{i + 1:05d}-of-{len(paths):05d}.safetensors"
                os.replace(path, tmp / final)
                weight_map.update({name: final for name in names})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
