"""Writing checkpoint directories safely: temporary name, rename when complete, `latest` moved last.

A crash at any point leaves `latest` naming the previous complete checkpoint; a leftover
`.tmp-step_*` directory is ignored by readers and removed by the next `begin_checkpoint` of that step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megaclone.checkpoint.manifest import (
    LATEST_NAME,
    MANIFEST_NAME,
    STEP_DIR_RE,
    CheckpointError,
    atomic_write_text,
    make_manifest,
    read_manifest,
    resolve_checkpoint,
    step_dir_name,
    step_dirs,
    write_manifest,
)
from megaclone.checkpoint.shards import (
    file_digest,
    save_weight_shard,
    storage_stage,
    weight_file,
    weight_file_digests,
)
from megaclone.config import ConfigError, ModelConfig, ParallelConfig
from megaclone.spec import build_param_specs

__all__ = ["begin_checkpoint", "check_output_dir", "commit_checkpoint", "holds_no_checkpoint", "previous_complete_step",
           "prune_checkpoints", "remove_stale_saves", "resolve_checkpoint", "stale_saves", "tokenizer_digests",
           "write_weights_checkpoint"]

TMP_PREFIX = ".tmp-"
SliceSource = Callable[[str, tuple[slice, ...]], torch.Tensor]


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_dir(path: str | Path, what: str) -> None:
    """Refuse, before any work, a directory that is a file, lies under a file, or cannot be created or written.

    The nearest existing ancestor must be a directory in which this process can create an entry: a directory
    is made there and removed again (access(2) would not do: root passes it on read-only places like /sys).
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(f"{what} {path} {where}: expected a directory (or a path where one can be created)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megaclone-write-check-", dir=existing))
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {existing} ({e.strerror or e})") from None


def previous_complete_step(step_dir: str | Path) -> Path | None:
    """The newest committed step directory beside `step_dir` that is older than it (None: there is none)."""
    step_dir = Path(step_dir)
    m = STEP_DIR_RE.match(step_dir.name.removeprefix(".old-"))
    if m is None or not step_dir.parent.is_dir():
        return None
    older = [path for step, path in step_dirs(step_dir.parent)
             if step < int(m.group(1)) and (path / MANIFEST_NAME).is_file()]
    return older[-1] if older else None


def holds_no_checkpoint(root: str | Path) -> bool:
    """Whether `root` is a checkpoint root that nothing was ever committed to: missing, empty, or holding only
    what interrupted writes leave (`.tmp-step_*` saves, a `.latest.tmp-*` pointer)."""
    root = Path(root)
    if not root.exists():
        return True
    return root.is_dir() and all(p.name.startswith(".") and ".tmp-" in p.name for p in root.iterdir())


def stale_saves(root: str | Path) -> list[Path]:
    """`.tmp-step_*` directories in `root`: saves that were interrupted before their commit."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(TMP_PREFIX + "step_") and p.is_dir())


def remove_stale_saves(root: str | Path) -> list[Path]:
    """Delete every interrupted save in `root` (before a training run writes its next one); returns them."""
    stale = stale_saves(root)
    for path in stale:
        shutil.rmtree(path)
    return stale


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """A fresh, empty `ROOT/.tmp-step_XXXXXXXX` to write into (a stale one from a crash is removed).

    With several ranks, one rank calls this and the others wait at a barrier before writing.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (TMP_PREFIX + step_dir_name(step))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp_dir: str | Path) -> Path:
    """Rename a complete `.tmp-step_X` to `step_X` (replacing an old `step_X`), then point `latest` at it.

    The manifest is read back first, so `latest` only ever names a checkpoint that reads. With several
    ranks, exactly one commits, after a barrier that follows every rank's writes.
    """
    tmp_dir = Path(tmp_dir)
    name = tmp_dir.name[len(TMP_PREFIX):]
    if not tmp_dir.name.startswith(TMP_PREFIX) or not STEP_DIR_RE.match(name):
        raise ValueError(f"commit_checkpoint({tmp_dir}): expected a directory from begin_checkpoint "
                         f"named {TMP_PREFIX}step_XXXXXXXX")
    if not tmp_dir.is_dir():
        raise CheckpointError(f"cannot commit {tmp_dir}: it does not exist")
    read_manifest(tmp_dir)  # raises CheckpointError when the manifest is missing or invalid
    root = tmp_dir.parent
    final, old = root / name, root / f".old-{name}"
    if final.exists():  # move aside rather than delete: resolve_checkpoint falls back to it until the new one is in
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp_dir, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST_NAME, name + "\n")
    _fsync_dir(root)
    if old.exists():  # the replaced copy, or one left by a crash between the two renames
        shutil.rmtree(old)
    return final


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step directories (0: keep all); never the one `latest` names.

    A directory is renamed to a hidden name before it is deleted, so a half-deleted one never looks
    like a checkpoint. Returns the removed step directories.
    """
    if keep_last <= 0:
        return []
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint root {root} does not exist")
    latest = root / LATEST_NAME
    current = latest.read_text().strip() if latest.is_file() else None
    steps = step_dirs(root)
    removed = []
    for _, path in steps[: max(0, len(steps) - keep_last)]:
        if path.name == current:
            continue
        doomed = root / f".deleting-{path.name}"
        if doomed.exists():
            shutil.rmtree(doomed)
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        removed.append(path)
    return removed


def _slice_source(cfg: ModelConfig, full_state: dict[str, torch.Tensor] | SliceSource) -> SliceSource:
    """A (name, index) -> tensor reader; a dict is checked against the spec table before any writing."""
    if callable(full_state):
        return full_state
    if not isinstance(full_state, dict):
        raise TypeError(f"full_state must be a dict of full tensors or a callable (name, index) -> Tensor, "
                        f"got {type(full_state).__name__}")
    specs = {s.name: s for s in build_param_specs(cfg)}
    missing, extra = sorted(set(specs) - set(full_state)), sorted(set(full_state) - set(specs))
    if missing or extra:
        raise ValueError(f"full_state does not match the model config: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, spec in specs.items():
        if tuple(full_state[name].shape) != spec.shape:
            raise ValueError(f"full_state[{name!r}] has shape {list(full_state[name].shape)}, "
                             f"the model config gives {list(spec.shape)}")
    return lambda name, index: full_state[name][index]


def tokenizer_digests(step_dir: Path, has_tokenizer: Any) -> dict[str, dict[str, Any]]:
    """`other_files` of a weight-only checkpoint: the digest of its tokenizer copy, when it has one."""
    return {"tokenizer.model": file_digest(step_dir / "tokenizer.model")} if has_tokenizer else {}


def write_weights_checkpoint(root_or_dir: str | Path, cfg: ModelConfig,
                             full_state: dict[str, torch.Tensor] | SliceSource, tp_size: int, pp_size: int,
                             step: int = 0, provenance: dict[str, Any] | None = None,
                             tokenizer: str | Path | None = None, data: dict[str, Any] | None = None) -> Path:
    """Write a complete weight-only checkpoint of `cfg` at layout TP x PP and commit it; returns the step dir.

    `root_or_dir` is the ROOT (the step directory `step_XXXXXXXX` is created in it and `latest` moved),
    or a path named `step_XXXXXXXX` whose parent is taken as the ROOT (its number is the step when
    `step` is 0). `full_state` maps every global name to its full tensor, or is a callable
    (name, index) -> the slice `index` of the full tensor, so huge models never sit in memory whole.
    """
    root = Path(root_or_dir)
    m = STEP_DIR_RE.match(root.name)
    if m:
        named = int(m.group(1))
        if step not in (0, named):
            raise ValueError(f"write_weights_checkpoint: directory {root} names step {named} but step={step}")
        root, step = root.parent, named
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: a checkpoint needs the real vocabulary size")
    ParallelConfig(tp_size=tp_size, pp_size=pp_size, zero_stage=0).validate(cfg)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer model {tokenizer} does not exist")
    source = _slice_source(cfg, full_state)
    specs = build_param_specs(cfg)

    tmp = begin_checkpoint(root, step)
    try:
        for pp in range(pp_size):
            for tp in range(tp_size):
                tensors = {}
                for spec in specs:
                    if storage_stage(spec, cfg, pp_size) != pp:
                        continue
                    t = source(spec.name, spec.tp_slices(tp, tp_size))
                    if tuple(t.shape) != spec.tp_shape(tp_size):
                        raise ValueError(f"full_state gave {spec.name}{list(spec.tp_slices(tp, tp_size))} with shape "
                                         f"{list(t.shape)}, expected {list(spec.tp_shape(tp_size))}")
                    tensors[spec.name] = t
                save_weight_shard(tmp / weight_file(tp, pp), tensors)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
        manifest = make_manifest(cfg, step, tp_size, pp_size, tokenizer="tokenizer.model" if tokenizer else None,
                                 data=dict(data or {}), files=weight_file_digests(tmp, tp_size, pp_size),
                                 provenance=dict(provenance or {}), other_files=tokenizer_digests(tmp, tokenizer))
        write_manifest(tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(tmp)
