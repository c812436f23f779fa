"""DeepSpeed's pipeline engine computes exactly the reference GPT: loss and every gradient.

The same full weights are loaded at PP=2 (DP=1 and DP=2), TP=2 x PP=2 and PP=1 x DP=2, run through
`deepspeed.initialize(...)` and `engine.eval_batch` / `engine.train_batch` as training runs them, and
compared with the single-process `ReferenceGPT` on the same batch. Gradients are read after the engine's
own reductions (tied-embedding all-reduce between first and last stage, DP averaging, clipping): with
ZeRO-0 by a client optimizer that records `p.grad` in `step()`, with ZeRO-1 as the update of one plain
SGD step with lr=1. ZeRO-0 cases turn clipping off: DeepSpeed 0.19's fp32 ZeRO-0 clip under PP sums
only stage 0's unsplit gradients into the norm (`clip_grad_norm_` asks the grid's combined pipe x model
rank), so it clips by the wrong factor; ZeRO-1 computes the whole-model norm and is checked with clipping
on. DeepSpeed start-up is slow, so all cases of one world size share a spawn.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from megaclone.config import ModelConfig, ParallelConfig
from megaclone.model import (
    ReferenceGPT,
    build_pipeline_module,
    global_named_parameters,
    init_params,
    load_global_params,
)
from megaclone.parallel import build_layout
from megaclone.spec import build_param_specs, stage_layer_range, stages_of
from tests.distributed import run_distributed
from tests.model.test_tensor_parallel import ARCHS, FAMILY_ARCHS, tiny_config

SGD_LR = 1.0  # ZeRO-1 cases read the gradient as (before - after) / lr of one SGD step


@dataclass
class Case:
    """One pipeline run: architecture, layout, optimizer path and the global batch."""

    name: str
    cfg: ModelConfig
    tp_size: int
    pp_size: int
    zero_stage: int  # 0: gradients recorded by the client optimizer; 1: read from an SGD update
    grad_accum: int
    grad_clip: float  # DeepSpeed's "gradient_clipping" (its default is 1.0, not off)
    tokens: torch.Tensor  # [global batch, seq]
    labels: torch.Tensor  # [global batch, seq]
    full: dict[str, torch.Tensor]  # global name -> full fp32 weight


class GradRecorder(torch.optim.Optimizer):
    """A client optimizer that keeps a copy of every gradient DeepSpeed hands it and never moves a weight."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        super().__init__(params, defaults={"lr": 0.0})
        self.grads: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.grads[id(p)] = p.grad.detach().clone()


def _micro_batches(case: Case, dp_rank: int, dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This DP rank's share of the global batch, cut into `grad_accum` equal micro-batches."""
    per_rank = case.tokens.shape[0] // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    tokens, labels = case.tokens[rows], case.labels[rows]
    return list(zip(tokens.chunk(case.grad_accum), labels.chunk(case.grad_accum)))


def _run_case(case: Case) -> dict:
    import deepspeed

    cfg = case.cfg
    layout = build_layout(ParallelConfig(tp_size=case.tp_size, pp_size=case.pp_size, zero_stage=case.zero_stage))
    module = build_pipeline_module(cfg, layout)
    params = global_named_parameters(module, cfg)
    load_global_params(params, case.full, cfg, layout.tp_rank, layout.tp_size)
    before = {n: p.detach().clone() for n, p in params.items()}
    if case.zero_stage == 0:
        optimizer = GradRecorder(module.parameters())
    else:
        optimizer = torch.optim.SGD(module.parameters(), lr=SGD_LR)
    batches = _micro_batches(case, layout.dp_rank, layout.dp_size)
    config = {"train_micro_batch_size_per_gpu": batches[0][0].shape[0],
              "gradient_accumulation_steps": case.grad_accum,
              "zero_optimization": {"stage": case.zero_stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": case.grad_clip, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    eval_loss = engine.eval_batch(iter(batches)).item()
    train_loss = engine.train_batch(iter(batches)).item()
    if case.zero_stage == 0:
        grads = {n: optimizer.grads[id(p)] for n, p in params.items() if id(p) in optimizer.grads}
    else:
        grads = {n: (before[n] - p.detach()) / SGD_LR for n, p in params.items()}
    return {"stage": layout.pp_rank, "tp_rank": layout.tp_rank, "dp_rank": layout.dp_rank,
            "parts": [int(x) for x in module.parts], "eval_loss": eval_loss, "train_loss": train_loss,
            "grads": grads}


def _worker(rank: int, world: int, cases: list[Case]) -> list[dict]:
    return [_run_case(case) for case in cases]


def _make_case(name: str, arch: dict, tp_size: int, pp_size: int, zero_stage: int, grad_accum: int,
               batch: int, seed: int, grad_clip: float = 0.0, **cfg_overrides) -> Case:
    cfg = tiny_config(**{**arch, **cfg_overrides})
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=gen)
    ref = ReferenceGPT(cfg)
    init_params(dict(ref.named_parameters()), cfg, seed)
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return Case(name, cfg, tp_size, pp_size, zero_stage, grad_accum, grad_clip, tokens, labels, full)


def _reference(case: Case) -> tuple[float, dict[str, torch.Tensor]]:
    model = ReferenceGPT(case.cfg)
    load_global_params(dict(model.named_parameters()), case.full, case.cfg)
    loss = model(case.tokens, case.labels)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _check(case: Case, results: list[dict]) -> None:
    cfg, pp = case.cfg, case.pp_size
    ref_loss, ref_grads = _reference(case)
    specs = {s.name: s for s in build_param_specs(cfg)}
    if case.grad_clip:  # ZeRO-1 scales by clip / (norm + 1e-6), the norm over the whole model (tie counted once)
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
        assert norm > case.grad_clip, f"{case.name}: clipping would not act (norm {norm})"
        ref_grads = {n: g * (case.grad_clip / (norm + 1e-6)) for n, g in ref_grads.items()}
    expected_parts = [stage_layer_range(cfg, pp, s)[0] for s in range(pp)] + [cfg.num_layers + 3]
    seen: set[tuple[str, int]] = set()
    for r in results:
        where = f"{case.name}: stage {r['stage']} tp {r['tp_rank']} dp {r['dp_rank']}"
        assert r["parts"] == expected_parts, where
        for key in ("eval_loss", "train_loss"):
            assert abs(r[key] - ref_loss) <= 1e-5 * abs(ref_loss), (where, key, r[key], ref_loss)
        held = {n for n, s in specs.items() if r["stage"] in stages_of(s, cfg, pp)}
        assert set(r["grads"]) == held, (where, sorted(set(r["grads"]) ^ held))
        for name, grad in r["grads"].items():
            want = ref_grads[name][specs[name].tp_slices(r["tp_rank"], case.tp_size)]
            label = f"{where} {name}"
            torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-4, msg=lambda m, label=label: f"{label}: {m}")
            seen.add((name, r["tp_rank"]))
    # every slice of every parameter was compared on some rank
    assert seen == {(n, t) for n in specs for t in range(case.tp_size)}, case.name


TIED, GQA_SWIGLU, MQA = (ARCHS[k] for k in ("mha-gelu-ln-rope-bias-tied", "gqa-swiglu-rms-learned-nobias-untied",
                                            "mqa-gelu-ln-rope-untied"))


def test_pp2_and_pp1_dp2_match_reference() -> None:
    """2 ranks: PP=2 with tied embeddings across first/last stage (L=3: uneven split), untied GQA/SwiGLU."""
    cases = [
        _make_case("tied-L3-pp2-zero0", TIED, 1, 2, 0, 1, batch=2, seed=1, num_layers=3),
        _make_case("gqa-swiglu-pp2-zero1-clip", GQA_SWIGLU, 1, 2, 1, 2, batch=2, seed=2, grad_clip=0.5),
        # one stage holding both tied specs (DeepSpeed reuses the embedding for the logits), DP=2
        _make_case("tied-learned-pp1-dp2-zero0", TIED, 1, 1, 0, 1, batch=2, seed=7, position="learned"),
        # a final norm without parameters as layer L+1, the tied embedding on both stages (OLMo)
        _make_case("olmo-tied-pp2-zero1-clip", FAMILY_ARCHS["olmo-tied"], 1, 2, 1, 1, batch=2, seed=8, grad_clip=0.5),
    ]
    results = run_distributed(_worker, 2, cases, use_deepspeed=True)
    for i, case in enumerate(cases):
        _check(case, [rank_results[i] for rank_results in results])


def test_tp2_pp2_and_pp2_dp2_match_reference() -> None:
    """4 ranks: TP=2 x PP=2 (tied and untied) and PP=2 x DP=2 with two micro-batches per step."""
    cases = [
        _make_case("tied-tp2-pp2-zero0", TIED, 2, 2, 0, 1, batch=2, seed=3),
        _make_case("gqa-swiglu-L3-tp2-pp2-zero1-clip", GQA_SWIGLU, 2, 2, 1, 1, batch=2, seed=4, grad_clip=0.5,
                   num_layers=3),
        _make_case("mqa-pp2-dp2-zero0", MQA, 1, 2, 0, 2, batch=4, seed=5),
        _make_case("tied-learned-pp2-dp2-zero1-clip", TIED, 1, 2, 1, 2, batch=4, seed=6, grad_clip=0.5,
                   position="learned"),
        # project_in on the first stage, project_out in layer L+1 before the tied unembedding, post-norm (OPT-350m)
        _make_case("opt350-tp2-pp2-zero1-clip", FAMILY_ARCHS["opt350"], 2, 2, 1, 1, batch=2, seed=9, grad_clip=0.1),
        # QK-norm across the TP pair, the gain 1 + w as layer L+1 (OLMo-2 norms, Gemma's embedding)
        _make_case("gemma-qknorm-tp2-pp2-zero0", FAMILY_ARCHS["gemma"], 2, 2, 0, 1, batch=2, seed=10, qk_norm=True),
    ]
    results = run_distributed(_worker, 4, cases, use_deepspeed=True)
    for i, case in enumerate(cases):
        _check(case, [rank_results[i] for rank_results in results])
