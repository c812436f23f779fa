"""Import a Hugging Face checkpoint into a sharded megaclone checkpoint, and export one back.

Import streams: every target TP shard of every parameter is read straight from the HF safetensors rows
it needs (`megaclone.hf.tensors`), so the HF model is never built or held whole. Everything that can be
refused (the config, the tensor names, shapes and dtypes, the layout, the output path) is checked before
the first byte is written. Export stitches each megaclone tensor from its shards and splits it into the
family's tensors, strips the vocabulary padding, and writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from megaclone.checkpoint import CheckpointError, Manifest, ShardReader, read_manifest, write_weights_checkpoint
from megaclone.config import ParallelConfig
from megaclone.hf.export_config import config_to_hf, infer_family
from megaclone.hf.families import FAMILIES, config_from_hf
from megaclone.hf.files import (
    CONFIG_NAME,
    DTYPES,
    FLOAT_DTYPES,
    HFCheckpoint,
    check_output_dir,
    read_hf_config,
    write_hf_dir,
)
from megaclone.hf.tensors import IGNORED_SUFFIXES, assemble, find_prefix, hf_tensor_shapes, tensor_map
from megaclone.spec import normalize_index, spec_table

PROVENANCE_KEY = "hf_import"
_TIED_HEADS = ("lm_head.weight", "embed_out.weight")  # HF ties these to the embedding; a stored copy is unused


def _check_tensors(hf: HFCheckpoint, shapes: dict[str, tuple[int, ...]], tied: bool) -> list[str]:
    """Every tensor the mapping needs exists with its shape and a float dtype; nothing unknown is left over.

    Returns the sorted source dtypes.
    """
    dtypes = set()
    for name, want in shapes.items():
        if name not in hf.where:
            raise ValueError(f"{hf.path}: tensor {name} (shape {list(want)}) is missing from {hf.files}")
        shape, dtype = hf.shape_and_dtype(name)
        if shape != want:
            raise ValueError(f"{hf.path}: tensor {name} has shape {list(shape)}, config.json implies {list(want)}")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{hf.path}: tensor {name} has dtype {dtype}; only float tensors {FLOAT_DTYPES} "
                             f"(not quantized ones) can be imported")
        dtypes.add(dtype)
    unknown = [n for n in hf.names() if n not in shapes and not n.endswith(IGNORED_SUFFIXES)
               and not (tied and n in _TIED_HEADS)]
    if unknown:
        raise ValueError(f"{hf.path}: {len(unknown)} tensor(s) that this {hf.config.get('model_type')} model "
                         f"does not have, e.g. {unknown[:5]}: an architecture feature megaclone does not "
                         f"know (refusing rather than dropping weights)")
    return sorted(dtypes)


def _check_tokenizer(path: Path | None, vocab_size: int, hf_dir: Path) -> None:
    if path is None:
        warnings.warn(f"{hf_dir} has no tokenizer.model or tokenizer.json: the checkpoint gets no tokenizer",
                      stacklevel=3)
        return
    from megaclone.data.tokenizer import Tokenizer

    try:
        size = Tokenizer.load(path).vocab_size
    except (ValueError, ImportError, RuntimeError) as e:
        warnings.warn(f"{path} is copied but could not be loaded here ({e})", stacklevel=3)
        return
    if size > vocab_size:
        warnings.warn(f"{path} has {size} tokens but the model's vocab_size is {vocab_size}: ids past it have no "
                      f"embedding", stacklevel=3)


def import_hf_checkpoint(hf_dir: str | Path, output: str | Path, tp_size: int = 1, pp_size: int = 1,
                         vocab_multiple: int = 128) -> Path:
    """Write the HF model in `hf_dir` as a megaclone checkpoint at TP x PP under `output`; returns the step dir."""
    output = Path(output)
    check_output_dir(output, "--output")
    family, cfg = config_from_hf(read_hf_config(hf_dir), vocab_multiple, where=str(Path(hf_dir) / CONFIG_NAME))
    ParallelConfig(tp_size=tp_size, pp_size=pp_size, zero_stage=0).validate(cfg)
    with HFCheckpoint(hf_dir) as hf:
        tmap = tensor_map(family, cfg, find_prefix(family, hf.where))
        specs = spec_table(cfg)
        assert set(tmap) == set(specs), sorted(set(tmap) ^ set(specs))
        dtypes = _check_tensors(hf, hf_tensor_shapes(tmap), cfg.tied_embeddings)
        tokenizer = hf.tokenizer_file()
        _check_tokenizer(tokenizer, cfg.vocab_size, hf.path)
        provenance = {PROVENANCE_KEY: {
            "family": family, "source": str(hf.path.resolve()), "source_dtypes": dtypes, "config": hf.config,
            "tokenizer": tokenizer.name if tokenizer else None, "side_files": hf.side_files()}}

        def read(name: str, index: tuple[slice, ...]) -> torch.Tensor:
            return tmap[name].read(hf, normalize_index(specs[name].shape, index, name))

        return write_weights_checkpoint(output, cfg, read, tp_size, pp_size, provenance=provenance,
                                        tokenizer=tokenizer)


def _find_key(tree: Any, key: str) -> dict[str, Any] | None:
    """The first `key` entry in nested provenance dicts (a resharded checkpoint nests its source's)."""
    if not isinstance(tree, dict):
        return None
    if isinstance(tree.get(key), dict):
        return tree[key]
    for value in tree.values():
        found = _find_key(value, key)
        if found is not None:
            return found
    return None


def find_hf_import(manifest: Manifest, max_depth: int = 8) -> dict[str, Any]:
    """The import record of the HF model a checkpoint descends from (through clones and reshards), or {}."""
    provenance = manifest.provenance
    for _ in range(max_depth):
        found = _find_key(provenance, PROVENANCE_KEY)
        if found is not None:
            return found
        source = (_find_key(provenance, "hyperclone") or {}).get("source")
        if not source:
            return {}
        try:
            provenance = read_manifest(source).provenance
        except (CheckpointError, OSError):
            return {}  # the source checkpoint was moved or deleted: infer from the architecture alone
    return {}


def _is_json(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"{"


def _extra_files(reader: ShardReader, source: dict[str, Any]) -> dict[str, bytes]:
    """The tokenizer under its HF name, and the tokenizer/generation JSON files the import carried."""
    import json

    extra = {}
    if reader.manifest.tokenizer:
        path = reader.path / reader.manifest.tokenizer
        extra["tokenizer.json" if _is_json(path) else "tokenizer.model"] = path.read_bytes()
    for name, content in (source.get("side_files") or {}).items():
        extra[name] = (json.dumps(content, indent=2) + "\n").encode()
    return extra


def export_hf_checkpoint(ckpt: str | Path, hf_dir: str | Path, family: str | None = None, dtype: str = "float32",
                         max_shard_bytes: int = 5 << 30) -> Path:
    """Write the megaclone checkpoint `ckpt` (any layout, widened ones included) as an HF model directory."""
    hf_dir = Path(hf_dir)
    check_output_dir(hf_dir, "--hf-dir")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"--family {family!r}: expected one of {FAMILIES}")
    with ShardReader(ckpt) as reader:
        reader.verify()
        cfg = reader.config
        source = find_hf_import(reader.manifest)
        family = infer_family(cfg, family, hint=source.get("family"))
        config = config_to_hf(cfg, family, base=source.get("config"), dtype=dtype)
        tmap = tensor_map(family, cfg)
        assert set(tmap) == set(reader.specs), sorted(set(tmap) ^ set(reader.specs))

        def tensors():
            for name, transform in tmap.items():
                for hf_name, t in assemble(transform.split(reader.read(name))).items():
                    yield hf_name, t.to(DTYPES[dtype])

        return write_hf_dir(hf_dir, config, tensors(), _extra_files(reader, source), max_shard_bytes)
