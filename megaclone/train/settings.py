"""Where a run's settings come from, and what a checkpoint records of them for the runs that start from it.

A run's values are layers, each a mapping like a config file's, later layers winning: the package defaults, the
source checkpoint's recorded settings (only without --config), the HyperCloning defaults (with --hyperclone), the
config file, `--set`, then the flags. A checkpoint records its run's train settings, the token shards it read and its
checkpoint intervals (`settings_record`, the manifest's `settings`), so a run that widens it (--init-from) or resumes
it (--load) without --config trains on with the same recipe and data instead of the package defaults. The run logs
which layer each setting came from (`describe_sources`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from megaclone.checkpoint import Manifest
from megaclone.config import ConfigError, RunConfig
from megaclone.data import shard_paths

Layer = tuple[str, dict[str, Any]]  # (where the values come from, a config-file-like mapping)

# What a checkpoint records and a run without --config inherits; paths to write to and the layout stay the run's own.
INHERITED = {"train": None, "data": ("data_prefix", "seq_len", "vocab_size"),
             "checkpoint": ("save_interval", "keep_last")}  # None: every key of the section
DEFAULTS = "package defaults"


def settings_record(cfg: RunConfig, data_prefix: Path) -> dict[str, dict[str, Any]]:
    """The settings a checkpoint records: INHERITED's keys, with the token shards the run read as an absolute prefix
    (a run on the bundled corpus read the shards it built under its run directory)."""
    values = cfg.to_dict()
    record = {section: {k: v for k, v in values[section].items() if keys is None or k in keys}
              for section, keys in INHERITED.items()}
    record["data"]["data_prefix"] = str(Path(data_prefix).resolve())
    return record


def inherited_layer(manifest: Manifest, path: Path, warnings: list[str]) -> Layer:
    """The source checkpoint's recorded settings as a layer; a checkpoint without them (an older megaclone, or one
    imported from Hugging Face) gives an empty layer and a warning, and shards that are gone are left out with one."""
    label = f"the source checkpoint {path}"
    if manifest.settings is None:
        warnings.append(f"{path / 'manifest.json'} records no training settings (an older megaclone wrote it, or it "
                        "was imported): train, data and checkpoint settings are the package defaults unless --config, "
                        "--set or flags give them")
        return label, {}
    values = {section: {k: v for k, v in copy.deepcopy(manifest.settings.get(section, {})).items()
                        if keys is None or k in keys} for section, keys in INHERITED.items()}
    prefix = values["data"].get("data_prefix")
    if prefix and not all(p.is_file() for split in ("train", "valid") for p in shard_paths(prefix, split)):
        warnings.append(f"the source run's token shards {prefix}_{{train,valid}}.* are gone: the bundled corpus is "
                        "tokenized again under this run's directory (--set data.data_prefix=... to read others)")
        del values["data"]["data_prefix"]
    return label, values


def merge_layers(layers: list[Layer]) -> dict[str, Any]:
    """One config-file-like mapping: sections merged key by key, later layers winning."""
    out: dict[str, Any] = {}
    for label, values in layers:
        for key, value in values.items():
            if isinstance(value, dict):
                node = out.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"{label}: '{key}' must be a mapping")
                node.update(value)
            elif value is None and isinstance(out.get(key), dict):  # an empty section in a YAML file
                continue
            else:
                out[key] = copy.deepcopy(value)
    return out


def setting_sources(layers: list[Layer]) -> dict[str, str]:
    """"section.key" (or "run_dir") -> the label of the last layer that sets it."""
    sources: dict[str, str] = {}
    for label, values in layers:
        for key, value in values.items():
            if isinstance(value, dict):
                sources.update({f"{key}.{k}": label for k in value})
            elif value is not None:
                sources[key] = label
    return sources


def describe_sources(sources: dict[str, str], cfg: RunConfig) -> list[str]:
    """Log lines naming, for every setting but the model's (its own lines say where it comes from), the layer it
    came from; a section that came whole from one layer is shown as `section.*`."""
    keys = [f"{f.name}.{k.name}" for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))
            and f.name != "model" for k in dataclasses.fields(getattr(cfg, f.name))] + ["run_dir"]
    by_label: dict[str, list[str]] = {}
    for key in keys:
        by_label.setdefault(sources.get(key, DEFAULTS), []).append(key)
    order = ("the source", "the HyperCloning", "the config file", "--set", "flags", DEFAULTS)  # lowest precedence first
    lines = []
    for label, names in sorted(by_label.items(), key=lambda item: [item[0].startswith(o) for o in order].index(True)):
        shown = []
        for name in names:
            section = name.split(".")[0]
            whole = [k for k in keys if k.split(".")[0] == section]
            if "." in name and all(k in names for k in whole) and len(whole) > 1:
                if f"{section}.*" not in shown:
                    shown.append(f"{section}.*")
            else:
                shown.append(name)
        lines.append(f"settings from {label}: {', '.join(shown)}")
    return lines
