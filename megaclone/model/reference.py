"""A plain single-process GPT: the oracle for every TP/PP test and the model `load_model` returns.

Same architecture and the same global parameter names as `megaclone.model.gpt.GPT`, written with
ordinary torch modules and no parallelism, so it can be read in one sitting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaclone.config import ModelConfig
from megaclone.model.gpt import apply_rope, build_norm, build_rope


class RefAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, self.rope = cfg, build_rope(cfg)
        self.qkv = nn.Linear(cfg.hidden_size, cfg.num_query_groups * (cfg.heads_per_group + 2) * cfg.head_size,
                             bias=cfg.has_qkv_bias)
        self.out = nn.Linear(cfg.num_heads * cfg.head_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg, (b, s, _) = self.cfg, x.shape
        g, hpg, hd = cfg.num_query_groups, cfg.heads_per_group, cfg.head_size
        qkv = self.qkv(x).view(b, s, g, hpg + 2, hd)  # [batch, seq, groups, q heads + k + v, head]
        q = qkv[:, :, :, :hpg].reshape(b, s, g * hpg, hd).transpose(1, 2)  # [batch, heads, seq, head]
        k = qkv[:, :, :, hpg].repeat_interleave(hpg, dim=2).transpose(1, 2)  # one k per query head
        v = qkv[:, :, :, hpg + 1].repeat_interleave(hpg, dim=2).transpose(1, 2)
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(s, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = cfg.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, g * hpg * hd))


class RefMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.activation == "swiglu"
        self.approximate = "none" if cfg.activation == "gelu_exact" else "tanh"
        if self.gated:
            self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=cfg.bias)  # rows [gate_u, up_u]
        else:
            self.fc_in = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up(x).unflatten(-1, (-1, 2)).unbind(-1)
            return self.fc_out(F.silu(gate) * up)
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


class RefBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.attn_norm, self.attn = build_norm(cfg), RefAttention(cfg)
        self.mlp_norm, self.mlp = build_norm(cfg), RefMLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel_residual:  # GPT-NeoX: both branches read the block input
            return x + self.dropout(self.attn(self.attn_norm(x))) + self.dropout(self.mlp(self.mlp_norm(x)))
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class RefEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.position == "learned" else None


class ReferenceGPT(nn.Module):
    """Full (unsharded) model in one process: `model(tokens)` -> logits [batch, seq, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = RefEmbedding(cfg)
        self.blocks = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = build_norm(cfg)
        self.lm_head = None if cfg.tied_embeddings else nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over real-vocabulary logits when labels are given, else logits [batch, seq, vocab]."""
        x = self.embedding.word(tokens)  # [batch, seq, hidden]
        if self.embedding.position is not None:
            x = x + self.embedding.position(torch.arange(tokens.shape[1], device=tokens.device))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        weight = self.embedding.word.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, weight)[..., : self.cfg.vocab_size]  # padding never counts
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
