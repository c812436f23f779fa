"""TP-sharded GPT equals the single-process reference: logits, loss and gathered gradients."""

from __future__ import annotations

import pytest
import torch

from megaclone.config import ModelConfig, ParallelConfig
from megaclone.model import GPT, ReferenceGPT, init_params, load_global_params
from megaclone.parallel import build_layout
from megaclone.spec import build_param_specs
from tests.distributed import run_distributed

ARCHS = {
    "mha-gelu-ln-rope-bias-tied": dict(),
    "gqa-swiglu-rms-learned-nobias-untied": dict(activation="swiglu", norm="rmsnorm", position="learned",
                                                 bias=False, tied_embeddings=False, num_query_groups=4),
    "mqa-gelu-ln-rope-untied": dict(num_query_groups=1, tied_embeddings=False),
}


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, vocab_multiple=32, hidden_size=32, num_layers=2, num_heads=8, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


def reference(cfg: ModelConfig, tokens: torch.Tensor, seed: int = 0):
    model = ReferenceGPT(cfg)
    init_params(dict(model.named_parameters()), cfg, seed)
    loss = model(tokens, tokens.roll(-1, 1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model(tokens).detach(), loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _tp_worker(rank: int, world: int, cfg: ModelConfig, tokens: torch.Tensor, full: dict):
    layout = build_layout(ParallelConfig(tp_size=world))
    model = GPT(cfg, layout.tp)
    load_global_params(dict(model.named_parameters()), full, cfg, layout.tp_rank, layout.tp_size)
    loss = model(tokens, tokens.roll(-1, 1))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return model(tokens).detach(), loss.item(), grads


# MQA has one query group, which cannot be split: covered by test_mqa_rejects_tp2 instead.
CASES = [(arch, tp) for arch in sorted(ARCHS) for tp in (2, 4) if tiny_config(**ARCHS[arch]).num_query_groups % tp == 0]


@pytest.mark.parametrize(("arch", "tp"), CASES)
def test_tp_matches_reference(arch: str, tp: int) -> None:
    cfg = tiny_config(**ARCHS[arch])
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_loss, ref_grads, full = reference(cfg, tokens)
    results = run_distributed(_tp_worker, tp, cfg, tokens, full)
    specs = {s.name: s for s in build_param_specs(cfg)}
    scale = ref_logits.abs().max().item()
    for rank, (logits, loss, grads) in enumerate(results):
        assert (logits - ref_logits).abs().max().item() <= 1e-5 * scale
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for name, g in grads.items():
            want = ref_grads[name][specs[name].tp_slices(rank, tp)]
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-4, msg=name)


def test_mqa_rejects_tp2() -> None:
    cfg = tiny_config(num_query_groups=1)
    with pytest.raises(ValueError, match="num_query_groups=1.*tp_size=2"):
        ParallelConfig(tp_size=2).validate(cfg)
