"""Merge the node-local copies of a training checkpoint into one complete checkpoint (e.g. on a shared disk).

    python tools/gather_checkpoint.py --output /shared/ckpt /mnt/node0/ckpt /mnt/node1/ckpt [--step 1000]

A run with parallel.node_local_checkpoints=true leaves on each node a copy of the step directory holding
that node's ranks' files and an inventory (node.json: node, ranks, sha256 of every file). This tool checks
that the copies belong together (same manifest and step, every node present, files that several nodes
hold byte-identical), copies the union while hashing each file against its inventory, commits the result
like a training save (temporary name, then `latest`), and verifies the weight files against the manifest.
The output is an ordinary checkpoint: exact resume at the saved layout, load_model, --init-from, tools.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclone.checkpoint import (  # noqa: E402
    MANIFEST_NAME,
    CheckpointError,
    ShardReader,
    begin_checkpoint,
    commit_checkpoint,
    read_manifest,
    resolve_checkpoint,
    step_dir_name,
)
from megaclone.cluster import NODE_INVENTORY_NAME, read_node_inventory  # noqa: E402


def _step_dir(source: Path, step: int | None) -> Path:
    if step is not None and not (source / MANIFEST_NAME).is_file():
        source = source / step_dir_name(step)
    return resolve_checkpoint(source)


def _copy_verified(src: Path, dst: Path, want: dict[str, Any]) -> None:
    """Copy `src` to `dst`, hashing on the way; a mismatch with the inventory means the node's disk holds
    something else than was saved."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
            fout.write(chunk)
    if (h.hexdigest(), size) != (want["sha256"], want["bytes"]):
        raise CheckpointError(f"checksum mismatch for {src}: sha256 {h.hexdigest()[:16]} ({size} bytes), its "
                              f"node inventory expects {want['sha256'][:16]} ({want['bytes']} bytes)")


def plan_gather(sources: list[Path], step: int | None = None) -> tuple[int, dict[str, tuple[Path, dict[str, Any]]]]:
    """Check that `sources` are all the node-local copies of one checkpoint; returns (step, relative path ->
    (the step directory to copy it from, its digest)). Raises CheckpointError naming the directory."""
    if not sources:
        raise ValueError("give the node-local checkpoint directories to gather")
    copies = []
    for source in sources:
        step_dir = _step_dir(Path(source), step)
        copies.append((step_dir, read_manifest(step_dir), read_node_inventory(step_dir)))
    first_dir, first_manifest, first_inv = copies[0]
    nodes: dict[int, Path] = {}
    for step_dir, manifest, inv in copies:
        if manifest.to_dict() != first_manifest.to_dict():
            differ = sorted(k for k, v in manifest.to_dict().items() if first_manifest.to_dict().get(k) != v)
            raise CheckpointError(f"{step_dir} and {first_dir} are not copies of one checkpoint: their manifests "
                                  f"differ in {differ}")
        if (inv["step"], inv["num_nodes"]) != (first_inv["step"], first_inv["num_nodes"]):
            raise CheckpointError(f"{step_dir / NODE_INVENTORY_NAME}: step {inv['step']} of {inv['num_nodes']} nodes, "
                                  f"but {first_dir} is step {first_inv['step']} of {first_inv['num_nodes']} nodes")
        if inv["node"] in nodes:
            raise CheckpointError(f"{step_dir} and {nodes[inv['node']]} are both the copy of node {inv['node']}")
        nodes[inv["node"]] = step_dir
    missing = sorted(set(range(first_inv["num_nodes"])) - set(nodes))
    if missing:
        raise CheckpointError(f"node(s) {missing} of {first_inv['num_nodes']} missing: give every node's copy "
                              f"(have {', '.join(f'node {n}: {d}' for n, d in sorted(nodes.items()))})")
    files: dict[str, tuple[Path, dict[str, Any]]] = {}
    for step_dir, _, inv in sorted(copies, key=lambda c: c[2]["node"]):
        for rel, entry in inv["files"].items():
            if rel in files and files[rel][1] != entry:
                raise CheckpointError(f"{rel} differs between {files[rel][0]} and {step_dir} (sha256 "
                                      f"{files[rel][1]['sha256'][:12]} vs {entry['sha256'][:12]})")
            files.setdefault(rel, (step_dir, entry))
    for rel, entry in first_manifest.files.items():
        held = files.get(rel)
        if held is None or {k: held[1][k] for k in ("sha256", "bytes")} != {k: entry[k] for k in ("sha256", "bytes")}:
            raise CheckpointError(f"{first_dir / MANIFEST_NAME} lists {rel}, but no node holds that file "
                                  f"with its checksum")
    return first_manifest.step, files


def gather_checkpoint(sources: list[Path], output: Path, step: int | None = None) -> Path:
    """Merge node-local copies into OUTPUT/step_XXXXXXXX (committed, `latest` moved); returns the step dir."""
    step_number, files = plan_gather(sources, step)
    tmp = begin_checkpoint(output, step_number)
    try:
        for rel, (step_dir, entry) in sorted(files.items()):
            _copy_verified(step_dir / rel, tmp / rel, entry)
        final = commit_checkpoint(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with ShardReader(final) as reader:
        reader.verify()
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path, help="each node's checkpoint root (follows `latest`) or step dir")
    p.add_argument("--output", required=True, type=Path, help="checkpoint root to write the merged step into")
    p.add_argument("--step", type=int, help="gather this step (default: the one each source's `latest` names)")
    args = p.parse_args(argv)
    try:
        final = gather_checkpoint(args.sources, args.output, args.step)
    except (ValueError, FileNotFoundError) as e:
        print(f"gather_checkpoint.py: error: {e}", file=sys.stderr)
        return 2
    print(f"gathered {len(args.sources)} node-local copies into {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
