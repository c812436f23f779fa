"""megaclone.train.zero_fast: the ZeRO-1/2 gradient norm is DeepSpeed's, bit for bit, at TP=2 and at DP=2, and so
is training with every shortcut; an all-reduce over one rank returns the tensor unchanged without a collective;
the gradient buckets are flattened only where there is a DP group to reduce over; a parameter whose storage was
replaced is pointed back at its slice of the flat buffer."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch

import megaclone.train.engine as engine_module
from megaclone.config import load_run_config
from megaclone.parallel import TPRNGTracker, build_layout
from megaclone.train.engine import build_engine, build_model
from megaclone.train.loop import train_step
from megaclone.train.zero_fast import group_norms, skip_single_rank_all_reduce
from tests.distributed import run_distributed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
STEPS = 3


def _engine(tp: int, zero_stage: int, ours: bool):
    cfg = load_run_config(TINY, ["model.vocab_size=512", f"parallel.tp_size={tp}", f"parallel.zero_stage={zero_stage}",
                                 "train.grad_clip=0.05"])
    layout = build_layout(cfg.parallel)
    torch.manual_seed(cfg.train.seed)
    module = build_model(cfg, layout, TPRNGTracker(cfg.train.seed, layout.tp_rank))
    if ours:
        return cfg, layout, build_engine(cfg, layout, module, torch.device("cpu"))
    with (mock.patch.object(engine_module, "install_grad_norm", lambda engine: False),
          mock.patch.object(engine_module, "install_engine_shortcuts", lambda engine: [])):
        return cfg, layout, build_engine(cfg, layout, module, torch.device("cpu"))


def _flattens_in_backward(zero, engine, batch) -> int:
    """How many buckets the backward epilogue flattens (for the all-reduce)."""
    with mock.patch.object(zero, "flatten", wraps=zero.flatten) as flatten:
        engine.backward(engine(*batch))
    return flatten.call_count


def _repoints_replaced_storage(engine, layout, batches) -> bool:
    """Give one parameter a storage of its own: after the next step it views the flat buffer again and trains."""
    zero = engine.optimizer
    p = zero.bit16_groups[0][0]
    p.data = p.data.clone()
    before = p.detach().clone()
    train_step(engine, iter(batches), layout)
    flat = zero.bit16_groups_flat[0]
    inside = flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
    return inside and not torch.equal(p.detach(), before)


def _batches(cfg, layout) -> list:
    gen = torch.Generator().manual_seed(1000 + layout.dp_rank)  # each DP rank its own data
    b, s, v = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    return [(torch.randint(0, v, (b, s), generator=gen), torch.randint(0, v, (b, s), generator=gen))
            for _ in range(STEPS)]


def _worker(rank: int, world: int, tp: int) -> dict:
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    out = {}
    for stage in (1, 2):
        cfg, layout, engine = _engine(tp, stage, ours=True)
        zero = engine.optimizer
        tokens, targets = _batches(cfg, layout)[0]
        flattened = _flattens_in_backward(zero, engine, (tokens, targets))  # ZeRO reduces in the epilogue
        theirs = [DeepSpeedZeroOptimizer.get_grad_norm_direct(zero, zero.averaged_gradients[i],
                                                              zero.params_in_partition[i])
                  for i in range(len(zero.bit16_groups))]
        out[stage] = {"ours": group_norms(zero), "theirs": theirs, "total": zero.scaled_global_norm(),
                      "total_theirs": DeepSpeedZeroOptimizer.scaled_global_norm(zero), "flattened": flattened,
                      "dp": layout.dp_size}
        zero.zero_grad()
        out[stage]["repointed"] = _repoints_replaced_storage(engine, layout, _batches(cfg, layout)[1:2])
        histories = []
        for ours in (True, False):
            cfg, layout, engine = _engine(tp, stage, ours)
            histories.append([train_step(engine, iter([batch]), layout) for batch in _batches(cfg, layout)])
        out[stage]["histories"] = histories
    return out


def _check(results: list[dict]) -> None:
    for result in results:
        for stage, r in result.items():
            assert len(r["ours"]) == len(r["theirs"]) >= 2, stage  # decay and no-decay groups
            for ours, theirs in zip(r["ours"], r["theirs"]):
                assert ours.item() > 0 and torch.equal(ours, theirs), (stage, ours, theirs)
            assert torch.equal(r["total"], r["total_theirs"]), stage
            ours, theirs = r["histories"]
            assert min(norm for _, norm in ours) > 0.05  # every step is clipped: the norm decides the update
            assert ours == theirs, stage
            assert (r["flattened"] > 0) == (r["dp"] > 1), (stage, r["flattened"], r["dp"])
            assert r["repointed"], stage


def test_norm_and_training_equal_deepspeeds_at_tp2() -> None:
    """TP=2, DP=1: the TP all-reduce runs, the DP one is skipped, TP-replicated tensors count once."""
    _check(run_distributed(_worker, 2, 2, use_deepspeed=True))


def test_norm_and_training_equal_deepspeeds_at_dp2() -> None:
    """TP=1, DP=2: the partial norms of the two ZeRO partitions are all-reduced."""
    _check(run_distributed(_worker, 2, 1, use_deepspeed=True))


def _single_rank(rank: int, world: int) -> tuple[bool, bool]:
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from deepspeed.comm import comm as backend  # holds the initialized backend, `cdb`

    skip_single_rank_all_reduce()
    skip_single_rank_all_reduce()  # idempotent: one wrapper
    assert getattr(ds_dist.all_reduce, "skips_single_rank", False)
    assert not getattr(ds_dist.all_reduce.__wrapped__, "skips_single_rank", False)
    alone = dist.new_group([0]), dist.new_group([1])
    x = torch.tensor([1.0 + rank])
    with mock.patch.object(backend.cdb, "all_reduce", side_effect=AssertionError("collective issued")):
        ds_dist.all_reduce(x, group=alone[rank])
    kept = torch.equal(x, torch.tensor([1.0 + rank]))
    ds_dist.all_reduce(x)  # the world group (2 ranks): a real collective
    return kept, torch.equal(x, torch.tensor([3.0]))


def test_all_reduce_over_one_rank_is_skipped_and_over_two_is_not() -> None:
    assert run_distributed(_single_rank, 2, use_deepspeed=True) == [(True, True), (True, True)]



def _muon_worker(rank: int, world_size: int) -> tuple[bool, bool, bool]:
    import sys

    from megaclone.train.zero_fast import MUON_MODULE

    cfg = load_run_config(TINY, ["model.vocab_size=512"])
    layout = build_layout(cfg.parallel)
    engine = build_engine(cfg, layout, build_model(cfg, layout, TPRNGTracker(0, 0)), torch.device("cpu"))
    muon = sys.modules.get(MUON_MODULE)
    inductor = "torch._inductor.compile_fx" in sys.modules
    return engine.zero_optimization_stage() == 1, not hasattr(muon, "__file__"), inductor


def test_deepspeed_engines_start_without_importing_muon() -> None:
    """`skip_muon_import`: a ZeRO-1 engine starts in a fresh process on the stand-in for DeepSpeed's Muon module,
    and torch's inductor compiler behind the real one is never imported."""
    assert run_distributed(_muon_worker, 1, use_deepspeed=True) == [(True, True, False)]
