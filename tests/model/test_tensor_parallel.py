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
# The options of the imported families (docs/hf.md); the last one exercises the LayerNorm path of the
# column-parallel QK-norm and of the gain 1 + w.
FAMILY_ARCHS = {
    "opt350": dict(activation="relu", norm_placement="post", final_norm=False, position="learned",
                   position_offset=2, embed_size=16),
    "olmo-tied": dict(activation="swiglu", norm_affine=False, bias=False),
    "olmo2": dict(activation="swiglu", norm="rmsnorm", norm_placement="branch", qk_norm=True, bias=False,
                  tied_embeddings=False, num_query_groups=4),
    "gemma": dict(activation="geglu", norm="rmsnorm", norm_unit_offset=True, scale_embeddings=True, head_size=8,
                  bias=False, num_query_groups=4),
    "qknorm-layernorm-offset": dict(qk_norm=True, norm_unit_offset=True, num_query_groups=4),
}


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, vocab_multiple=32, hidden_size=32, num_layers=2, num_heads=8, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


def reference(cfg: ModelConfig, tokens: torch.Tensor, seed: int = 0, jitter: float = 0.0):
    """Logits, loss, gradients and weights of the reference; `jitter` moves every weight off its initial value (norm
    gains off 1, biases off 0), so that a shard holding the wrong slice of a norm changes the result."""
    model = ReferenceGPT(cfg)
    init_params(dict(model.named_parameters()), cfg, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(jitter * torch.randn(p.shape, generator=g))
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


def _check(cfg: ModelConfig, ref: tuple, results: list, tp: int) -> None:
    ref_logits, ref_loss, ref_grads, _ = ref
    specs = {s.name: s for s in build_param_specs(cfg)}
    scale = ref_logits.abs().max().item()
    for rank, (logits, loss, grads) in enumerate(results):
        assert (logits - ref_logits).abs().max().item() <= 1e-5 * scale
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        assert set(grads) == set(specs)
        for name, g in grads.items():
            want = ref_grads[name][specs[name].tp_slices(rank, tp)]
            torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("arch", "tp"), CASES)
def test_tp_matches_reference(arch: str, tp: int) -> None:
    cfg = tiny_config(**ARCHS[arch])
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = reference(cfg, tokens)
    _check(cfg, ref, run_distributed(_tp_worker, tp, cfg, tokens, ref[3]), tp)


def _tp_workers(rank: int, world: int, cases: list[tuple[ModelConfig, torch.Tensor, dict]]) -> list:
    return [_tp_worker(rank, world, *case) for case in cases]


def test_tp_matches_reference_for_family_options() -> None:
    """Every option of the imported families at TP=2, in one spawn: logits, loss and the gradient of every shard
    (the QK-norm's statistics are summed over the ranks, forward and backward)."""
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    cfgs = [tiny_config(**kw) for kw in FAMILY_ARCHS.values()]
    refs = [reference(cfg, tokens, seed=i, jitter=0.1) for i, cfg in enumerate(cfgs)]
    results = run_distributed(_tp_workers, 2, [(cfg, tokens, ref[3]) for cfg, ref in zip(cfgs, refs)])
    for i, (arch, cfg, ref) in enumerate(zip(FAMILY_ARCHS, cfgs, refs)):
        try:
            _check(cfg, ref, [rank_results[i] for rank_results in results], 2)
        except AssertionError as e:
            raise AssertionError(f"{arch}: {e}") from e


def test_mqa_rejects_tp2() -> None:
    cfg = tiny_config(num_query_groups=1)
    with pytest.raises(ValueError, match="num_query_groups=1.*tp_size=2"):
        ParallelConfig(tp_size=2).validate(cfg)
