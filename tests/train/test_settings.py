"""A run that starts from a checkpoint without --config (--init-from, --load) takes the recorded train, data and
checkpoint settings of the checkpoint's run; --config, --set and flags still win; the run says where each came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaclone.checkpoint import write_weights_checkpoint
from megaclone.config import ModelConfig, RunConfig, TrainConfig
from megaclone.data import prepare_data, shard_paths
from megaclone.model import ReferenceGPT, init_params
from megaclone.train.cli import build_plan, parse_args
from megaclone.train.settings import describe_sources, settings_record
from tests.data.test_shards import synthetic_documents

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL_TRAIN = TrainConfig(micro_batch_size=2, train_iters=40, lr=2e-3, min_lr=2e-4, warmup_iters=6, eval_interval=20,
                          eval_iters=3, log_interval=10, seed=7)


def plan(argv: list[str], world_size: int = 1):
    return build_plan(parse_args(argv), world_size)


def _checkpoint(root: Path, prefix: Path, settings: bool) -> Path:
    """A tiny model's checkpoint with the tokenizer of the shards at `prefix`, and (as a training run writes them)
    its run's settings, or none (as an older megaclone or an import wrote it)."""
    cfg = ModelConfig(vocab_size=400, vocab_multiple=64, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64)
    model = ReferenceGPT(cfg)
    init_params(dict(model.named_parameters()), cfg, seed=0)
    step_dir = write_weights_checkpoint(root, cfg, {n: p.detach() for n, p in model.named_parameters()}, tp_size=1,
                                        pp_size=1, step=40, tokenizer=f"{prefix}_tokenizer.model")
    if settings:
        run = RunConfig(train=SMALL_TRAIN)
        run.data.seq_len, run.checkpoint.save_interval, run.checkpoint.keep_last = 32, 20, 2
        manifest = json.loads((step_dir / "manifest.json").read_text())
        manifest["settings"] = settings_record(run, prefix)
        (step_dir / "manifest.json").write_text(json.dumps(manifest))
    return step_dir


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint with recorded settings, the token shards its run read)."""
    tmp = tmp_path_factory.mktemp("source")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(60)), encoding="utf-8")
    prefix = tmp / "data" / "corpus"
    prepare_data(prefix, paths=[str(corpus)], vocab_size=400, valid_fraction=0.1)
    return _checkpoint(tmp / "ckpt", prefix, settings=True), prefix


def test_init_from_without_config_trains_on_with_the_small_runs_settings(source, tmp_path: Path) -> None:
    ckpt, prefix = source
    p = plan(["--init-from", str(ckpt), "--hyperclone", "2", "--run-dir", str(tmp_path / "wide")])
    assert p.cfg.train == SMALL_TRAIN  # not the package defaults (lr 1e-3, warmup 10, micro-batch 8)
    assert (p.cfg.data.data_prefix, p.cfg.data.seq_len) == (str(prefix.resolve()), 32)
    assert (p.cfg.checkpoint.save_interval, p.cfg.checkpoint.keep_last) == (20, 2)
    assert not p.data.build and p.data.prefix == prefix.resolve()  # the small run's shards, not tokenized again
    assert p.cfg.run_dir == str(tmp_path / "wide") and not p.warnings
    label = f"the source checkpoint {ckpt}"
    assert {p.sources[k] for k in ("train.lr", "train.warmup_iters", "data.data_prefix")} == {label}
    assert (p.sources["clone.variant"], p.sources["run_dir"]) == ("the HyperCloning defaults", "flags")
    lines = describe_sources(p.sources, p.cfg)
    assert f"settings from {label}: train.*, data.data_prefix, data.seq_len, data.vocab_size, " \
           "checkpoint.save_interval, checkpoint.keep_last" in lines
    assert any(line.startswith("settings from package defaults: parallel.*, data.tokenizer") for line in lines)


def test_set_flags_and_config_still_win(source) -> None:
    ckpt, _ = source
    p = plan(["--init-from", str(ckpt), "--hyperclone", "2", "--train-iters", "3", "--set", "train.lr=5e-4"])
    assert (p.cfg.train.lr, p.cfg.train.train_iters, p.cfg.train.warmup_iters) == (5e-4, 3, SMALL_TRAIN.warmup_iters)
    assert (p.sources["train.lr"], p.sources["train.train_iters"]) == ("--set", "flags")
    p = plan(["--init-from", str(ckpt), "--hyperclone", "2", "--config", TINY])  # a config file: nothing inherited
    assert (p.cfg.train.lr, p.cfg.train.micro_batch_size, p.cfg.data.data_prefix) == (3e-3, 4, "")
    assert p.sources["train.lr"] == f"the config file {TINY}" and "train.lr_decay_iters" not in p.sources


def test_load_without_config_resumes_with_the_recorded_settings(source) -> None:
    ckpt, prefix = source
    p = plan(["--load", str(ckpt)])
    assert p.cfg.train == SMALL_TRAIN and p.cfg.data.data_prefix == str(prefix.resolve())


def test_a_checkpoint_without_settings_warns_and_uses_the_defaults(source, tmp_path: Path) -> None:
    _, prefix = source
    old = _checkpoint(tmp_path / "old", prefix, settings=False)
    p = plan(["--init-from", str(old), "--hyperclone", "2", "--run-dir", str(tmp_path / "run")])
    assert p.cfg.train == TrainConfig()
    assert any(f"{old / 'manifest.json'} records no training settings" in w for w in p.warnings)
    assert p.data.build and "train.lr" not in p.sources


def test_gone_shards_are_rebuilt_with_a_warning(source, tmp_path: Path) -> None:
    ckpt, prefix = source
    moved = tmp_path / "moved"
    moved.mkdir()
    paths = [path for split in ("train", "valid") for path in shard_paths(prefix, split)]
    for path in paths:
        path.rename(moved / path.name)
    try:
        p = plan(["--init-from", str(ckpt), "--hyperclone", "2", "--run-dir", str(tmp_path / "run")])
    finally:
        for path in paths:
            (moved / path.name).rename(path)
    assert p.data.build and p.data.prefix == tmp_path / "run" / "data" / "corpus"
    assert p.cfg.train == SMALL_TRAIN  # the rest is still inherited
    assert any("the source run's token shards" in w and "are gone" in w for w in p.warnings)


def test_settings_record_holds_the_absolute_shard_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    record = settings_record(RunConfig(), Path("runs/x/data/corpus"))
    assert record["data"]["data_prefix"] == str(tmp_path / "runs" / "x" / "data" / "corpus")
    assert set(record) == {"train", "data", "checkpoint"} and "save" not in record["checkpoint"]
