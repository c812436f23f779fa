"""The checkpoint manifest: what a checkpoint holds, read before anything else is touched.

A tool opens `manifest.json` first and refuses anything it does not understand (another format, a
newer format_version, a parameter table that the model config would not produce), so a mismatch
fails with a message naming the file instead of as a wrong tensor deep inside a run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaclone.config import ConfigError, ModelConfig, ParallelConfig, model_config_from_dict
from megaclone.spec import ParamSpec, build_param_specs

FORMAT_NAME = "megaclone-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
_LAYOUT_KEYS = ("tp_size", "pp_size", "dp_size", "zero_stage", "precision")
OPTIM_DIR = "optim"  # the optimizer-state files (checkpoint.optim_state) live here, as the `optimizer` record says


class CheckpointError(ValueError):
    """Any problem with a checkpoint on disk; the message names the file and what was expected."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (catchable as CheckpointError and as FileNotFoundError)."""


def step_dir_name(step: int) -> str:
    """`step_00000100`: zero-padded so that names sort by step."""
    if step < 0:
        raise ValueError(f"checkpoint step={step} must be >= 0")
    return f"step_{step:08d}"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, flush it to disk, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_XXXXXXXX` directory in `root`, oldest first (complete or not)."""
    found = []
    for child in root.iterdir():
        m = STEP_DIR_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def complete_steps(root: str | Path) -> list[Path]:
    """The committed step directories of a checkpoint root (a manifest in each), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [path for _, path in step_dirs(root) if (path / MANIFEST_NAME).is_file()]


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory meant by `path`: a step directory itself, or a ROOT whose `latest` names one.

    A `.tmp-*` directory is never the target of `latest`, so an interrupted save is invisible here.
    """
    path = Path(path)
    if path.is_file() and path.name == MANIFEST_NAME:
        path = path.parent
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (expected a checkpoint root or step directory)")
    if (path / MANIFEST_NAME).is_file():
        return path
    latest = path / LATEST_NAME
    if not latest.is_file():
        steps = complete_steps(path)
        hint = (f"; it holds complete step directories, the newest {steps[-1].name}: a crash between a commit's "
                f"rename and its '{LATEST_NAME}' update? Pass {steps[-1]} itself" if steps else "")
        raise CheckpointError(f"not a megaclone checkpoint (no {MANIFEST_NAME} in {path}); a checkpoint root "
                              f"needs a '{LATEST_NAME}' file naming a complete step directory{hint}")
    name = latest.read_text().strip()
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise CheckpointError(f"{latest}: expected the name of a step directory in {path}, got {name!r}")
    target = path / name
    if not target.exists() and (path / f".old-{name}" / MANIFEST_NAME).is_file():
        return path / f".old-{name}"  # a crash inside commit_checkpoint's replace of this same step
    if not (target / MANIFEST_NAME).is_file():
        raise CheckpointError(f"{latest} names {name!r}, but {target} is not a complete checkpoint "
                              f"(no {MANIFEST_NAME})")
    return target


def _check_params(params: list[ParamSpec], cfg: ModelConfig, where: str) -> None:
    """The stored parameter table must be exactly the one the stored model config produces."""
    expected = {s.name: s for s in build_param_specs(cfg)}
    stored = {p.name: p for p in params}
    if len(stored) != len(params):
        raise CheckpointError(f"{where}: duplicate parameter names in 'params'")
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: 'params' disagree with the model config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for name, want in expected.items():
        got = stored[name]
        if got.shape != want.shape:
            raise CheckpointError(f"{where}: parameter {name} has shape {list(got.shape)} in 'params' but the "
                                  f"model config gives shape {list(want.shape)}")
        if got != want:
            raise CheckpointError(f"{where}: parameter {name} is {got.to_dict()} in 'params' but the model config "
                                  f"gives {want.to_dict()}")


def _param_from_dict(d: Any, where: str) -> ParamSpec:
    try:
        spec = ParamSpec.from_dict(d)
        stored_shape = tuple(d.get("shape", spec.shape))
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: malformed entry in 'params': {d!r} ({e!r})") from e
    if stored_shape != spec.shape:
        raise CheckpointError(f"{where}: parameter {spec.name} lists shape {list(stored_shape)} but its axes "
                              f"give shape {list(spec.shape)}")
    return spec


def _check_digests(entries: Any, key: str, where: str) -> None:
    """`entries` must map paths inside the step directory to {'sha256': hex, 'bytes': int}."""
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: '{key}' must be a mapping of relative path -> digest")
    for rel, entry in entries.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{where}: {key}[{rel!r}] must be a path inside the step directory")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{where}: {key}[{rel!r}] must be {{'sha256': hex, 'bytes': int}}, got {entry!r}")


def is_optim_file(rel: str) -> bool:
    """Whether a path relative to the step directory is an optimizer-state file."""
    return rel.startswith(OPTIM_DIR + "/")


def check_optimizer_record(d: Any, where: str) -> None:
    """Raise CheckpointError naming `where` unless `d` is a well-formed `optimizer` entry."""
    if not isinstance(d, dict) or not {"step", "scheduler", "files"} <= set(d):
        raise CheckpointError(f"{where}: 'optimizer' must be a mapping with keys ['step', 'scheduler', 'files'], "
                              f"got {d!r}")
    if not isinstance(d["step"], int) or d["step"] < 0:
        raise CheckpointError(f"{where}: optimizer.step must be an integer >= 0, got {d['step']!r}")
    scheduler = d["scheduler"]
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("last_epoch"), int):
        raise CheckpointError(f"{where}: optimizer.scheduler must be a mapping with an integer 'last_epoch', "
                              f"got {scheduler!r}")
    if not isinstance(d["files"], dict):
        raise CheckpointError(f"{where}: optimizer.files must be a mapping of relative path -> digest")
    for rel, entry in d["files"].items():
        if not is_optim_file(rel) or ".." in Path(rel).parts:
            raise CheckpointError(f"{where}: optimizer.files[{rel!r}] must be a path under {OPTIM_DIR}/")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{where}: optimizer.files[{rel!r}] must be {{'sha256': hex, 'bytes': int}}, "
                                  f"got {entry!r}")


@dataclass
class Manifest:
    """The contents of manifest.json (format and format_version are implied)."""

    step: int
    model: ModelConfig
    layout: dict[str, Any]  # tp_size, pp_size, dp_size, zero_stage, precision
    params: list[ParamSpec]
    tokenizer: str | None = None  # file name inside the step directory
    data: dict[str, Any] = field(default_factory=dict)  # sampler state, e.g. consumed_samples
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative path -> {sha256, bytes}
    deepspeed: str | None = None  # subdirectory holding DeepSpeed's own checkpoint
    provenance: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None  # Adam state files: {step, scheduler, files} (see checkpoint.optim_state)
    other_files: dict[str, dict[str, Any]] | None = None  # every other file (DeepSpeed's, the tokenizer): digests;
    # None in manifests of megaclone versions that recorded none
    settings: dict[str, Any] | None = None  # the run's train, data and checkpoint settings ({section: {key: value}})

    @property
    def tp_size(self) -> int:
        return int(self.layout["tp_size"])

    @property
    def pp_size(self) -> int:
        return int(self.layout["pp_size"])

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": self.step,
                "model": dataclasses.asdict(self.model), "layout": dict(self.layout), "tokenizer": self.tokenizer,
                "data": dict(self.data), "params": [p.to_dict() for p in self.params], "files": dict(self.files),
                "deepspeed": self.deepspeed, "provenance": dict(self.provenance),
                **({"optimizer": dict(self.optimizer)} if self.optimizer is not None else {}),
                **({"other_files": dict(self.other_files)} if self.other_files is not None else {}),
                **({"settings": dict(self.settings)} if self.settings is not None else {})}

    def digests(self) -> dict[str, dict[str, Any]]:
        """Every file the manifest records a digest for: weights, optimizer-state files and the others."""
        return {**self.files, **(self.optimizer or {}).get("files", {}), **(self.other_files or {})}

    @staticmethod
    def from_dict(d: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Validate and build; every problem is a CheckpointError naming `where`."""
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise CheckpointError(f"{where}: not a megaclone checkpoint manifest (format={got!r}, "
                                  f"expected {FORMAT_NAME!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{where}: unknown format_version {d.get('format_version')!r} "
                                  f"(this megaclone reads format_version {FORMAT_VERSION})")
        missing = sorted({"step", "model", "layout", "params"} - set(d))
        if missing:
            raise CheckpointError(f"{where}: missing key(s) {missing}")
        if not isinstance(d["step"], int) or d["step"] < 0:
            raise CheckpointError(f"{where}: 'step' must be an integer >= 0, got {d['step']!r}")
        try:
            model = model_config_from_dict(d["model"], where=f"{where}: model")
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{where}: invalid model config: {e}") from e
        layout = d["layout"]
        if not isinstance(layout, dict) or any(k not in layout for k in _LAYOUT_KEYS):
            raise CheckpointError(f"{where}: 'layout' must be a mapping with keys {list(_LAYOUT_KEYS)}, got {layout!r}")
        try:
            ParallelConfig(tp_size=int(layout["tp_size"]), pp_size=int(layout["pp_size"]), zero_stage=0).validate(model)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{where}: layout {layout} does not fit the model: {e}") from e
        if not isinstance(d["params"], list):
            raise CheckpointError(f"{where}: 'params' must be a list")
        params = [_param_from_dict(p, where) for p in d["params"]]
        _check_params(params, model, where)
        files = d.get("files") or {}
        other_files = d.get("other_files")
        _check_digests(files, "files", where)
        if other_files is not None:
            _check_digests(other_files, "other_files", where)
        optimizer = d.get("optimizer")
        if optimizer is not None:
            check_optimizer_record(optimizer, where)
        settings = d.get("settings")
        if settings is not None and not (isinstance(settings, dict) and all(isinstance(v, dict)
                                                                            for v in settings.values())):
            raise CheckpointError(f"{where}: 'settings' must map section names to mappings, got {settings!r}")
        return Manifest(step=d["step"], model=model, layout=dict(layout), params=params,
                        tokenizer=d.get("tokenizer"), data=dict(d.get("data") or {}), files=dict(files),
                        deepspeed=d.get("deepspeed"), provenance=dict(d.get("provenance") or {}),
                        optimizer=dict(optimizer) if optimizer is not None else None,
                        other_files=dict(other_files) if other_files is not None else None,
                        settings=dict(settings) if settings is not None else None)


def make_manifest(cfg: ModelConfig, step: int, tp_size: int, pp_size: int, *, dp_size: int = 1,
                  zero_stage: int = 0, precision: str = "fp32", **fields: Any) -> Manifest:
    """A manifest for `cfg` at a layout, with the parameter table built from the spec (extra fields as keywords)."""
    layout = {"tp_size": tp_size, "pp_size": pp_size, "dp_size": dp_size, "zero_stage": zero_stage,
              "precision": precision}
    return Manifest(step=step, model=cfg, layout=layout, params=build_param_specs(cfg), **fields)


def write_manifest(ckpt_dir: str | Path, manifest: Manifest) -> Path:
    """Write `ckpt_dir/manifest.json` atomically; returns its path."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=1) + "\n")
    return path


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a checkpoint given as a ROOT (follows `latest`) or a step directory."""
    file = resolve_checkpoint(path) / MANIFEST_NAME
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    return Manifest.from_dict(d, where=str(file))
