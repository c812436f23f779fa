"""Command line of launch/pretrain.py and the run plan: every check that can fail, done before any work.

`build_plan` reads the config, applies flags and `--set` overrides, resolves the model (from the
config, the checkpoint being resumed, or the widened small checkpoint), the data files and the
tokenizer, and validates the layout against the world size. It starts no process group and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from megaclone.checkpoint import Manifest, read_manifest, resolve_checkpoint
from megaclone.checkpoint.io import check_output_dir, holds_no_checkpoint, stale_saves
from megaclone.config import (
    GROW_METHODS,
    HYPERCLONE_DEFAULTS,
    NO_NOISE,
    ConfigError,
    RunConfig,
    apply_overrides,
    parse_factor,
    parse_noise_db,
    read_yaml_mapping,
    run_config_from_dict,
)
from megaclone.train.carry import CarrySettings, carry_resume_settings, check_carry_plan
from megaclone.train.checkpointing import TRAINING_ONLY_KEYS, check_resume, check_save_root, model_mismatch
from megaclone.train.cloning import CloneSource, has_symmetry_breaking, plan_clone
from megaclone.train.dataset import DataPlan, plan_data, prepared_vocab_size
from megaclone.train.settings import Layer, inherited_layer, merge_layers, setting_sources

CLONE_MODEL_KEYS = TRAINING_ONLY_KEYS  # the model options a cloned run may still set


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain.py", description="Megatron-style TP/PP GPT pretraining on DeepSpeed, "
                                "optionally starting from a HyperCloned smaller checkpoint.")
    p.add_argument("--config", help="YAML run config (configs/*.yaml); optional with --init-from or --load")
    p.add_argument("--tp", type=int, help="tensor-parallel degree (parallel.tp_size)")
    p.add_argument("--pp", type=int, help="pipeline-parallel degree (parallel.pp_size)")
    p.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (parallel.zero_stage)")
    p.add_argument("--train-iters", type=int, help="optimizer steps in total (train.train_iters)")
    p.add_argument("--save", help="checkpoint root directory (checkpoint.save)")
    p.add_argument("--load", help="resume exactly from this checkpoint root or step directory (checkpoint.load)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --save write into a root that holds another model, or over a step directory that exists "
                        "(checkpoint.overwrite)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--run-dir", help="logs, metrics.jsonl and the default corpus go here (run_dir)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set train.lr=3e-4 model.dropout=0.1")
    g = p.add_argument_group("HyperCloning")
    g.add_argument("--init-from", help="small checkpoint to widen (any layout)")
    g.add_argument("--hyperclone", type=parse_factor(1), metavar="N",
                   help="widen hidden size, heads and groups N times (1: keep the width)")
    g.add_argument("--hyperclone-ffn", type=parse_factor(1), metavar="M", help="widen the FFN M times (default N)")
    g.add_argument("--hyperclone-groups", type=parse_factor(1), metavar="G",
                   help="widen the query groups (KV heads) G times, G dividing N (default N; 1 keeps an MQA/GQA "
                        "model's KV heads and puts N times the heads in each group)")
    g.add_argument("--grow-layers", type=parse_factor(1), metavar="L", help="grow the depth to L layers (more than the "
                   "small checkpoint's)")
    g.add_argument("--grow-method", choices=GROW_METHODS,
                   help="zero (default): new identity blocks (copies of the block before, residual-branch output "
                        "projections zero), lossless; stack: the blocks repeated [1..L, 1..L]; interleave: each "
                        "block repeated in place. Stack and interleave change the function: the loss change is logged")
    g.add_argument("--clone-variant", choices=("symmetric", "diagonal"),
                   help=f"weight layout of the copies (default {HYPERCLONE_DEFAULTS['variant']})")
    g.add_argument("--clone-noise-db", type=parse_noise_db, metavar="DB|none",
                   help=f"zero-sum symmetry-breaking noise at this SNR, or none (default "
                        f"{HYPERCLONE_DEFAULTS['noise_db']:g} dB with the {HYPERCLONE_DEFAULTS['variant']} variant: "
                        "the best measured, docs/results.md)")
    g.add_argument("--clone-seed", type=int, help="seed of the clone noise")
    g.add_argument("--hyperclone-optimizer", choices=("fresh", "carry"),
                   help="fresh: a new optimizer from step 0 (default); carry: the small run's Adam moments, step and "
                        "LR schedule, with per-group lr, eps and weight decay that continue its trajectory exactly")
    g.add_argument("--hyperclone-lr-transition", type=parse_factor(0), metavar="STEPS",
                   help="carry: move each group to the run's own lr, eps and weight decay over STEPS steps "
                        "(0: at once; default: never)")
    g.add_argument("--hyperclone-schedule", choices=("continue", "restart"),
                   help="carry: continue the run's warmup + cosine at the small run's step (default), or restart it "
                        "at the widening (its warmup and train_iters then count from there), reached from the small "
                        "run's last lr over the --hyperclone-lr-transition steps")
    g.add_argument("--hyperclone-data", choices=("continue", "restart"),
                   help="continue: read on from the small run's data position (default with carry); restart: read "
                        "the corpus from its start (default with fresh)")
    g.add_argument("--clone-eval-at-start", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the widened model on the held-out batches before the first step (default: yes; "
                        "the preservation check runs either way)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_arg_parser().parse_args(argv)


@dataclass
class RunPlan:
    cfg: RunConfig
    world_size: int
    data: DataPlan
    clone: CloneSource | None = None
    resume: Manifest | None = None  # the checkpoint given by --load
    resume_path: Path | None = None
    warnings: list[str] = field(default_factory=list)
    carry: CarrySettings | None = None  # --load of a carry run's checkpoint: its optimizer groups and schedule
    sources: dict[str, str] = field(default_factory=dict)  # "section.key" -> where its value came from
    start_step: int = 0  # the step training continues after


def _read_config_values(path: str | None) -> dict:
    if not path:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config: config file {path} does not exist")
    return read_yaml_mapping(path)


def _flag_values(args: argparse.Namespace) -> dict[str, dict]:
    flags = {("parallel", "tp_size"): args.tp, ("parallel", "pp_size"): args.pp,
             ("parallel", "zero_stage"): args.zero_stage, ("train", "train_iters"): args.train_iters,
             ("train", "seed"): args.seed, ("checkpoint", "save"): args.save, ("checkpoint", "load"): args.load,
             ("clone", "init_from"): args.init_from, ("clone", "factor"): args.hyperclone,
             ("clone", "ffn_factor"): args.hyperclone_ffn, ("clone", "groups_factor"): args.hyperclone_groups,
             ("clone", "grow_layers"): args.grow_layers, ("clone", "grow_method"): args.grow_method,
             ("clone", "variant"): args.clone_variant,
             ("clone", "noise_db"): args.clone_noise_db, ("clone", "seed"): args.clone_seed,
             ("clone", "optimizer"): args.hyperclone_optimizer,
             ("clone", "lr_transition"): args.hyperclone_lr_transition, ("clone", "data"): args.hyperclone_data,
             ("clone", "schedule"): args.hyperclone_schedule, ("clone", "eval_at_start"): args.clone_eval_at_start}
    out: dict[str, dict] = {}
    for (section, key), value in flags.items():
        if value is not None:
            out.setdefault(section, {})[key] = None if (key, value) == ("noise_db", NO_NOISE) else value
    if args.overwrite:
        out.setdefault("checkpoint", {})["overwrite"] = True
    return out


def _source_checkpoint(given: dict) -> Path | None:
    """The step directory a run starts from (--init-from or --load), None for a fresh run (or both: refused later)."""
    clone, ckpt = given.get("clone") or {}, given.get("checkpoint") or {}
    if bool(clone.get("init_from")) == bool(ckpt.get("load")):
        return None
    path = clone.get("init_from") or ckpt.get("load")
    if not clone.get("init_from") and holds_no_checkpoint(path):  # --load of a root not written yet: see below
        return None
    return resolve_checkpoint(path)


def _layers(args: argparse.Namespace, warnings: list[str]) -> list[Layer]:
    """The run's values, lowest precedence first: the source checkpoint's recorded settings (without --config), the
    HyperCloning defaults (with --hyperclone), the config file, `--set`, the flags (megaclone.train.settings)."""
    flags = _flag_values(args)
    if args.run_dir is not None:
        flags["run_dir"] = args.run_dir
    layers = [(f"the config file {args.config}", _read_config_values(args.config)),
              ("--set", apply_overrides({}, list(args.set))), ("flags", flags)]
    given = merge_layers(layers)
    clone = given.get("clone") or {}
    if clone.get("factor") or clone.get("grow_layers"):  # grown: the measured best, where nothing else sets them
        layers.insert(0, ("the HyperCloning defaults", {"clone": dict(HYPERCLONE_DEFAULTS)}))
    source = None if args.config else _source_checkpoint(given)
    if source is not None:
        layers.insert(0, inherited_layer(read_manifest(source), source, warnings))
    return layers


def _plan_clone(args: argparse.Namespace, cfg: RunConfig, model_values: dict, world_size: int,
                warnings: list[str]) -> CloneSource:
    """The wide model replaces the config's: widen the small checkpoint's model config (dropout may be set)."""
    if cfg.checkpoint.load:
        raise ConfigError("--load and --init-from exclude each other: resume a cloned run with --load alone")
    clone = plan_clone(cfg.clone, cfg.parallel, world_size)
    set_keys = {s.split("=", 1)[0].split(".", 1)[1] for s in args.set if s.startswith("model.")}
    refused = sorted(set_keys - set(CLONE_MODEL_KEYS))
    if refused:
        raise ConfigError(f"--set model.{refused[0]}: cannot be set for a cloned run (the wide model is derived "
                          f"from {clone.path}); only {list(CLONE_MODEL_KEYS)} can")
    if set(model_values) - set(CLONE_MODEL_KEYS):
        warnings.append(f"{args.config}: model section ignored (except {list(CLONE_MODEL_KEYS)}): the model is "
                        f"the {clone.describe()} growth of {clone.path}")
    cfg.model = dataclasses.replace(clone.wide, **{k: v for k, v in model_values.items() if k in CLONE_MODEL_KEYS})
    if cfg.train.train_iters == 0 and not cfg.checkpoint.save:
        raise ConfigError("--train-iters 0 writes the widened checkpoint and exits: give --save DIR")
    if cfg.clone.optimizer == "carry":
        check_carry_plan(cfg, clone.manifest, clone.path)
    widened = clone.factors != (1, 1)  # depth growth alone makes no copies that could stay identical
    if widened and not has_symmetry_breaking(cfg.model, cfg.clone) and cfg.train.train_iters > 0:
        warnings.append("cloned run without symmetry breaking (--clone-noise-db none, no dropout): the copies "
                        "stay identical and the wide model trains like the small one")
    return clone


def _check_output_paths(cfg: RunConfig) -> None:
    """Where the run writes must be directories it can create or write: known now, not at the first save."""
    for what, path in (("--save (checkpoint.save)", cfg.checkpoint.save), ("--run-dir (run_dir)", cfg.run_dir)):
        if path:
            check_output_dir(path, what)


def _plan_auto_resume(cfg: RunConfig, has_config: bool, warnings: list[str]) -> None:
    """`--load ROOT` where nothing was committed yet (a requeued job that died before its first save) starts from
    scratch with a warning, as Megatron-LM does, so that a restart can repeat the first command line. A missing
    ROOT counts only when it is also --save: any other missing --load is a mistake."""
    root = Path(cfg.checkpoint.load)
    same_as_save = bool(cfg.checkpoint.save) and Path(cfg.checkpoint.save).absolute() == root.absolute()
    if not holds_no_checkpoint(root) or not (root.exists() or same_as_save):
        return
    if not has_config:
        raise ConfigError(f"--load {root} holds no complete checkpoint yet, so the model must come from --config")
    stale = stale_saves(root)
    left = f" (only interrupted saves: {', '.join(p.name for p in stale)})" if stale else ""
    warnings.append(f"--load {root}: no complete checkpoint there yet{left}: starting from scratch")
    cfg.checkpoint.load = None


def _report_stale_saves(cfg: RunConfig, warnings: list[str]) -> None:
    for path in stale_saves(cfg.checkpoint.save) if cfg.checkpoint.save else []:
        warnings.append(f"{path}: a save interrupted before its commit; it is removed at this run's first save")


def _plan_resume(args: argparse.Namespace, cfg: RunConfig, model_values: dict,
                 file_has_model: bool) -> tuple[Path, Manifest]:
    """The checkpoint to resume; without a model section in --config its model is the run's."""
    path = resolve_checkpoint(cfg.checkpoint.load)
    manifest = read_manifest(path)
    if not file_has_model:  # the checkpoint's model, with any --set model.* on top
        cfg.model = dataclasses.replace(manifest.model, **model_values)
    elif cfg.model.vocab_size == 0:  # compare the rest now; the vocabulary is the checkpoint's tokenizer's
        cfg.model = dataclasses.replace(cfg.model, vocab_size=manifest.model.vocab_size)
    diffs = model_mismatch(manifest.model, cfg.model)
    if diffs:
        raise ConfigError(f"--load {path}: the checkpoint holds a different model than "
                          f"{args.config or 'this run'}: " + "; ".join(diffs))
    return path, manifest


def _plan_data(cfg: RunConfig, data_values: dict, tokenizer: Path | None, from_checkpoint: bool,
               warnings: list[str]) -> DataPlan:
    """Shards and tokenizer; fixes the vocabulary (from the tokenizer when model.vocab_size is 0)."""
    if from_checkpoint and "seq_len" not in data_values and cfg.data.seq_len > cfg.model.max_seq_len:
        cfg.data.seq_len = cfg.model.max_seq_len  # the default would not fit the checkpoint's model
    if tokenizer is not None and cfg.data.tokenizer:
        warnings.append(f"data.tokenizer={cfg.data.tokenizer} ignored: using the checkpoint's {tokenizer}")
    if cfg.model.vocab_size and "vocab_size" not in data_values:
        cfg.data.vocab_size = cfg.model.vocab_size  # a tokenizer trained on the fly fits the given model
    data = plan_data(cfg, tokenizer)
    vocab = prepared_vocab_size(cfg, data)
    if cfg.model.vocab_size == 0:
        cfg.model = dataclasses.replace(cfg.model, vocab_size=vocab)
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"{vocab} ({data.tokenizer_path})")
    return data


def build_plan(args: argparse.Namespace, world_size: int) -> RunPlan:
    """Resolve and validate the whole run; raises ValueError / FileNotFoundError naming the key or file."""
    file_has_model = bool(_read_config_values(args.config).get("model"))
    warnings: list[str] = []
    layers = _layers(args, warnings)
    values = merge_layers(layers)
    clone_values = values.get("clone") or {}
    cloning = bool(clone_values.get("factor") or clone_values.get("grow_layers") or clone_values.get("init_from"))
    model_values = dict(values.pop("model", None) or {}) if cloning else dict(values.get("model") or {})
    cfg = run_config_from_dict(values, args.config or "config")
    cfg.clone.validate()
    if cfg.clone.init_from and not cfg.clone.active:
        raise ConfigError("--init-from needs --hyperclone N (the factor to widen the small checkpoint by) and/or "
                          "--grow-layers L (the depth to grow it to)")
    _check_output_paths(cfg)
    _report_stale_saves(cfg, warnings)
    if cfg.checkpoint.load:
        _plan_auto_resume(cfg, bool(args.config), warnings)
    clone = _plan_clone(args, cfg, model_values, world_size, warnings) if cloning else None
    resume_path, resume = _plan_resume(args, cfg, model_values, file_has_model) if cfg.checkpoint.load \
        else (None, None)
    tokenizer = clone.tokenizer if clone is not None else None
    if resume is not None and resume.tokenizer:
        tokenizer = resume_path / resume.tokenizer
    data = _plan_data(cfg, values.get("data") or {}, tokenizer, clone is not None or resume is not None, warnings)
    cfg.validate(world_size)
    carry = None
    if resume is not None:
        check_resume(resume, resume_path, cfg, world_size)
        carry = carry_resume_settings(resume, resume_path, cfg)
    start = _start_step(cfg, clone, resume)
    check_save_root(cfg, start)
    return RunPlan(cfg, world_size, data, clone, resume, resume_path, warnings, carry, setting_sources(layers), start)


def _start_step(cfg: RunConfig, clone: CloneSource | None, resume: Manifest | None) -> int:
    """The step training continues after: the small run's with a carried optimizer, the checkpoint's on a resume
    with optimizer state (exact or layout-free), else 0."""
    if clone is not None:
        return clone.manifest.step if cfg.clone.optimizer == "carry" else 0
    if resume is not None and (resume.deepspeed is not None or resume.optimizer is not None):
        return resume.step
    return 0
