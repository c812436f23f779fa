"""Planning a checkpoint conversion: every check that can fail runs here, before anything is written.

A plan lists the target files (one per target TP rank x PP stage), and for each the tensors it stores
in safetensors order, each as the global index range of the target slice. The executor (`run`) only
follows the plan. Checks, cheapest first: the options, the source manifest, the target layout against
the (widened) model, the output path, every source file's header (present, every tensor there with
the TP shape the manifest implies), free disk space for the planned bytes, then the source checksums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from megaclone.checkpoint import (
    LATEST_NAME,
    CheckpointError,
    Manifest,
    ShardReader,
    file_digest,
    read_manifest,
    resolve_checkpoint,
    step_dir_name,
    storage_stage,
    weight_file,
)
from megaclone.checkpoint.io import check_output_dir
from megaclone.clone import check_carry_possible, clone_factors, describe_growth, groups_factor, grown_model_config
from megaclone.config import CloneConfig, ConfigError, ModelConfig, ParallelConfig
from megaclone.convert.carry import check_carry_source, optim_file_job
from megaclone.convert.jobs import SHARD_METADATA, ConvertError, FileJob, TensorJob
from megaclone.convert.writer import planned_file_bytes
from megaclone.spec import ParamSpec, build_param_specs

TMP_PREFIX = ".tmp-"  # begin_checkpoint's prefix: commit_checkpoint renames `.tmp-step_X` to `step_X`


@dataclass(frozen=True)
class ConvertOptions:
    """What `tools/reshard_expand.py` was asked to do (its flags, one field each)."""

    input: Path
    output: Path
    tp_size: int | None = None  # None: the source's
    pp_size: int | None = None
    hyperclone: int = 0  # n; 0: no widening
    hyperclone_ffn: int | None = None
    hyperclone_groups: int | None = None
    grow_layers: int = 0  # the target depth; 0: keep it
    grow_method: str = "zero"
    clone_variant: str = "symmetric"
    clone_noise_db: float | None = None
    clone_seed: int = 0
    optimizer: str = "drop"
    workers: int = 1
    verify: bool = False
    overwrite: bool = False
    chunk_bytes: int = 4 << 20  # the most output bytes computed at once (rows of one target tensor)
    direct_io: bool = True  # write around the page cache (O_DIRECT) where the filesystem allows it
    progress: bool = True

    def arguments(self) -> dict[str, Any]:
        """The options as recorded in the output's provenance."""
        d = dataclasses.asdict(self)
        d["input"], d["output"] = str(self.input), str(self.output)
        del d["progress"]
        return d


@dataclass
class ConversionPlan:
    options: ConvertOptions
    source: Path  # the source step directory
    source_manifest: Manifest
    target_cfg: ModelConfig
    clone: CloneConfig | None  # None: no widening
    tp_size: int
    pp_size: int
    root: Path  # output ROOT; the step directory is created in it
    step: int
    files: list[FileJob] = field(default_factory=list)

    @property
    def final_dir(self) -> Path:
        return self.root / step_dir_name(self.step)

    @property
    def tmp_dir(self) -> Path:
        return self.root / (TMP_PREFIX + step_dir_name(self.step))

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def num_tensors(self) -> int:
        return sum(len(f.tensors) for f in self.files)

    def fingerprint(self) -> str:
        """Identifies the output bytes (source checksums, target model, layout, clone settings), so a rerun
        of an interrupted conversion can keep the files it already finished; workers and chunking do not
        change a byte and are left out."""
        key = {"source": str(self.source.resolve()), "source_files": self.source_manifest.files,
               "target": dataclasses.asdict(self.target_cfg), "tp": self.tp_size, "pp": self.pp_size,
               "clone": dataclasses.asdict(self.clone) if self.clone else None, "step": self.step,
               "files": [(f.rel, f.size) for f in self.files]}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem that will hold `path` (its nearest existing ancestor). Tests patch this."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _check_options(o: ConvertOptions) -> None:
    if o.optimizer not in ("drop", "carry"):
        raise ConvertError(f"--optimizer {o.optimizer!r}: expected 'drop' (weights only) or 'carry' (the Adam state "
                           f"files too)")
    for flag, value in (("--tp", o.tp_size), ("--pp", o.pp_size)):
        if value is not None and value < 1:
            raise ConvertError(f"{flag} {value}: expected an integer >= 1")
    if o.workers < 1:
        raise ConvertError(f"--workers {o.workers}: expected an integer >= 1")
    if o.chunk_bytes < 4:
        raise ConvertError(f"chunk_bytes={o.chunk_bytes}: expected at least one fp32 value (4 bytes)")
    if not o.hyperclone:
        used = [flag for flag, value, default in (
            ("--hyperclone-ffn", o.hyperclone_ffn, None), ("--hyperclone-groups", o.hyperclone_groups, None))
            if value != default]
        if used:
            raise ConvertError(f"{', '.join(used)} given without --hyperclone N: nothing is widened")
    if not o.hyperclone and not o.grow_layers:
        used = [flag for flag, value, default in (
            ("--clone-variant", o.clone_variant, "symmetric"), ("--clone-noise-db", o.clone_noise_db, None),
            ("--clone-seed", o.clone_seed, 0)) if value != default]
        if used:
            raise ConvertError(f"{', '.join(used)} given without --hyperclone N or --grow-layers L: nothing grows")
    if not o.grow_layers and o.grow_method != "zero":
        raise ConvertError(f"--grow-method {o.grow_method} given without --grow-layers L: the depth is kept")


def _clone_config(o: ConvertOptions, source: Path) -> CloneConfig | None:
    if not o.hyperclone and not o.grow_layers:
        return None
    clone = CloneConfig(init_from=str(source), factor=o.hyperclone, ffn_factor=o.hyperclone_ffn,
                        groups_factor=o.hyperclone_groups, grow_layers=o.grow_layers, grow_method=o.grow_method,
                        variant=o.clone_variant, noise_db=o.clone_noise_db, seed=o.clone_seed)
    n, _ = clone_factors(clone)  # ValueError naming --hyperclone / --hyperclone-ffn / the variant / the noise level
    if o.optimizer == "carry" and groups_factor(clone) != n:
        raise ConvertError(f"--optimizer carry with --hyperclone-groups {groups_factor(clone)} < --hyperclone {n}: "
                           "the k and v rows of a query group would need other moment scales than its q rows; use "
                           "--optimizer drop")
    return clone


def _output_location(o: ConvertOptions, source_step: int) -> tuple[Path, int]:
    """(ROOT, step): a path named step_XXXXXXXX is a step directory inside its parent ROOT."""
    out = Path(o.output)
    name = out.name
    if name.startswith("step_") and name[5:].isdigit() and len(name) >= 13:
        return out.parent, int(name[5:])
    return out, source_step


def _check_output(o: ConvertOptions, root: Path, final: Path, source: Path) -> None:
    check_output_dir(root, "--output")  # not a file, not under one, writable
    if final.exists() and final.resolve() == source.resolve():
        raise ConvertError(f"--output {o.output} is the input checkpoint {source}; write the conversion elsewhere")
    if o.overwrite:
        return
    if final.exists():
        raise ConvertError(f"output {final} already exists; pass --overwrite to replace it")
    if (root / LATEST_NAME).is_file():
        raise ConvertError(f"output {root} already holds a checkpoint ('{LATEST_NAME}' names "
                           f"{(root / LATEST_NAME).read_text().strip()!r}); pass --overwrite to add {final.name} "
                           f"and point '{LATEST_NAME}' at it")


def _check_layout(cfg: ModelConfig, tp: int, pp: int, growth: str | None) -> None:
    try:
        ParallelConfig(tp_size=tp, pp_size=pp, zero_stage=0).validate(cfg)
    except ConfigError as e:
        what = f"the model grown {growth}" if growth else "the model"
        raise ConvertError(f"target layout --tp {tp} --pp {pp} does not fit {what} (num_query_groups="
                           f"{cfg.num_query_groups}, ffn_size={cfg.ffn_size}, padded vocab={cfg.padded_vocab_size}, "
                           f"num_layers={cfg.num_layers}): {e}") from e


def check_source_files(reader: ShardReader) -> None:
    """Every weight file of the source layout exists, is the size the manifest lists, reads as safetensors,
    and holds every tensor its stage stores with the TP shard shape; only headers are read."""
    cfg, tp_size, pp_size = reader.config, reader.tp_size, reader.pp_size
    for pp in range(pp_size):
        stored = [s for s in reader.specs.values() if storage_stage(s, cfg, pp_size) == pp]
        for tp in range(tp_size):
            rel = weight_file(tp, pp)
            path = reader.path / rel
            if not path.is_file():
                raise CheckpointError(f"missing shard file {path} (the manifest's layout tp={tp_size}, "
                                      f"pp={pp_size} needs it)")
            entry = reader.manifest.files.get(rel)
            if entry is None:
                raise CheckpointError(f"{reader.path / 'manifest.json'}: 'files' does not list {rel}")
            if path.stat().st_size != entry["bytes"]:
                raise CheckpointError(f"shard file {path} is {path.stat().st_size} bytes, the manifest expects "
                                      f"{entry['bytes']} (truncated or replaced)")
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    for spec in stored:
                        if spec.name not in keys:
                            raise CheckpointError(f"tensor {spec.name} missing in shard file {path}")
                        sl = f.get_slice(spec.name)
                        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                        if shape != spec.tp_shape(tp_size) or dtype != "F32":
                            raise CheckpointError(
                                f"shard file {path}: {spec.name} is {dtype} {list(shape)}, the manifest implies "
                                f"F32 {list(spec.tp_shape(tp_size))} (global {list(spec.shape)} at tp_size={tp_size})")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"shard file {path} is not a readable safetensors file: {e}") from e


def verify_source_checksums(reader: ShardReader, threads: int) -> None:
    """sha256 of every listed file against the manifest, `threads` files at a time (hashing releases the GIL)."""
    items = sorted(reader.manifest.files.items())

    def check(item: tuple[str, dict[str, Any]]) -> None:
        rel, entry = item
        got = file_digest(reader.path / rel)
        if got != {"sha256": entry["sha256"], "bytes": entry["bytes"]}:
            raise CheckpointError(f"checksum mismatch for {reader.path / rel}: sha256 {got['sha256']} "
                                  f"({got['bytes']} bytes), manifest expects {entry['sha256']} "
                                  f"({entry['bytes']} bytes)")

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items)))) as pool:
        list(pool.map(check, items))


def plan_files(cfg: ModelConfig, tp_size: int, pp_size: int, optimizer: bool = False) -> list[FileJob]:
    """Every target file with its tensors in safetensors order; largest files first (balances workers).
    `optimizer`: also each rank's optim/ file, its moments sliced exactly like the weights."""
    specs: list[ParamSpec] = build_param_specs(cfg)
    files = []
    for pp in range(pp_size):
        stored = sorted((s for s in specs if storage_stage(s, cfg, pp_size) == pp), key=lambda s: s.name.encode())
        for tp in range(tp_size):
            tensors = []
            for spec in stored:
                index = spec.tp_slices(tp, tp_size)
                ranges = tuple(sl.indices(size)[:2] for sl, size in zip(index, spec.shape))
                tensors.append(TensorJob(spec.name, spec.tp_shape(tp_size), ranges))
            size = planned_file_bytes([(t.name, t.shape) for t in tensors], SHARD_METADATA)
            files.append(FileJob(weight_file(tp, pp), tp, pp, tuple(tensors), size))
            if optimizer:
                files.append(optim_file_job(tensors, tp, pp))
    return sorted(files, key=lambda f: (-f.size, f.rel))


def _bytes_already_there(plan: ConversionPlan) -> int:
    """Bytes of target files that an interrupted run of the same conversion left in the temporary directory."""
    return sum((plan.tmp_dir / f.rel).stat().st_size for f in plan.files if (plan.tmp_dir / f.rel).is_file())


def plan_conversion(options: ConvertOptions) -> ConversionPlan:
    """Check everything and return the plan; raises ValueError (ConvertError, CheckpointError, ...) or
    FileNotFoundError naming the file or flag, with nothing written."""
    _check_options(options)
    source = resolve_checkpoint(options.input)
    manifest = read_manifest(source)
    clone = _clone_config(options, source)
    src_cfg = manifest.model
    target_cfg = grown_model_config(src_cfg, clone) if clone else src_cfg
    tp = options.tp_size or manifest.tp_size
    pp = options.pp_size or manifest.pp_size
    _check_layout(target_cfg, tp, pp, describe_growth(src_cfg, clone) if clone else None)
    root, step = _output_location(options, manifest.step)
    plan = ConversionPlan(options, source, manifest, target_cfg, clone, tp, pp, root, step,
                          plan_files(target_cfg, tp, pp, optimizer=options.optimizer == "carry"))
    _check_output(options, root, plan.final_dir, source)
    with ShardReader(source) as reader:
        check_source_files(reader)
        need = plan.total_bytes - _bytes_already_there(plan)
        if manifest.tokenizer:
            tokenizer = source / manifest.tokenizer
            if not tokenizer.is_file():
                raise CheckpointError(f"{source / 'manifest.json'} names tokenizer {manifest.tokenizer!r}, "
                                      f"but {tokenizer} does not exist")
            need += tokenizer.stat().st_size
        free = free_disk_bytes(root)
        if need > free:
            raise ConvertError(f"not enough free disk for the output in {root}: the plan writes {need} bytes "
                               f"({need / 2**30:.2f} GiB), {free} bytes ({free / 2**30:.2f} GiB) are free")
        verify_source_checksums(reader, max(options.workers, os.cpu_count() or 1))
    if options.optimizer == "carry":
        check_carry_source(source, manifest)
        if clone is not None:
            try:
                check_carry_possible(src_cfg, clone)
            except ValueError as e:
                raise ConvertError(f"--optimizer carry: {e}") from e
    return plan
