"""Where every megaclone parameter lives in a Hugging Face checkpoint, both ways, one tensor at a time.

A `Transform` per megaclone global name says which blocks of which HF tensors make it up:

    Rows         one HF tensor (transposed for GPT-2's Conv1D), the vocabulary zero-padded
    GroupedQKV   megaclone's qkv rows are grouped per query group [q heads of the group, k, v]; Llama's
                 q_proj/k_proj/v_proj are separate, GPT-2's c_attn stacks q|k|v; GPT-NeoX's
                 query_key_value is already [q, k, v] per head (= per group with MHA) and is a plain Rows
    Interleaved  megaclone's SwiGLU gate_up is unit-interleaved (row 2u gate u, row 2u+1 up u); HF has
                 gate_proj and up_proj

Import reads only the HF rows a target TP shard needs (`Transform.read`), so a checkpoint is written
slice by slice without ever loading the HF model; export splits a full megaclone tensor back into HF
blocks (`Transform.split`). Megaclone names come from `megaclone.spec.param_name` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from megaclone.config import ModelConfig
from megaclone.spec import param_name

Range = tuple[int, int]
# Buffers that old checkpoints saved beside the weights; they hold no learned values.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
                    ".rotary_emb.inv_freq")


class SliceSource(Protocol):
    def slice(self, name: str):  # a safetensors slice: supports [a:b, c:d] and get_shape()
        ...


@dataclass(frozen=True)
class Part:
    """Output rows [start, start + size) of HF tensor `name` seen as [out, in] (or [out] for a bias).

    `shape` is the tensor as stored; GPT-2's Conv1D stores weights [in, out] (`transposed`).
    """

    name: str
    shape: tuple[int, ...]
    start: int = 0
    size: int | None = None  # None: the whole output axis
    transposed: bool = False

    @property
    def rows(self) -> int:
        if self.size is not None:
            return self.size
        return self.shape[1] if self.transposed else self.shape[0]

    def read(self, source: SliceSource, rows: Range, cols: Range | None) -> torch.Tensor:
        """Rows `rows` (block-relative) and input columns `cols` of the block, as fp32 [out, in]."""
        r = slice(self.start + rows[0], self.start + rows[1])
        sl = source.slice(self.name)
        if cols is None:
            t = sl[r]
        elif self.transposed:
            t = sl[cols[0]:cols[1], r].T
        else:
            t = sl[r, cols[0]:cols[1]]
        return t.to(torch.float32).contiguous()


def _split_ranges(ranges: list[Range]) -> tuple[Range, Range | None]:
    return ranges[0], (ranges[1] if len(ranges) > 1 else None)


@dataclass(frozen=True)
class Rows:
    """One HF block; rows past its end (the vocabulary padding) are zeros."""

    part: Part
    padded_rows: int | None = None

    @property
    def parts(self) -> tuple[Part, ...]:
        return (self.part,)

    def read(self, source: SliceSource, ranges: list[Range]) -> torch.Tensor:
        (a, b), cols = _split_ranges(ranges)
        real = min(max(a, b), self.part.rows)
        t = self.part.read(source, (min(a, real), real), cols)
        if b > real:  # padded vocabulary rows never count: zeros
            t = torch.cat([t, t.new_zeros((b - max(a, real), *t.shape[1:]))])
        return t

    def split(self, tensor: torch.Tensor) -> list[tuple[Part, torch.Tensor]]:
        return [(self.part, tensor[: self.part.rows])]


@dataclass(frozen=True)
class GroupedQKV:
    """megaclone rows per query group [q heads of the group, k, v] from separate q, k, v blocks."""

    q: Part
    k: Part
    v: Part
    groups: int
    heads_per_group: int
    head_size: int

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.q, self.k, self.v

    def read(self, source: SliceSource, ranges: list[Range]) -> torch.Tensor:
        (a, b), cols = _split_ranges(ranges)
        hpg, hd = self.heads_per_group, self.head_size
        unit = (hpg + 2) * hd
        g0, g1 = a // unit, -(-b // unit)  # whole groups covering the rows
        n = g1 - g0
        q = self.q.read(source, (g0 * hpg * hd, g1 * hpg * hd), cols)
        k = self.k.read(source, (g0 * hd, g1 * hd), cols)
        v = self.v.read(source, (g0 * hd, g1 * hd), cols)
        rest = q.shape[1:]
        grouped = torch.cat([q.view(n, hpg * hd, *rest), k.view(n, hd, *rest), v.view(n, hd, *rest)], dim=1)
        return grouped.view(n * unit, *rest)[a - g0 * unit: b - g0 * unit]  # [rows, in]

    def split(self, tensor: torch.Tensor) -> list[tuple[Part, torch.Tensor]]:
        hpg, hd, g = self.heads_per_group, self.head_size, self.groups
        rest = tensor.shape[1:]
        t = tensor.view(g, hpg + 2, hd, *rest)  # [groups, q heads + k + v, head, in]
        return [(self.q, t[:, :hpg].reshape(g * hpg * hd, *rest)), (self.k, t[:, hpg].reshape(g * hd, *rest)),
                (self.v, t[:, hpg + 1].reshape(g * hd, *rest))]


@dataclass(frozen=True)
class Interleaved:
    """megaclone's unit-interleaved SwiGLU rows [gate_u, up_u] from separate gate and up blocks."""

    gate: Part
    up: Part

    @property
    def parts(self) -> tuple[Part, ...]:
        return self.gate, self.up

    def read(self, source: SliceSource, ranges: list[Range]) -> torch.Tensor:
        (a, b), cols = _split_ranges(ranges)
        u0, u1 = a // 2, -(-b // 2)
        pair = torch.stack([self.gate.read(source, (u0, u1), cols), self.up.read(source, (u0, u1), cols)], dim=1)
        return pair.view(2 * (u1 - u0), *pair.shape[2:])[a - 2 * u0: b - 2 * u0]  # [rows, in]

    def split(self, tensor: torch.Tensor) -> list[tuple[Part, torch.Tensor]]:
        t = tensor.view(tensor.shape[0] // 2, 2, *tensor.shape[1:])  # [ffn units, gate/up, in]
        return [(self.gate, t[:, 0]), (self.up, t[:, 1])]


Transform = Rows | GroupedQKV | Interleaved


# Where the Llama-like families keep the two block norms (attn_norm, mlp_norm). OLMo-2 norms each branch's output.
_BLOCK_NORMS = {"olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")}


def _llama_map(cfg: ModelConfig, family: str) -> dict[str, Transform]:
    """Llama, Mistral, Qwen2, OLMo (norms without parameters), OLMo-2 (+ QK-norm) and Gemma."""
    d, V, hd, H, G, F = (cfg.hidden_size, cfg.vocab_size, cfg.head_size, cfg.num_heads, cfg.num_query_groups,
                         cfg.ffn_size)
    attn_norm, mlp_norm = _BLOCK_NORMS.get(family, ("input_layernorm", "post_attention_layernorm"))
    m: dict[str, Transform] = {param_name("embedding"): Rows(Part("model.embed_tokens.weight", (V, d)),
                                                              cfg.padded_vocab_size)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        if cfg.norm_affine:
            m[param_name("attn_norm", i)] = Rows(Part(f"{p}{attn_norm}.weight", (d,)))
            m[param_name("mlp_norm", i)] = Rows(Part(f"{p}{mlp_norm}.weight", (d,)))
        for bias in ((False, True) if cfg.has_qkv_bias else (False,)):
            kind, tail = ("bias", ()) if bias else ("weight", (d,))
            q, k, v = (Part(f"{p}self_attn.{x}_proj.{kind}", (rows * hd, *tail)) for x, rows in zip("qkv", (H, G, G)))
            m[param_name("qkv", i, bias)] = GroupedQKV(q, k, v, G, cfg.heads_per_group, hd)
        if cfg.qk_norm:  # over all heads, in head order: megaclone's order of the q heads and the k heads too
            m[param_name("q_norm", i)] = Rows(Part(p + "self_attn.q_norm.weight", (H * hd,)))
            m[param_name("k_norm", i)] = Rows(Part(p + "self_attn.k_norm.weight", (G * hd,)))
        m[param_name("attn_out", i)] = Rows(Part(p + "self_attn.o_proj.weight", (d, H * hd)))
        m[param_name("mlp_gate_up", i)] = Interleaved(Part(p + "mlp.gate_proj.weight", (F, d)),
                                                      Part(p + "mlp.up_proj.weight", (F, d)))
        m[param_name("mlp_out", i)] = Rows(Part(p + "mlp.down_proj.weight", (d, F)))
        if cfg.bias:
            m[param_name("attn_out", i, True)] = Rows(Part(p + "self_attn.o_proj.bias", (d,)))
            m[param_name("mlp_gate_up", i, True)] = Interleaved(Part(p + "mlp.gate_proj.bias", (F,)),
                                                                Part(p + "mlp.up_proj.bias", (F,)))
            m[param_name("mlp_out", i, True)] = Rows(Part(p + "mlp.down_proj.bias", (d,)))
    if cfg.norm_affine:
        m[param_name("final_norm")] = Rows(Part("model.norm.weight", (d,)))
    if not cfg.tied_embeddings:
        m[param_name("lm_head")] = Rows(Part("lm_head.weight", (V, d)), cfg.padded_vocab_size)
    return m


def _norm(m: dict[str, Transform], slot: str, block: int | None, prefix: str, d: int) -> None:
    """A LayerNorm's weight and bias."""
    m[param_name(slot, block)] = Rows(Part(prefix + ".weight", (d,)))
    m[param_name(slot, block, True)] = Rows(Part(prefix + ".bias", (d,)))


def _neox_map(cfg: ModelConfig) -> dict[str, Transform]:
    d, V, F = cfg.hidden_size, cfg.vocab_size, cfg.ffn_size
    m: dict[str, Transform] = {param_name("embedding"): Rows(Part("gpt_neox.embed_in.weight", (V, d)),
                                                              cfg.padded_vocab_size)}
    for i in range(cfg.num_layers):
        p = f"gpt_neox.layers.{i}."
        _norm(m, "attn_norm", i, p + "input_layernorm", d)
        # query_key_value rows are [q, k, v] per head: megaclone's per-group layout when groups = heads
        for slot, name, shape in (("qkv", "attention.query_key_value", (3 * d, d)),
                                  ("attn_out", "attention.dense", (d, d)), ("mlp_in", "mlp.dense_h_to_4h", (F, d)),
                                  ("mlp_out", "mlp.dense_4h_to_h", (d, F))):
            m[param_name(slot, i)] = Rows(Part(f"{p}{name}.weight", shape))
            m[param_name(slot, i, True)] = Rows(Part(f"{p}{name}.bias", shape[:1]))
        _norm(m, "mlp_norm", i, p + "post_attention_layernorm", d)
    _norm(m, "final_norm", None, "gpt_neox.final_layer_norm", d)
    if not cfg.tied_embeddings:
        m[param_name("lm_head")] = Rows(Part("embed_out.weight", (V, d)), cfg.padded_vocab_size)
    return m


def _gpt2_map(cfg: ModelConfig, prefix: str) -> dict[str, Transform]:
    d, V, F, hd = cfg.hidden_size, cfg.vocab_size, cfg.ffn_size, cfg.head_size
    m: dict[str, Transform] = {
        param_name("embedding"): Rows(Part(prefix + "wte.weight", (V, d)), cfg.padded_vocab_size),
        param_name("pos_embedding"): Rows(Part(prefix + "wpe.weight", (cfg.max_seq_len, d)))}
    for i in range(cfg.num_layers):
        p = f"{prefix}h.{i}."
        _norm(m, "attn_norm", i, p + "ln_1", d)
        w, b = (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,))
        m[param_name("qkv", i)] = GroupedQKV(*(Part(*w, j * d, d, True) for j in range(3)), cfg.num_heads, 1, hd)
        m[param_name("qkv", i, True)] = GroupedQKV(*(Part(*b, j * d, d) for j in range(3)), cfg.num_heads, 1, hd)
        for slot, name, shape in (("attn_out", "attn.c_proj", (d, d)), ("mlp_in", "mlp.c_fc", (d, F)),
                                  ("mlp_out", "mlp.c_proj", (F, d))):
            m[param_name(slot, i)] = Rows(Part(f"{p}{name}.weight", shape, transposed=True))  # Conv1D: [in, out]
            m[param_name(slot, i, True)] = Rows(Part(f"{p}{name}.bias", shape[1:]))
        _norm(m, "mlp_norm", i, p + "ln_2", d)
    _norm(m, "final_norm", None, prefix + "ln_f", d)
    if not cfg.tied_embeddings:
        m[param_name("lm_head")] = Rows(Part("lm_head.weight", (V, d)), cfg.padded_vocab_size)
    return m


def _opt_map(cfg: ModelConfig, prefix: str) -> dict[str, Transform]:
    """OPT: learned positions with 2 extra rows in front, project_in / project_out when word_embed_proj_dim differs
    from the hidden size, no final norm in post-norm models."""
    d, V, F, e, hd = cfg.hidden_size, cfg.vocab_size, cfg.ffn_size, cfg.embedding_size, cfg.head_size
    m: dict[str, Transform] = {
        param_name("embedding"): Rows(Part(prefix + "embed_tokens.weight", (V, e)), cfg.padded_vocab_size),
        param_name("pos_embedding"): Rows(Part(prefix + "embed_positions.weight",
                                               (cfg.max_seq_len + cfg.position_offset, d)))}
    if cfg.has_projections:
        m[param_name("project_in")] = Rows(Part(prefix + "project_in.weight", (d, e)))
        m[param_name("project_out")] = Rows(Part(prefix + "project_out.weight", (e, d)))
    for i in range(cfg.num_layers):
        p = f"{prefix}layers.{i}."
        if cfg.norm_affine:
            _norm(m, "attn_norm", i, p + "self_attn_layer_norm", d)
            _norm(m, "mlp_norm", i, p + "final_layer_norm", d)
        for bias in ((False, True) if cfg.bias else (False,)):
            kind, tail = ("bias", ()) if bias else ("weight", (d,))
            q, k, v = (Part(f"{p}self_attn.{x}_proj.{kind}", (d, *tail)) for x in "qkv")
            m[param_name("qkv", i, bias)] = GroupedQKV(q, k, v, cfg.num_heads, 1, hd)
            for slot, name, shape in (("attn_out", "self_attn.out_proj", (d, d)), ("mlp_in", "fc1", (F, d)),
                                      ("mlp_out", "fc2", (d, F))):
                m[param_name(slot, i, bias)] = Rows(Part(f"{p}{name}.{kind}", shape[:1] if bias else shape))
    if cfg.final_norm and cfg.norm_affine:
        _norm(m, "final_norm", None, prefix + "final_layer_norm", d)
    if not cfg.tied_embeddings:
        m[param_name("lm_head")] = Rows(Part("lm_head.weight", (V, e)), cfg.padded_vocab_size)
    return m


# The prefix of each family's tensor names (the first), and the one of checkpoints saved from the base model
# (GPT-2's and OPT's original checkpoints).
PREFIXES = {"gpt2": ("transformer.", ""), "opt": ("model.decoder.", "decoder.")}


def find_prefix(family: str, names: set[str] | dict[str, str]) -> str | None:
    """The tensor-name prefix a checkpoint of `family` uses (None: the family has only one spelling)."""
    if family not in PREFIXES:
        return None
    full, bare = PREFIXES[family]
    return full if any(name.startswith(full) for name in names) else bare


def tensor_map(family: str, cfg: ModelConfig, prefix: str | None = None) -> dict[str, Transform]:
    """megaclone global name -> the HF blocks it is made of, for every parameter of `cfg`.

    GPT-2 and OPT checkpoints name their tensors with or without `transformer.` / `model.` in front (`prefix`,
    default: with it; see `find_prefix`).
    """
    if family in PREFIXES and prefix is None:
        prefix = PREFIXES[family][0]
    if family == "gpt_neox":
        return _neox_map(cfg)
    if family == "gpt2":
        return _gpt2_map(cfg, prefix)
    if family == "opt":
        return _opt_map(cfg, prefix)
    return _llama_map(cfg, family)


def hf_tensor_shapes(tmap: dict[str, Transform]) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the map touches, with its stored shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for transform in tmap.values():
        for part in transform.parts:
            shapes[part.name] = part.shape
    return shapes


def assemble(blocks: list[tuple[Part, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """HF tensors from their blocks: blocks of one tensor are stacked by `start`, Conv1D ones transposed back."""
    by_name: dict[str, list[tuple[Part, torch.Tensor]]] = {}
    for part, t in blocks:
        by_name.setdefault(part.name, []).append((part, t))
    out = {}
    for name, items in by_name.items():
        items.sort(key=lambda item: item[0].start)
        part = items[0][0]
        t = torch.cat([t for _, t in items]) if len(items) > 1 else items[0][1]
        t = t.T if part.transposed else t
        assert tuple(t.shape) == part.shape, (name, tuple(t.shape), part.shape)
        out[name] = t.contiguous()
    return out
