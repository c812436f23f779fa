"""The TP=1 GPT's fast paths against the reference: cached rotary tables and the bias inside the row-parallel matmul."""

from __future__ import annotations

import warnings

import pytest
import torch

import megaclone.model.gpt as gpt_module
from megaclone.config import ModelConfig
from megaclone.model import GPT, ReferenceGPT, init_params
from megaclone.model.gpt import Rope, cached_cos_sin
from megaclone.parallel import RowParallelLinear, TPGroup

ROPES = (Rope(16, 10000.0), Rope(16, 500000.0), Rope(8, 10000.0),
         Rope(16, 500000.0, "llama3", 8.0, 1.0, 4.0, 8192), Rope(16, 10000.0, "linear", 2.0))


@pytest.fixture(autouse=True)
def _cold_cache():
    """Each test starts and leaves with an empty table cache, so the order of requests is the test's own."""
    gpt_module._cos_sin_cache.cache_clear()
    yield
    gpt_module._cos_sin_cache.cache_clear()


def test_cached_tables_equal_fresh_ones_for_every_key() -> None:
    """Lengths up and down, settings and devices interleaved: each answer is the table computed afresh."""
    requests = [(rope, seq, device) for seq in (16, 5, 16, 1, 9) for rope in ROPES for device in ("cpu", "meta")]
    for rope, seq, device in requests:
        cos, sin = cached_cos_sin(rope, seq, torch.device(device))
        assert cached_cos_sin(rope, seq, torch.device(device))[0] is cos  # served from the cache
        want_cos, want_sin = rope.cos_sin(seq, torch.device(device))
        assert cos.shape == sin.shape == (seq, rope.size) and cos.dtype == sin.dtype == torch.float32
        assert cos.device == sin.device == torch.device(device)
        if device == "cpu":
            assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_tables_first_built_in_inference_mode_serve_training() -> None:
    """Tables cached under `torch.inference_mode` (an eval pass) must not be inference tensors, which autograd
    refuses to save for the backward of a later training step."""
    rope = ROPES[0]
    with torch.inference_mode():
        cached_cos_sin(rope, 8, torch.device("cpu"))
    cos, _ = cached_cos_sin(rope, 8, torch.device("cpu"))
    assert not cos.is_inference()
    x = torch.randn(8, rope.size, requires_grad=True)
    (x * cos).sum().backward()
    assert torch.equal(x.grad, cos)


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, vocab_multiple=32, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(rope_theta=500000.0, rope_fraction=0.5, num_query_groups=2)],
                         ids=["rope", "partial-rope-gqa"])
def test_gpt_matches_reference_across_lengths_modes_and_dtypes(kw: dict) -> None:
    """One model asked in turn at different lengths, under inference mode, in training with gradients and in
    bf16: the cache must never hand one request another's table."""
    cfg = _config(**kw)
    model, ref = GPT(cfg), ReferenceGPT(cfg)
    init_params(dict(model.named_parameters()), cfg, 0)
    ref.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(0)
    tokens = {s: torch.randint(0, cfg.vocab_size, (2, s), generator=gen) for s in (16, 5, 11)}
    with torch.inference_mode():
        for s in (16, 5):
            torch.testing.assert_close(model(tokens[s]), ref(tokens[s]), atol=1e-5, rtol=1e-5)
    for s in (5, 11, 16):  # training steps after the eval pass, at lengths cached under inference mode and not
        loss, ref_loss = model(tokens[s], tokens[s].roll(-1, 1)), ref(tokens[s], tokens[s].roll(-1, 1))
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
        ref_grads = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)
        model.zero_grad()
        ref.zero_grad()
    model.to(torch.bfloat16)  # the fp32 tables serve a bf16 model (apply_rope computes in fp32)
    ref.to(torch.bfloat16)
    for s in (11, 16):
        out, want = model(tokens[s]), ref(tokens[s])
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)


def test_compiled_gpt_computes_its_tables_in_the_graph() -> None:
    """Under torch.compile the tables are traced, not looked up: no Dynamo warning about the cache, nothing
    cached while tracing, and the compiled model equals the reference (then eager does too, from the cache)."""
    cfg = _config()
    model, ref = GPT(cfg), ReferenceGPT(cfg)
    init_params(dict(model.named_parameters()), cfg, 0)
    ref.load_state_dict(model.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="aot_eager")(tokens)
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert gpt_module._cos_sin_cache.cache_info().currsize == 0
    torch.testing.assert_close(out, ref(tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(tokens), out, atol=1e-6, rtol=1e-6)
    assert gpt_module._cos_sin_cache.cache_info().currsize == 1


@pytest.mark.parametrize("bias", [True, False])
def test_row_parallel_linear_at_tp1_is_nn_linear(bias: bool) -> None:
    """At TP=1 the bias goes into the matmul: output and gradients are those of `nn.Linear`."""
    gen = torch.Generator().manual_seed(0)
    layer, want = RowParallelLinear(12, 7, TPGroup(), bias), torch.nn.Linear(12, 7, bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    want.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 12, generator=gen)
    out, ref = layer(x), want(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    out.square().sum().backward()
    ref.square().sum().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, getattr(want, name).grad, atol=1e-5, rtol=1e-5, msg=name)
