"""The pieces under the conversions: tensor transforms on any slice, slot names, the new model options and
rotary embeddings equal to transformers' own functions."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from megaclone.config import ConfigError, ModelConfig
from megaclone.hf import assemble, tensor_map
from megaclone.model.gpt import Rope, apply_rope, build_rope
from megaclone.spec import param_name, spec_table


class DictSource:
    """HF tensors in memory, indexed like safetensors slices."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def slice(self, name: str) -> torch.Tensor:
        return self.tensors[name]


CONFIGS = {
    "llama": ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_heads=8, num_query_groups=4,
                         head_size=4, ffn_size=48, activation="swiglu", norm="rmsnorm", bias=True,
                         tied_embeddings=False),
    "qwen2": ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_heads=8, num_query_groups=4,
                         activation="swiglu", norm="rmsnorm", bias=False, qkv_bias=True),
    "gpt2": ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_heads=4, position="learned",
                        max_seq_len=16, tied_embeddings=False),
    "gpt_neox": ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_heads=4, rope_fraction=0.25,
                            parallel_residual=True, activation="gelu_exact"),
    "opt": ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_heads=4, position="learned",
                       position_offset=2, max_seq_len=16, embed_size=16, activation="relu", norm_placement="post",
                       final_norm=False, tied_embeddings=False),
    "olmo2": ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_heads=8, num_query_groups=4,
                         activation="swiglu", norm="rmsnorm", bias=False, norm_placement="branch", qk_norm=True),
    "gemma": ModelConfig(vocab_size=100, vocab_multiple=64, hidden_size=32, num_heads=8, num_query_groups=4,
                         head_size=16, activation="geglu", norm="rmsnorm", norm_unit_offset=True, bias=False,
                         scale_embeddings=True),
}


def random_hf_tensors(family: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for transform in tensor_map(family, cfg).values():
        for part in transform.parts:
            out[part.name] = torch.randn(part.shape, generator=g)
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_reading_any_slice_equals_slicing_the_whole(family: str) -> None:
    cfg = CONFIGS[family]
    tensors = random_hf_tensors(family, cfg)
    source, specs = DictSource(tensors), spec_table(cfg)
    tmap = tensor_map(family, cfg)
    assert set(tmap) == set(specs)
    blocks = []
    for name, transform in tmap.items():
        spec = specs[name]
        full = transform.read(source, [(0, n) for n in spec.shape])
        assert tuple(full.shape) == spec.shape, name
        for tp in (2, 4):  # every TP shard, and ranges that cut through units
            for rank in range(tp):
                index = spec.tp_slices(rank, tp)
                ranges = [(sl.start or 0, sl.stop if sl.stop is not None else n) for sl, n in zip(index, spec.shape)]
                assert torch.equal(transform.read(source, ranges), full[index]), (name, tp, rank)
        odd = [(1, spec.shape[0] - 3)] + [(2, n - 1) for n in spec.shape[1:]]
        assert torch.equal(transform.read(source, odd), full[tuple(slice(a, b) for a, b in odd)]), name
        blocks += transform.split(full)
    assert {k: v.shape for k, v in assemble(blocks).items()} == {k: v.shape for k, v in tensors.items()}
    for name, t in assemble(blocks).items():
        assert torch.equal(t, tensors[name]), name


def test_grouped_qkv_layout() -> None:
    """megaclone's qkv rows of group g are [q heads 2g, 2g+1, k head g, v head g] (Llama's repeat_kv order)."""
    cfg = CONFIGS["llama"]  # 8 heads, 4 groups, head size 4
    tensors = random_hf_tensors("llama", cfg)
    qkv = tensor_map("llama", cfg)[param_name("qkv", 0)].read(DictSource(tensors), [(0, 64), (0, 32)])
    q, k, v = (tensors[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    group = qkv[16:32]  # group 1
    assert torch.equal(group[:8], q[8:16]) and torch.equal(group[8:12], k[4:8]) and torch.equal(group[12:], v[4:8])


def test_padded_vocabulary_rows_are_zero() -> None:
    cfg = CONFIGS["gpt2"]
    tensors = random_hf_tensors("gpt2", cfg)
    emb = tensor_map("gpt2", cfg)[param_name("embedding")].read(DictSource(tensors), [(64, 128), (0, 32)])
    assert torch.equal(emb[:36], tensors["transformer.wte.weight"][64:]) and torch.all(emb[36:] == 0)


def test_param_names_come_from_the_spec_table() -> None:
    cfg = CONFIGS["qwen2"]
    names = set(spec_table(cfg))
    assert param_name("qkv", 1, bias=True) == "blocks.1.attn.qkv.bias" in names
    assert "blocks.1.attn.out.bias" not in names and "blocks.1.mlp.gate_up.bias" not in names  # q/k/v biases only
    assert param_name("embedding") == "embedding.word.weight" in names
    with pytest.raises(ValueError, match="unknown parameter slot 'attn'"):
        param_name("attn", 0)
    with pytest.raises(ValueError, match="block index is needed"):
        param_name("qkv")


def test_new_options_validate() -> None:
    with pytest.raises(ConfigError, match="model.rope_fraction=0.5 and model.rope_scaling='none' need model.position"):
        ModelConfig(position="learned", rope_fraction=0.5)
    with pytest.raises(ConfigError, match="gives 3 rotary dims"):
        ModelConfig(hidden_size=64, num_heads=4, rope_fraction=0.2)  # head 16 -> 3 dims
    with pytest.raises(ConfigError, match="model.rope_scaling='yarn'"):
        ModelConfig(rope_scaling="yarn")
    with pytest.raises(ConfigError, match="need 0 < low < high"):
        ModelConfig(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)
    assert ModelConfig(activation="gelu_exact").ffn_size == 4 * 128
    assert ModelConfig().has_qkv_bias and not ModelConfig(bias=False).has_qkv_bias
    assert ModelConfig(bias=False, qkv_bias=True).has_qkv_bias


@pytest.mark.parametrize("rope_type,params", [
    ("linear", {"factor": 3.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}),
])
def test_scaled_rope_frequencies_equal_transformers(rope_type: str, params: dict) -> None:
    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
                                  rope_parameters={"rope_type": rope_type, "rope_theta": 500000.0, **params})
    want, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    rope = Rope(64, 500000.0, rope_type, params["factor"], params.get("low_freq_factor", 1.0),
                params.get("high_freq_factor", 4.0), params.get("original_max_position_embeddings", 8192))
    assert scale == 1.0 and torch.equal(rope.inv_freq(torch.device("cpu")), want)
    assert not torch.equal(Rope(64, 500000.0).inv_freq(torch.device("cpu")), want)  # the scaling matters


def test_partial_rotary_equals_gpt_neox() -> None:
    cfg = ModelConfig(hidden_size=64, num_heads=4, rope_fraction=0.25, rope_theta=100.0)
    rope = build_rope(cfg)
    assert rope.size == 4
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 16, generator=g), torch.randn(2, 4, 10, 16, generator=g)
    cos, sin = rope.cos_sin(10, torch.device("cpu"))
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.allclose(apply_rope(q, cos, sin), want_q, atol=1e-6, rtol=0)
    assert torch.allclose(apply_rope(k, cos, sin), want_k, atol=1e-6, rtol=0)
    assert torch.equal(apply_rope(q, cos, sin)[..., 4:], q[..., 4:])  # the other 12 dims pass through
