"""Every YAML in configs/ loads, validates and plans at its own layout; the GPT-3 presets have the published sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaclone.config import load_run_config
from megaclone.parallel import Layout
from megaclone.spec import num_params
from megaclone.train.cli import build_plan, parse_args
from megaclone.train.engine import build_deepspeed_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
PUBLISHED = {"gpt-125m": 125e6, "gpt-350m": 350e6, "gpt-1.3b": 1.3e9, "gpt-2.7b": 2.7e9}  # GPT-3 table 2.1


def test_configs_exist() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "small", *PUBLISHED} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_plans(path: Path, tmp_path: Path) -> None:
    raw = load_run_config(path)
    raw.validate()
    world = raw.parallel.tp_size * raw.parallel.pp_size * 2  # the smallest layout with data parallelism
    plan = build_plan(parse_args(["--config", str(path), "--run-dir", str(tmp_path / "run")]), world)
    cfg = plan.cfg
    assert cfg.model.vocab_size == raw.data.vocab_size  # trained on the fly at data.vocab_size
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.train.min_lr <= cfg.train.lr and cfg.train.warmup_iters < cfg.train.train_iters
    layout = Layout(tp_size=cfg.parallel.tp_size, pp_size=cfg.parallel.pp_size, dp_size=2, world_size=world)
    ds = build_deepspeed_config(cfg, layout)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * 2
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_gpt3_presets_have_published_sizes(name: str) -> None:
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    model = cfg.model
    model.vocab_size = 50257  # GPT-2/3 BPE
    assert num_params(model) == pytest.approx(PUBLISHED[name], rel=0.04)
    assert (cfg.train.precision, cfg.data.seq_len, model.head_size * model.num_heads) == \
        ("bf16", 2048, model.hidden_size)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * (8 // cfg.parallel.tp_size) * cfg.data.seq_len
    assert tokens in (2**19, 2**20)  # 0.5M or 1M tokens per step on 8 GPUs, as published
