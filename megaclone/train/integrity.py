"""Checksums of every file of a training checkpoint: hashed in parallel when saved, verified in parallel on resume.

The ranks that share a copy of the step directory (all ranks on a shared filesystem; a node's ranks with
node-local checkpoints) split its files by size and each hashes its share, so a save or a resume costs about
1/N of hashing the whole step. On resume every file of the step is checked before anything is loaded or
written: its size, its sha256 against the manifest, and, for DeepSpeed's torch files, that it loads with
`weights_only=True` (train.safe_load). All ranks then share what they found and refuse together, naming each
bad file and the previous complete step, so a damaged or tampered checkpoint never reaches a training step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megaclone.checkpoint import CheckpointError, Manifest, file_digest
from megaclone.checkpoint.io import previous_complete_step
from megaclone.cluster import NODE_INVENTORY_NAME
from megaclone.train.safe_load import load_torch_file

log = logging.getLogger("megaclone.train")


class ResumeRefused(CheckpointError):
    """The checkpoint given to --load failed verification; every rank raises the same one, before any work."""


def split_by_size(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """`sizes`' files spread over `parts` workers, largest first to the least loaded one (deterministic)."""
    loads, shares = [0] * parts, [[] for _ in range(parts)]
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        worker = loads.index(min(loads))
        shares[worker].append(rel)
        loads[worker] += sizes[rel]
    return shares


def _gather(value: Any) -> list[Any]:
    """`value` from every rank, indexed by rank (just this one's without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _from_leader(value: Any, copy_ranks: list[int], rank: int) -> Any:
    """Collective: the value the first rank of `copy_ranks` passes (one listing per copy, so that every rank of it
    splits the same files, whatever its view of a network filesystem)."""
    return _gather(value if rank == copy_ranks[0] else None)[copy_ranks[0]]


def _files_of(step_dir: Path, under: str = "") -> dict[str, int]:
    """{relative path: bytes} of the files in `step_dir` (or its subdirectory `under`), node inventory aside."""
    base = step_dir / under
    if not base.is_dir():
        return {}
    return {p.relative_to(step_dir).as_posix(): p.stat().st_size for p in base.rglob("*")
            if p.is_file() and p.name != NODE_INVENTORY_NAME}


def hash_step_files(step_dir: Path, copy_ranks: list[int], rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Collective, after every rank has written its files: the ranks sharing a copy of `step_dir` (`copy_ranks`)
    hash a share each of the files that the copy's first rank lists. Returns (this copy's files, every copy's
    merged) as {relative path: digest}; a file held by two copies (node-local: replicated files) must agree."""
    mine = split_by_size(_from_leader(_files_of(step_dir) if rank == copy_ranks[0] else None, copy_ranks, rank),
                         len(copy_ranks))
    digests = {rel: file_digest(step_dir / rel) for rel in mine[copy_ranks.index(rank)]}
    own: dict[str, Any] = {}
    union: dict[str, Any] = {}
    for copy, found in sorted(_gather((copy_ranks[0], digests)), key=lambda g: g[0]):
        for rel, entry in found.items():
            if copy == copy_ranks[0]:
                own[rel] = entry
            if union.setdefault(rel, entry) != entry:
                raise CheckpointError(f"node-local checkpoint {step_dir}: the copies of {rel} on different nodes "
                                      f"differ (sha256 {union[rel]['sha256'][:12]} vs {entry['sha256'][:12]})")
    return own, union


def _problem(step_dir: Path, rel: str, want: dict[str, Any] | None, missing_ok: bool) -> str | None:
    """What is wrong with one file (None: nothing). `want` None: no digest recorded, only loadability checked."""
    path = step_dir / rel
    if not path.is_file():
        return None if missing_ok else f"{path}: missing (the manifest lists it)"
    if want is not None:
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path}: {size} bytes, the manifest records {want['bytes']} (truncated or replaced)"
        got = file_digest(path)["sha256"]
        if got != want["sha256"]:
            return f"{path}: sha256 {got}, the manifest records {want['sha256']} (the file changed since it was saved)"
    if path.suffix == ".pt":
        try:
            load_torch_file(path, map_location="cpu", mmap=True)
        except CheckpointError as e:
            return str(e)
    return None


def verify_resume(step_dir: Path, manifest: Manifest, copy_ranks: list[int], rank: int,
                  node_local: bool = False) -> None:
    """Collective: check every file of the step, split over the ranks sharing the copy; raise ResumeRefused on
    every rank when any rank found a problem. `node_local`: a copy lacks other nodes' files, by design."""
    ds_dir = manifest.deepspeed
    on_disk = _from_leader(_files_of(step_dir, ds_dir) if ds_dir and rank == copy_ranks[0] else {}, copy_ranks, rank)
    wanted: dict[str, dict[str, Any] | None] = dict(manifest.digests())
    problems = []
    if ds_dir and manifest.other_files is None:  # an earlier megaclone: DeepSpeed's files have no digests
        wanted.update({rel: None for rel in on_disk})
        if rank == 0:
            log.warning(f"{step_dir / 'manifest.json'} (an earlier megaclone's) records no checksums for DeepSpeed's "
                        f"files: they are checked for loading without unpickling only")
    elif on_disk:
        problems += [f"{step_dir / rel}: not recorded in the manifest" for rel in sorted(set(on_disk) - set(wanted))
                     if rank == copy_ranks[0]]
    sizes = {rel: (want or {}).get("bytes", on_disk.get(rel, 0)) for rel, want in wanted.items()}
    share = split_by_size(sizes, len(copy_ranks))[copy_ranks.index(rank)]
    problems += [p for rel in share if (p := _problem(step_dir, rel, wanted[rel], node_local)) is not None]
    found = sorted({p for rank_problems in _gather(problems) for p in rank_problems})
    if found:
        earlier = previous_complete_step(step_dir)
        advice = (f"The previous complete checkpoint is {earlier}: resume from it with --load {earlier}."
                  if earlier is not None else f"There is no earlier complete checkpoint in {step_dir.parent}.")
        raise ResumeRefused(f"--load: checkpoint {step_dir} refused before anything was loaded, {len(found)} "
                            f"file(s) failed verification:\n  " + "\n  ".join(found) + f"\n{advice}")
