"""The GPT as a DeepSpeed `PipelineModule`, and the one translation between global parameter names
and DeepSpeed's per-stage module names.

Pipeline layer i is the spec table's `layer` i: 0 embedding, 1..L blocks, L+1 final norm (and project_out), L+2
LM head. With tied embeddings and PP > 1 the embedding is a `TiedLayerSpec` on the first and the last
stage, and DeepSpeed all-reduces its gradient between the two.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megaclone.config import ModelConfig
from megaclone.model.gpt import Embedding, TransformerBlock, build_final_layers, norm_class, parallel_logits
from megaclone.parallel import (
    ColumnParallelLinear,
    Layout,
    TPGroup,
    TPRNGTracker,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from megaclone.spec import stage_layer_range

TIED_KEY = "embed"


class TiedWordEmbedding(nn.Module):
    """The last stage's copy of the tied embedding: the word table only.

    Learned positions belong to the first stage alone (`spec.stages_of`); a full `Embedding` here would
    hold a second, never-synchronised `embedding.position.weight` under the same global name.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup):
        super().__init__()
        self.word = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.embedding_size, tp)


class FinalLayer(nn.Module):
    """Pipeline layer L+1 of a model with project_out (OPT's word_embed_proj_dim): the final norm (or nn.Identity)
    and project_out, under their global names. Without project_out, layer L+1 is the bare norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.final_norm, self.project_out = build_final_layers(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.final_norm(x))


def _final_layer_spec(cfg: ModelConfig) -> Any:
    from deepspeed.pipe import LayerSpec

    if cfg.has_projections:
        return LayerSpec(FinalLayer, cfg)
    if not cfg.final_norm:
        return LayerSpec(nn.Identity)
    cls, kwargs = norm_class(cfg)
    return LayerSpec(cls, **kwargs)


def _tied_logits(embedding: Embedding | TiedWordEmbedding, x: torch.Tensor) -> torch.Tensor:
    return parallel_logits(x, embedding.word.weight, embedding.word.tp)


def _layer_prefix(cfg: ModelConfig, layer: int) -> str:
    L = cfg.num_layers
    if layer == 0:
        return "embedding."
    if layer <= L:
        return f"blocks.{layer - 1}."
    if layer == L + 1:  # the bare final norm, or FinalLayer whose children carry their global names
        return "" if cfg.has_projections else "final_norm."
    return "lm_head."


def pipeline_to_global_name(cfg: ModelConfig, name: str) -> str:
    """`3.attn.qkv.weight` -> `blocks.2.attn.qkv.weight`; `tied_modules.embed.word.weight` -> `embedding.word.*`."""
    if name.startswith(f"tied_modules.{TIED_KEY}."):
        return "embedding." + name[len(f"tied_modules.{TIED_KEY}."):]
    layer, rest = name.split(".", 1)
    return _layer_prefix(cfg, int(layer)) + rest


def global_to_pipeline_name(cfg: ModelConfig, name: str, layer: int) -> str:
    """The inverse of `pipeline_to_global_name` for a parameter of pipeline layer `layer` (the spec table's):
    `blocks.2.attn.qkv.weight` -> `3.attn.qkv.weight`; the tied embedding is DeepSpeed's tied module's."""
    if layer == 0 and cfg.tied_embeddings and name.startswith("embedding.word."):
        return f"tied_modules.{TIED_KEY}." + name[len("embedding."):]
    return f"{layer}." + name[len(_layer_prefix(cfg, layer)):]


def build_pipeline_module(cfg: ModelConfig, layout: Layout, rng: TPRNGTracker | None = None) -> nn.Module:
    """A `PipelineModule` holding this rank's stage, with the vocab-parallel loss on the last stage."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    tp = layout.tp
    tied = cfg.tied_embeddings
    first = TiedLayerSpec(TIED_KEY, Embedding, cfg, tp, tied_weight_attr="word.weight") if tied \
        else LayerSpec(Embedding, cfg, tp)
    # With PP=1 DeepSpeed reuses the first stage's module for the second spec of the same key.
    last = TiedLayerSpec(TIED_KEY, TiedWordEmbedding, cfg, tp, forward_fn=_tied_logits,
                         tied_weight_attr="word.weight") if tied \
        else LayerSpec(ColumnParallelLinear, cfg.embedding_size, cfg.padded_vocab_size, tp, bias=False)
    layers = [first, *(LayerSpec(TransformerBlock, cfg, tp, rng) for _ in range(cfg.num_layers)),
              _final_layer_spec(cfg), last]

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, tp, cfg.vocab_size).mean()

    topology = PipeModelDataParallelTopology(num_pp=layout.pp_size, num_mp=layout.tp_size, num_dp=layout.dp_size)
    module = PipelineModule(layers=layers, loss_fn=loss_fn, topology=topology,
                            partition_method="type:TransformerBlock", activation_checkpoint_interval=0)
    expected = [stage_layer_range(cfg, layout.pp_size, s)[0] for s in range(layout.pp_size)] + [len(layers)]
    assert [int(p) for p in module.parts] == expected, (module.parts, expected)
    return module


def global_named_parameters(module: nn.Module, cfg: ModelConfig) -> dict[str, nn.Parameter]:
    """This rank's parameters by global name, for a `GPT` or a pipeline stage alike."""
    if hasattr(module, "forward_funcs"):  # a PipelineModule
        return {pipeline_to_global_name(cfg, n): p for n, p in module.named_parameters()}
    return dict(module.named_parameters())


def block_modules(module: nn.Module) -> dict[int, nn.Module]:
    """This rank's transformer blocks by global block index, for a `GPT` or a pipeline stage alike."""
    if hasattr(module, "forward_funcs"):  # a PipelineModule: its layers are children named by pipeline layer
        return {int(name) - 1: child for name, child in module.named_children() if isinstance(child, TransformerBlock)}
    return dict(enumerate(module.blocks))
