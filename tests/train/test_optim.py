"""AdamW groups come from the spec table; the schedule warms up linearly and decays by cosine to min_lr."""

from __future__ import annotations

import math

import pytest
import torch

from megaclone.config import ModelConfig, TrainConfig
from megaclone.model import GPT
from megaclone.spec import build_param_specs
from megaclone.train.optim import build_lr_scheduler, build_optimizer, build_param_groups, lr_factor


@pytest.mark.parametrize("arch", [dict(), dict(norm="rmsnorm", bias=False, activation="swiglu",
                                               tied_embeddings=False, position="learned")])
def test_no_weight_decay_on_norms_and_biases(arch: dict) -> None:
    cfg = ModelConfig(vocab_size=100, vocab_multiple=32, hidden_size=32, num_layers=2, num_heads=4, **arch)
    params = dict(GPT(cfg).named_parameters())
    groups = {g["name"]: g for g in build_param_groups(params, cfg, TrainConfig(weight_decay=0.1))}
    decayed = {id(p) for p in groups["decay"]["params"]}
    specs = build_param_specs(cfg)
    assert len(decayed) + len(groups["no_decay"]["params"]) == len(specs) == len(params)
    for spec in specs:
        want = not (spec.is_bias or spec.role in ("norm", "final_norm"))
        assert (id(params[spec.name]) in decayed) == want, spec.name
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert any(id(params["embedding.word.weight"]) == id(p) for p in groups["decay"]["params"])


def test_schedule_warmup_then_cosine_to_min_lr() -> None:
    train = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, train_iters=110)
    f = lr_factor(train)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_scheduler_drives_the_optimizer() -> None:
    cfg = ModelConfig(vocab_size=100, vocab_multiple=32, hidden_size=32, num_layers=1, num_heads=4)
    train = TrainConfig(lr=2e-3, min_lr=0.0, warmup_iters=4, train_iters=8)
    model = GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    optimizer = build_optimizer(dict(model.named_parameters()), cfg, train)
    scheduler = build_lr_scheduler(train)(optimizer)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [2e-3 * lr_factor(train)(s) for s in range(8)]
    assert seen == pytest.approx(expected)
    assert seen[3] == pytest.approx(2e-3) and seen[-1] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
