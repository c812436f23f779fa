"""Run configuration: one dataclass per concern, composed by `RunConfig`.

YAML files load into these classes; unknown keys are rejected by name, derived values (padded
vocabulary, head size, FFN size) are computed once here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user's configuration mistake: names the key (and file) and the constraint."""


GATED_ACTIVATIONS = ("swiglu", "geglu")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # real vocabulary; 0 means "take it from the tokenizer"
    vocab_multiple: int = 128  # pad the embedding to a multiple of this (never derived from TP)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_query_groups: int | None = None  # None: MHA (= num_heads); 1: MQA
    head_size: int | None = None  # None: hidden_size // num_heads
    ffn_size: int | None = None  # None: 4 * hidden, or 8/3 * hidden rounded to 64 when gated
    # gelu (tanh approximation, GPT-2's gelu_new) | gelu_exact (erf) | relu | swiglu (silu(gate) * up)
    # | geglu (tanh-gelu(gate) * up, Gemma)
    activation: str = "gelu"
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    bias: bool = True
    tied_embeddings: bool = True
    dropout: float = 0.0  # residual / embedding dropout
    attention_dropout: float = 0.0
    init_std: float = 0.02
    # Options that imported models need (megaclone.hf); the defaults are the original architecture.
    qkv_bias: bool | None = None  # None: same as `bias`; True with bias=False: q/k/v biases only (Qwen2)
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm(x)), both branches read x (GPT-NeoX)
    rope_fraction: float = 1.0  # rotate the leading int(head_size * fraction) dims of each head (GPT-NeoX)
    rope_scaling: str = "none"  # none | linear | llama3: how long-context models stretch the frequencies
    rope_scaling_factor: float = 1.0  # linear and llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_seq_len: int = 8192  # llama3: the context length of the original pretraining
    # Options of OPT, OLMo (1 and 2) and Gemma (docs/hf.md); the defaults are again the original architecture.
    # pre: x + f(norm(x)) | post: norm(x + f(x)) (OPT-350m) | branch: x + norm(f(x)), the norm on the output (OLMo-2)
    norm_placement: str = "pre"
    final_norm: bool = True  # a norm before the LM head (OPT's post-norm models have none)
    norm_affine: bool = True  # False: norms without weight or bias (OLMo's LayerNorm)
    norm_unit_offset: bool = False  # the gain is 1 + weight, so weight 0 is the identity (Gemma's RMSNorm)
    qk_norm: bool = False  # norm q and k over all heads (the whole projection output) before rope (OLMo-2)
    scale_embeddings: bool = False  # token embeddings times sqrt(hidden_size) (Gemma)
    position_offset: int = 0  # learned positions: position p reads row p + offset (OPT: 2)
    embed_size: int | None = None  # token embedding width; None: hidden_size. Otherwise project_in and
    # project_out (no bias) map it to and from the hidden size (OPT's word_embed_proj_dim)

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_heads
        if self.head_size is None:
            if self.num_heads <= 0 or self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"model.hidden_size={self.hidden_size} must be divisible by "
                    f"model.num_heads={self.num_heads} when model.head_size is not set"
                )
            self.head_size = self.hidden_size // self.num_heads
        if self.ffn_size is None:
            if self.activation in GATED_ACTIVATIONS:
                self.ffn_size = 64 * math.ceil(8 * self.hidden_size / 3 / 64)
            else:
                self.ffn_size = 4 * self.hidden_size
        self.validate()

    def validate(self) -> None:
        choices = {"activation": ("gelu", "gelu_exact", "relu", *GATED_ACTIVATIONS), "norm": ("layernorm", "rmsnorm"),
                   "position": ("rope", "learned"), "rope_scaling": ("none", "linear", "llama3"),
                   "norm_placement": ("pre", "post", "branch")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: expected one of {allowed}")
        for key in ("hidden_size", "num_layers", "num_heads", "num_query_groups", "head_size",
                    "ffn_size", "max_seq_len", "vocab_multiple"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be a positive integer")
        if self.vocab_size < 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 0")
        if self.num_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must be divisible by "
                f"model.num_query_groups={self.num_query_groups}"
            )
        if self.position == "rope" and self.head_size % 2:
            raise ConfigError(f"model.head_size={self.head_size} must be even for rope")
        self._validate_rope()
        for key in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be in [0, 1)")
        self._validate_family_options()

    def _validate_family_options(self) -> None:
        if self.embed_size is not None and self.embed_size <= 0:
            raise ConfigError(f"model.embed_size={self.embed_size} must be a positive integer (or unset: hidden_size)")
        if self.parallel_residual and self.norm_placement != "pre":
            raise ConfigError(f"model.parallel_residual=True needs model.norm_placement='pre', got "
                              f"{self.norm_placement!r}")
        if self.norm_unit_offset and not self.norm_affine:
            raise ConfigError("model.norm_unit_offset=True needs model.norm_affine=True (a gain 1 + weight needs the "
                              "weight)")
        if self.position_offset < 0 or (self.position_offset and self.position != "learned"):
            raise ConfigError(f"model.position_offset={self.position_offset} must be >= 0, and non-zero only with "
                              f"model.position='learned' (got {self.position!r})")

    def _validate_rope(self) -> None:
        if self.position != "rope":
            if self.rope_fraction != 1.0 or self.rope_scaling != "none":
                raise ConfigError(f"model.rope_fraction={self.rope_fraction} and model.rope_scaling="
                                  f"{self.rope_scaling!r} need model.position='rope', got {self.position!r}")
            return
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"model.rope_fraction={self.rope_fraction} must be in (0, 1]")
        if self.rope_size < 2 or self.rope_size % 2:
            raise ConfigError(f"model.rope_fraction={self.rope_fraction} of model.head_size={self.head_size} gives "
                              f"{self.rope_size} rotary dims: need an even number >= 2")
        if self.rope_scaling != "none" and self.rope_scaling_factor <= 0:
            raise ConfigError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be > 0")
        if self.rope_scaling == "llama3":
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ConfigError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} and "
                                  f"model.rope_high_freq_factor={self.rope_high_freq_factor}: need 0 < low < high")
            if self.rope_original_max_seq_len <= 0:
                raise ConfigError(f"model.rope_original_max_seq_len={self.rope_original_max_seq_len} must be > 0")

    @property
    def rope_size(self) -> int:
        """Leading dims of each head that rotary embeddings rotate (the rest pass through)."""
        return int(self.head_size * self.rope_fraction)

    @property
    def gated(self) -> bool:
        """A gated MLP: act(gate) * up, with the fused gate/up weight."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def embedding_size(self) -> int:
        """Width of the token embedding (and of the tied or untied unembedding)."""
        return self.hidden_size if self.embed_size is None else self.embed_size

    @property
    def has_projections(self) -> bool:
        """project_in / project_out exist: the token embedding is narrower or wider than the hidden size."""
        return self.embedding_size != self.hidden_size

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_multiple * math.ceil(self.vocab_size / self.vocab_multiple)

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_query_groups


@dataclass
class ParallelConfig:
    tp_size: int = 1
    pp_size: int = 1
    zero_stage: int = 1
    # Node-local checkpoint disks instead of one shared filesystem (see docs/cluster.md).
    node_local_checkpoints: bool = False

    def validate(self, model: ModelConfig | None = None, world_size: int | None = None) -> None:
        for key in ("tp_size", "pp_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage}: expected 0, 1, 2 or 3")
        if self.pp_size > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} cannot be combined with "
                f"parallel.pp_size={self.pp_size}: DeepSpeed's pipeline engine supports ZeRO 0-1 only"
            )
        if world_size is not None and world_size % (self.tp_size * self.pp_size):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tp_size x parallel.pp_size "
                f"= {self.tp_size} x {self.pp_size}"
            )
        if model is None:
            return
        t = self.tp_size
        if model.num_query_groups % t:
            raise ConfigError(
                f"model.num_query_groups={model.num_query_groups} (num_heads={model.num_heads}) "
                f"must be divisible by parallel.tp_size={t}"
            )
        if model.ffn_size % t:
            raise ConfigError(f"model.ffn_size={model.ffn_size} must be divisible by parallel.tp_size={t}")
        if model.padded_vocab_size % t:
            raise ConfigError(
                f"padded vocabulary {model.padded_vocab_size} (model.vocab_multiple="
                f"{model.vocab_multiple}) must be divisible by parallel.tp_size={t}"
            )
        if model.num_layers < self.pp_size:
            raise ConfigError(
                f"model.num_layers={model.num_layers} must be >= parallel.pp_size={self.pp_size}"
            )


@dataclass
class TrainConfig:
    seed: int = 1234
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 10
    lr_decay_iters: int | None = None  # None: train_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16
    eval_interval: int = 50
    eval_iters: int = 4
    log_interval: int = 1

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision={self.precision!r}: expected 'fp32' or 'bf16'")
        for key in ("micro_batch_size", "grad_accum_steps", "log_interval", "eval_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 1")
        for key in ("train_iters", "warmup_iters", "eval_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be >= 0")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr={self.lr}, train.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")


@dataclass
class DataConfig:
    # Prefix of packed token shards written by tools/preprocess_data.py ("<prefix>_train.bin" ...).
    # Empty: build the bundled default corpus (sotu) under the run directory.
    data_prefix: str = ""
    tokenizer: str = ""  # sentencepiece model file; empty: trained on the default corpus
    seq_len: int = 128
    vocab_size: int = 2048  # for a tokenizer trained on the fly


@dataclass
class CheckpointConfig:
    save: str = ""  # directory; empty: no checkpoints
    save_interval: int = 0  # steps; 0: only at the end
    load: str = ""  # resume exactly from this directory
    keep_last: int = 0  # 0: keep all
    overwrite: bool = False  # save into a root of another model, or over a step directory that exists


# What `--hyperclone N` uses when neither the flags nor the config name a variant or a noise level: the best of
# bench/hyperclone_speedup.py (docs/results.md). The dataclass defaults below stay the plain noise-free symmetric
# clone, the reference the library and its tests build on.
HYPERCLONE_DEFAULTS = {"variant": "diagonal", "noise_db": 0.0}
NO_NOISE = "none"  # what --clone-noise-db takes to turn the default noise off
GROW_METHODS = ("zero", "stack", "interleave")  # --grow-method (megaclone.clone.depth)


def parse_factor(minimum: int) -> Callable[[str], int]:
    """An argparse type for a widening factor (--hyperclone N, --hyperclone-ffn M): an integer >= `minimum`."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def parse_noise_db(text: str) -> float | str:
    """--clone-noise-db: a number of dB, or NO_NOISE (kept apart from 'not given', which means the default)."""
    import argparse

    if text.strip().lower() == NO_NOISE:
        return NO_NOISE
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of dB or {NO_NOISE!r}, got {text!r}") from None

@dataclass
class CloneConfig:
    init_from: str = ""  # small checkpoint directory
    factor: int = 0  # n: hidden width and heads; 0: no widening (1: keep the width, e.g. FFN-only or depth growth)
    ffn_factor: int | None = None  # m: FFN width; None: n
    groups_factor: int | None = None  # g: query groups (KV heads), divides n; None: n
    grow_layers: int = 0  # target number of layers (> the source's); 0: keep the depth
    grow_method: str = "zero"  # zero (new identity blocks, lossless) | stack | interleave
    variant: str = "symmetric"  # symmetric | diagonal
    noise_db: float | None = None  # zero-sum noise at this SNR; None: no noise
    seed: int = 0
    optimizer: str = "fresh"  # fresh: new optimizer at step 0 (the paper's recipe) | carry: resume the small run's
    lr_transition: int | None = None  # carry: steps from the exact-continuation values to the run's; None: never
    schedule: str = "continue"  # carry: continue the run's schedule at the small run's step, or restart it there
    data: str | None = None  # continue: read on from the small run's data position | restart: from the start;
    # None: continue with carry (a continuation of training), restart with fresh (a new run, the paper's recipe)
    eval_at_start: bool = True  # evaluate the widened model on the held-out batches before the first step

    @property
    def continues_data(self) -> bool:
        return (self.data or ("continue" if self.optimizer == "carry" else "restart")) == "continue"

    @property
    def active(self) -> bool:
        """The run starts from a grown copy of `init_from` (wider, deeper or both)."""
        return bool(self.factor or self.grow_layers)

    def validate(self) -> None:
        if self.active and not self.init_from:
            raise ConfigError("clone.factor (--hyperclone) and clone.grow_layers (--grow-layers) need clone.init_from "
                              "(--init-from)")
        if self.grow_layers < 0:
            raise ConfigError(f"clone.grow_layers (--grow-layers) = {self.grow_layers}: expected the target number of "
                              "layers, or 0 to keep the depth")
        if not self.active:
            return
        if self.factor < 0 or (self.factor == 0 and not self.grow_layers):
            raise ConfigError(f"clone.factor (--hyperclone) = {self.factor}: expected an integer >= 1")
        n = self.factor or 1
        if self.ffn_factor is not None and self.ffn_factor < 1:
            raise ConfigError(f"clone.ffn_factor (--hyperclone-ffn) = {self.ffn_factor}: expected an integer >= 1")
        if self.groups_factor is not None and (self.groups_factor < 1 or n % self.groups_factor):
            raise ConfigError(f"clone.groups_factor (--hyperclone-groups) = {self.groups_factor}: expected a divisor "
                              f"of clone.factor (--hyperclone) = {n}")
        if n == 1 and (self.ffn_factor or 1) == 1 and not self.grow_layers:
            raise ConfigError("clone.factor (--hyperclone) = 1 keeps the width: give clone.ffn_factor "
                              "(--hyperclone-ffn M >= 2) or clone.grow_layers (--grow-layers N), or nothing grows")
        if self.grow_method not in GROW_METHODS:
            raise ConfigError(f"clone.grow_method (--grow-method) = {self.grow_method!r}: expected one of "
                              f"{GROW_METHODS}")
        if self.grow_method != "zero" and not self.grow_layers:
            raise ConfigError(f"clone.grow_method (--grow-method) = {self.grow_method!r} needs clone.grow_layers "
                              "(--grow-layers L): the depth is kept")
        if self.optimizer == "carry" and self.groups_factor not in (None, n):
            raise ConfigError(f"clone.optimizer (--hyperclone-optimizer) = 'carry' with clone.groups_factor "
                              f"(--hyperclone-groups) = {self.groups_factor} < {n}: the k and v rows of a query group "
                              f"then have {self.groups_factor} copies and its q rows {n}, so Adam's eps would need two "
                              "values inside one tensor; use the fresh optimizer")
        if self.variant not in ("symmetric", "diagonal"):
            raise ConfigError(f"clone.variant={self.variant!r}: expected 'symmetric' or 'diagonal'")
        if self.optimizer not in ("fresh", "carry"):
            raise ConfigError(f"clone.optimizer (--hyperclone-optimizer) = {self.optimizer!r}: expected 'fresh' or "
                              "'carry'")
        if self.lr_transition is not None and (self.optimizer != "carry" or self.lr_transition < 0):
            raise ConfigError(f"clone.lr_transition (--hyperclone-lr-transition) = {self.lr_transition}: needs "
                              f"clone.optimizer='carry' (got {self.optimizer!r}) and a number of steps >= 0")
        if self.schedule not in ("continue", "restart"):
            raise ConfigError(f"clone.schedule (--hyperclone-schedule) = {self.schedule!r}: expected 'continue' or "
                              "'restart'")
        if self.schedule == "restart" and (self.optimizer != "carry" or self.lr_transition is None):
            raise ConfigError("clone.schedule (--hyperclone-schedule) = 'restart' needs clone.optimizer='carry' and "
                              "clone.lr_transition (--hyperclone-lr-transition STEPS, 0: at once): the transition "
                              "moves the small run's last learning rate to the restarted schedule (a fresh optimizer "
                              "always starts its schedule at the widening)")
        if self.data not in (None, "continue", "restart"):
            raise ConfigError(f"clone.data (--hyperclone-data) = {self.data!r}: expected 'continue' or 'restart'")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    clone: CloneConfig = field(default_factory=CloneConfig)
    run_dir: str = "runs/default"

    def validate(self, world_size: int | None = None) -> None:
        self.model.validate()
        self.parallel.validate(self.model if self.model.vocab_size else None, world_size)
        self.train.validate()
        self.clone.validate()
        if self.parallel.pp_size > 1 and self.parallel.zero_stage == 0 and self.train.grad_clip > 0:
            # DeepSpeed's ZeRO-0 gradient norm leaves out later stages' replicated parameters (it counts
            # them only on model-parallel rank 0), so clipping would use a wrong norm; ZeRO-1 is exact.
            raise ConfigError(
                f"parallel.zero_stage=0 with parallel.pp_size={self.parallel.pp_size} and train.grad_clip="
                f"{self.train.grad_clip}: DeepSpeed computes a wrong gradient norm here; use zero_stage 1 "
                "or set train.grad_clip=0"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML value against a field's type; YAML 1.1 reads `3e-4` as a string, so floats may be text."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{where}={value!r}: expected {names}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def model_config_from_dict(values: dict[str, Any], where: str = "model") -> ModelConfig:
    return _build(ModelConfig, dict(values), where)


_SECTION_CLASSES = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig, "data": DataConfig,
                    "checkpoint": CheckpointConfig, "clone": CloneConfig}
_TOP_LEVEL_KEYS = sorted(_SECTION_CLASSES) + ["run_dir"]


def run_config_from_dict(values: dict[str, Any], where: str = "config") -> RunConfig:
    unknown = sorted(set(values) - set(_TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key(s) {unknown}; known: {_TOP_LEVEL_KEYS}")
    built = {}
    for name, cls in _SECTION_CLASSES.items():
        section = values.get(name) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: '{name}' must be a mapping, got {type(section).__name__}")
        built[name] = _build(cls, section, f"{where}: {name}")
    return RunConfig(**built, run_dir=_coerce(values.get("run_dir", "runs/default"), str, f"{where}: run_dir"))


def _yaml_error(where: str, e: yaml.YAMLError) -> ConfigError:
    """A YAML syntax error as `where:LINE:COLUMN: problem` (1-based, like an editor's)."""
    mark = getattr(e, "problem_mark", None)
    at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return ConfigError(f"{where}{at}: YAML syntax error: {problem}" + (f" ({context})" if context else ""))


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (empty file: {}); a syntax error names the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(str(path), e) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return values


def _parse_value(text: str, item: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(f"--set {item!r}", e) from None


def _check_override_key(item: str, parts: list[str]) -> None:
    """An unknown key in `--set` is the flag's mistake: name it (not the config file it would have gone into)."""
    if parts == ["run_dir"]:
        return
    if parts[0] not in _SECTION_CLASSES:
        raise ConfigError(f"--set {item}: unknown section {parts[0]!r}; known: {_TOP_LEVEL_KEYS}")
    known = sorted(f.name for f in dataclasses.fields(_SECTION_CLASSES[parts[0]]))
    if len(parts) != 2 or parts[1] not in known:
        raise ConfigError(f"--set {item}: unknown key {'.'.join(parts[1:])!r} in section '{parts[0]}'; known keys: "
                          f"{known}")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        _check_override_key(item, parts)
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(text, item)
    return values


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply `--set` overrides, build and validate the dataclasses."""
    values: dict[str, Any] = {}
    where = "config"
    if path:
        where = str(path)
        values = read_yaml_mapping(path)
    values = apply_overrides(values, overrides or [])
    try:
        return run_config_from_dict(values, where)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
