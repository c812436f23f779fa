"""The DeepSpeed config `build_engine` uses: off CUDA, ZeRO's contiguous gradient buffer is off, and training is
bit-for-bit what it is with the buffer on."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest
import torch

import megaclone.train.engine as engine_module
from megaclone.config import RunConfig, load_run_config
from megaclone.parallel import Layout, TPRNGTracker, build_layout
from megaclone.train.engine import build_deepspeed_config, build_engine, build_model, fp32_masters
from megaclone.train.loop import train_step
from tests.distributed import run_distributed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
STEPS = 4
GRAD_CLIP = 0.05  # below every step's norm here, so clipping scales every update


def _config(zero_stage: int) -> RunConfig:
    return load_run_config(TINY, ["model.vocab_size=512", f"parallel.zero_stage={zero_stage}",
                                  f"train.grad_clip={GRAD_CLIP}"])


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_contiguous_gradients_off_only_off_cuda(zero_stage: int) -> None:
    cfg, layout = _config(zero_stage), Layout()
    zero_cpu = build_deepspeed_config(cfg, layout, torch.device("cpu"))["zero_optimization"]
    zero_gpu = build_deepspeed_config(cfg, layout, torch.device("cuda", 0))["zero_optimization"]
    assert zero_cpu == {"stage": zero_stage, "contiguous_gradients": False}
    assert zero_gpu == {"stage": zero_stage}  # DeepSpeed's default on GPU
    default = build_deepspeed_config(cfg, layout)["zero_optimization"]
    assert default == (zero_gpu if torch.cuda.is_available() else zero_cpu)  # where `device_for` trains


def _train(zero_stage: int, contiguous: bool) -> dict:
    """STEPS steps of the tiny model through `build_engine` with the buffer forced on or off: (loss, gradient norm)
    per step and the fp32 weights after."""
    cfg = _config(zero_stage)
    layout = build_layout(cfg.parallel)
    torch.manual_seed(cfg.train.seed)
    module = build_model(cfg, layout, TPRNGTracker(cfg.train.seed, layout.tp_rank))
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    build_config = engine_module.build_deepspeed_config

    def forced(*args, **kwargs) -> dict:
        config = build_config(*args, **kwargs)
        config["zero_optimization"]["contiguous_gradients"] = contiguous
        return config

    with mock.patch.object(engine_module, "build_deepspeed_config", forced):
        engine = build_engine(cfg, layout, module, torch.device("cpu"))
    assert engine.zero_optimization_stage() == zero_stage
    assert engine.zero_contiguous_gradients() is contiguous
    gen = torch.Generator().manual_seed(1000 + layout.dp_rank)  # each DP rank its own data
    b, s, v = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    history = []
    for _ in range(STEPS):
        batch = (torch.randint(0, v, (b, s), generator=gen), torch.randint(0, v, (b, s), generator=gen))
        history.append(train_step(engine, iter([batch]), layout))
    weights = fp32_masters(engine, dict(module.named_parameters()))
    return {"history": history, "weights": weights,
            "moved": any(not torch.equal(weights[n], initial[n]) for n in initial)}


def _worker(rank: int, world: int, stages: tuple[int, ...]) -> dict:
    return {(stage, contiguous): _train(stage, contiguous) for stage in stages for contiguous in (True, False)}


def test_contiguous_gradients_do_not_change_training() -> None:
    """DP=2 (ZeRO partitions the optimizer state, and at stage 2 the gradients): same losses, norms and weights."""
    for rank_result in run_distributed(_worker, 2, (1, 2), use_deepspeed=True):
        for stage in (1, 2):
            on, off = rank_result[(stage, True)], rank_result[(stage, False)]
            assert on["moved"] and off["moved"], stage  # the comparison is not of two untouched models
            assert min(norm for _, norm in on["history"]) > GRAD_CLIP  # every step takes the clipped path
            assert on["history"] == off["history"], stage
            assert on["weights"].keys() == off["weights"].keys()
            for name, value in on["weights"].items():
                assert torch.equal(value, off["weights"][name]), (stage, name)
