"""The parameter-spec table: one row per parameter, read by everything that touches weights.

Each row records the global name, the global shape, what every axis means, the tensor-parallel
split axis and the pipeline layer. The model, the checkpoint reader and writer, the cloner and
the resharder all derive their slicing from these rows; nobody pattern-matches names elsewhere.

Axis kinds:
  hidden  the model width d (never split by TP; widened by n)
  groups  query groups; a unit is one group's rows [q heads of the group, k, v] (qkv) or its
          query heads' columns (attn_out); split by TP, widened by n
  ffn     FFN units; a unit is 1 row (mlp_in, mlp_out) or 2 rows [gate, up] (mlp_gate_up); split by
          TP, widened by m
  embed   the token embedding width when it differs from the hidden size (OPT's word_embed_proj_dim);
          never split, widened by n like the hidden axis
  vocab   padded vocabulary; split by TP, never widened
  seq     positions of a learned position embedding; never split, never widened

The fused gate/up weight is stored unit-interleaved (row 2u is gate unit u, row 2u+1 is up unit u),
so every TP shard and every widened copy is one contiguous range of whole units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megaclone.config import ModelConfig

# The module path of every parameter slot: global names are "<path>.weight" / "<path>.bias", with
# "blocks.<i>." in front inside block i. Code outside this module spells names only through `param_name`.
SLOT_PATHS = {"embedding": "embedding.word", "pos_embedding": "embedding.position",
              "project_in": "embedding.project_in", "attn_norm": "attn_norm", "qkv": "attn.qkv",
              "q_norm": "attn.q_norm", "k_norm": "attn.k_norm", "attn_out": "attn.out", "mlp_norm": "mlp_norm",
              "mlp_in": "mlp.fc_in", "mlp_gate_up": "mlp.gate_up", "mlp_out": "mlp.fc_out", "final_norm": "final_norm",
              "project_out": "project_out", "lm_head": "lm_head"}
BLOCK_SLOTS = ("attn_norm", "qkv", "q_norm", "k_norm", "attn_out", "mlp_norm", "mlp_in", "mlp_gate_up", "mlp_out")


def param_name(slot: str, block: int | None = None, bias: bool = False) -> str:
    """Global name of the weight (or bias) of `slot`, in `block` for the per-block slots."""
    if slot not in SLOT_PATHS:
        raise ValueError(f"unknown parameter slot {slot!r}; known: {sorted(SLOT_PATHS)}")
    if (block is None) != (slot not in BLOCK_SLOTS):
        raise ValueError(f"slot {slot!r}: block={block} (a block index is needed exactly for {BLOCK_SLOTS})")
    prefix = "" if block is None else f"blocks.{block}."
    return f"{prefix}{SLOT_PATHS[slot]}.{'bias' if bias else 'weight'}"


def in_block(name: str, block: int) -> str:
    """The same parameter of another block: ("blocks.5.attn.qkv.weight", 2) -> "blocks.2.attn.qkv.weight"."""
    prefix, index, rest = (name.split(".", 2) + ["", ""])[:3]
    if prefix != "blocks" or not index.isdigit() or not rest:
        raise ValueError(f"{name!r} is not a parameter of a block (expected 'blocks.<i>.<slot path>.weight|bias')")
    return f"blocks.{block}.{rest}"


ROLES = ("embedding", "pos_embedding", "project_in", "qkv", "qk_norm", "attn_out", "mlp_in", "mlp_gate_up",
         "mlp_out", "norm", "final_norm", "project_out", "lm_head")
NORM_ROLES = ("norm", "qk_norm", "final_norm")
SPLIT_KINDS = ("groups", "ffn", "vocab")


@dataclass(frozen=True)
class Axis:
    kind: str  # hidden | embed | groups | ffn | vocab | seq
    num_units: int
    unit_size: int = 1

    @property
    def size(self) -> int:
        return self.num_units * self.unit_size


@dataclass(frozen=True)
class ParamSpec:
    name: str  # global name, independent of TP and PP
    role: str  # one of ROLES
    is_bias: bool
    axes: tuple[Axis, ...]
    layer: int  # pipeline layer (DeepSpeed's numbering): 0 embedding, 1..L blocks, L+1 final norm and project_out,
    # L+2 lm_head
    tp_axis: int | None  # the axis split across TP ranks, None when replicated

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tp_range(self, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """[start, stop) along `tp_axis` held by `tp_rank`: a contiguous range of whole units."""
        if self.tp_axis is None:
            return 0, self.shape[0] if self.shape else 0
        axis = self.axes[self.tp_axis]
        if axis.num_units % tp_size:
            raise ValueError(f"{self.name}: {axis.num_units} {axis.kind} units do not divide by tp_size={tp_size}")
        per = axis.num_units // tp_size
        return tp_rank * per * axis.unit_size, (tp_rank + 1) * per * axis.unit_size

    def tp_slices(self, tp_rank: int, tp_size: int) -> tuple[slice, ...]:
        """Index of the TP shard of `tp_rank` within the global tensor."""
        index = [slice(None)] * len(self.axes)
        if self.tp_axis is not None:
            index[self.tp_axis] = slice(*self.tp_range(tp_rank, tp_size))
        return tuple(index)

    def tp_shape(self, tp_size: int) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.tp_axis is not None:
            shape[self.tp_axis] //= tp_size
        return tuple(shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "is_bias": self.is_bias, "shape": list(self.shape),
                "axes": [[a.kind, a.num_units, a.unit_size] for a in self.axes],
                "layer": self.layer, "tp_axis": self.tp_axis}

    @staticmethod
    def from_dict(d: dict) -> ParamSpec:
        return ParamSpec(d["name"], d["role"], d["is_bias"], tuple(Axis(*a) for a in d["axes"]),
                         d["layer"], d["tp_axis"])


def normalize_index(shape: tuple[int, ...], index: tuple[slice, ...] | slice, name: str) -> list[tuple[int, int]]:
    """[start, stop) per dimension of a step-1 slice index into a tensor of `shape` (missing dims: whole axis)."""
    index = (index,) if isinstance(index, slice) else tuple(index)
    if len(index) > len(shape):
        raise ValueError(f"{name}: index {index} has more entries than the {len(shape)} dimensions of {list(shape)}")
    ranges = []
    for dim, size in enumerate(shape):
        sl = index[dim] if dim < len(index) else slice(None)
        if not isinstance(sl, slice):
            raise ValueError(f"{name}: index entry {sl!r} in dimension {dim} must be a slice")
        start, stop, step = sl.indices(size)
        if step != 1:
            raise ValueError(f"{name}: slice {sl} in dimension {dim} must have step 1 (step-1 slices only)")
        ranges.append((start, max(start, stop)))
    return ranges


def build_param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """All parameters of the model in a fixed order (pipeline layer, then module order)."""
    d, L = cfg.hidden_size, cfg.num_layers
    hidden = Axis("hidden", d)
    embed = Axis("embed", cfg.embedding_size) if cfg.has_projections else hidden
    vocab = Axis("vocab", cfg.padded_vocab_size)
    qkv_units = Axis("groups", cfg.num_query_groups, (cfg.heads_per_group + 2) * cfg.head_size)
    out_units = Axis("groups", cfg.num_query_groups, cfg.heads_per_group * cfg.head_size)
    gated = cfg.gated
    ffn_in = Axis("ffn", cfg.ffn_size, 2 if gated else 1)
    ffn_out = Axis("ffn", cfg.ffn_size)
    specs: list[ParamSpec] = []

    def add(name: str, role: str, axes: tuple[Axis, ...], layer: int, tp_axis: int | None,
            bias_axis: Axis | None = None, bias_tp: bool = False, has_bias: bool | None = None) -> None:
        specs.append(ParamSpec(name + ".weight", role, False, axes, layer, tp_axis))
        if bias_axis is not None and (cfg.bias if has_bias is None else has_bias):
            specs.append(ParamSpec(name + ".bias", role, True, (bias_axis,), layer, 0 if bias_tp else None))

    def add_norm(name: str, role: str, layer: int, axis: Axis = hidden) -> None:
        if not cfg.norm_affine:  # a norm without parameters has no rows
            return
        tp_axis = 0 if axis.kind in SPLIT_KINDS else None
        specs.append(ParamSpec(name + ".weight", role, False, (axis,), layer, tp_axis))
        if cfg.norm == "layernorm":
            specs.append(ParamSpec(name + ".bias", role, True, (axis,), layer, tp_axis))

    add("embedding.word", "embedding", (vocab, embed), 0, 0)
    if cfg.position == "learned":
        add("embedding.position", "pos_embedding", (Axis("seq", cfg.max_seq_len + cfg.position_offset), hidden), 0,
            None)
    if cfg.has_projections:
        add("embedding.project_in", "project_in", (hidden, embed), 0, None)
    for i in range(L):
        p, layer = f"blocks.{i}", i + 1
        add_norm(f"{p}.attn_norm", "norm", layer)
        add(f"{p}.attn.qkv", "qkv", (qkv_units, hidden), layer, 0, qkv_units, bias_tp=True,
            has_bias=cfg.has_qkv_bias)
        if cfg.qk_norm:  # over all q heads / all k heads; a unit is one group's q heads / its k head
            add_norm(f"{p}.attn.q_norm", "qk_norm", layer, Axis("groups", cfg.num_query_groups,
                                                                 cfg.heads_per_group * cfg.head_size))
            add_norm(f"{p}.attn.k_norm", "qk_norm", layer, Axis("groups", cfg.num_query_groups, cfg.head_size))
        add(f"{p}.attn.out", "attn_out", (hidden, out_units), layer, 1, hidden)
        add_norm(f"{p}.mlp_norm", "norm", layer)
        if gated:
            add(f"{p}.mlp.gate_up", "mlp_gate_up", (ffn_in, hidden), layer, 0, ffn_in, bias_tp=True)
        else:
            add(f"{p}.mlp.fc_in", "mlp_in", (ffn_in, hidden), layer, 0, ffn_in, bias_tp=True)
        add(f"{p}.mlp.fc_out", "mlp_out", (hidden, ffn_out), layer, 1, hidden)
    if cfg.final_norm:
        add_norm("final_norm", "final_norm", L + 1)
    if cfg.has_projections:
        add("project_out", "project_out", (embed, hidden), L + 1, None)
    if not cfg.tied_embeddings:
        add("lm_head", "lm_head", (vocab, embed), L + 2, 0)
    return specs


def num_params(cfg: ModelConfig) -> int:
    """Total parameter count, padded vocabulary included."""
    return sum(math.prod(s.shape) for s in build_param_specs(cfg))


def model_summary(cfg: ModelConfig) -> str:
    """One line that tells two models apart in a message."""
    return (f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, ffn {cfg.ffn_size}, "
            f"vocab {cfg.vocab_size}, {num_params(cfg) / 1e6:.2f}M parameters")


def num_pipeline_layers(cfg: ModelConfig) -> int:
    """Embedding, the blocks, the final norm (and project_out) and the LM head (the tied embedding when tied)."""
    return cfg.num_layers + 3


def stage_layer_range(cfg: ModelConfig, pp_size: int, stage: int) -> tuple[int, int]:
    """Pipeline layers [start, stop) of `stage`: blocks spread evenly, earlier stages take the rest.

    Matches DeepSpeed's `partition_method="type:TransformerBlock"` (checked when the pipeline is built).
    """
    L = cfg.num_layers
    counts = [L // pp_size + (1 if s < L % pp_size else 0) for s in range(pp_size)]
    start = 1 + sum(counts[:stage])
    stop = start + counts[stage]
    if stage == 0:
        start = 0
    if stage == pp_size - 1:
        stop = L + 3
    return start, stop


def stages_of(spec: ParamSpec, cfg: ModelConfig, pp_size: int) -> tuple[int, ...]:
    """The pipeline stages holding `spec`; a tied embedding lives on the first and the last stage."""
    stages = tuple(s for s in range(pp_size) if spec.layer in range(*stage_layer_range(cfg, pp_size, s)))
    if spec.role == "embedding" and cfg.tied_embeddings and pp_size > 1:
        stages = (0, pp_size - 1)
    return stages


def spec_table(cfg: ModelConfig) -> dict[str, ParamSpec]:
    return {s.name: s for s in build_param_specs(cfg)}
