"""No parameter is initialised and then overwritten (issue 20): an instrumented build of each starting point.

A torch dispatch mode records every storage an operator writes while `build_start_model` builds this rank's module
and fills it. A cloned launch (`--init-from`) and a weight-only `--load` write each parameter exactly once; an exact
`--load` writes none (DeepSpeed's load fills the engine later); a new run writes each once, from the spec table.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megaclone.convert import ConvertOptions, convert_checkpoint
from megaclone.parallel import Layout, TPRNGTracker
from megaclone.train.cli import build_plan, parse_args
from megaclone.train.run import build_start_model
from tests.train.conftest import TINY, SmallRun


class StorageWrites(TorchDispatchMode):
    """Counts, per storage, the operators that write into it (in place or as `out=`)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: Counter[int] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for position, spec in enumerate(func._schema.arguments):
            value = kwargs.get(spec.name, args[position] if position < len(args) else None)
            if spec.alias_info is not None and spec.alias_info.is_write and isinstance(value, torch.Tensor):
                self.writes[value.untyped_storage().data_ptr()] += 1
        return func(*args, **kwargs)


def writes_per_parameter(argv: list[str], world_size: int, tp_rank: int = 0) -> dict[str, int]:
    plan = build_plan(parse_args(argv), world_size)
    tp = plan.cfg.parallel.tp_size
    layout = Layout(tp_size=tp, tp_rank=tp_rank, world_size=world_size, dp_size=world_size // tp)
    with StorageWrites() as log:
        module, _ = build_start_model(plan, layout, TPRNGTracker(0, tp_rank))
    return {name: log.writes[p.untyped_storage().data_ptr()] for name, p in module.named_parameters()}


def test_each_parameter_is_written_once_or_never(small_run: SmallRun, tmp_path: Path) -> None:
    data = ["--run-dir", str(tmp_path), *small_run.data_args()]
    cloned = writes_per_parameter(["--init-from", str(small_run.ckpt), "--hyperclone", "2", *data], 1)
    exact = writes_per_parameter(["--load", str(small_run.ckpt), *data], 2, tp_rank=1)
    weights = convert_checkpoint(ConvertOptions(input=small_run.ckpt, output=tmp_path / "weights", tp_size=1,
                                                progress=False)).output
    weight_only = writes_per_parameter(["--load", str(weights), "--config", str(TINY), *data], 1)
    fresh = writes_per_parameter(["--config", str(TINY), *data], 1)
    assert len(cloned) == len(exact) == len(weight_only) == len(fresh) > 10
    assert set(cloned.values()) == {1}, cloned  # the widened slice, copied in once
    assert set(exact.values()) == {0}, exact  # DeepSpeed's load_checkpoint writes them, after the engine exists
    assert set(weight_only.values()) == {1}, weight_only
    assert set(fresh.values()) == {1}, fresh  # the spec-table init, once


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_layers_leave_their_parameters_unfilled(norm: str) -> None:
    """The building blocks do not initialise themselves (the writes above would count it)."""
    from megaclone.config import ModelConfig
    from megaclone.model import GPT

    cfg = ModelConfig(vocab_size=64, vocab_multiple=64, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=8,
                      norm=norm, position="learned")
    with StorageWrites() as log:
        model = GPT(cfg)
    assert not any(log.writes[p.untyped_storage().data_ptr()] for p in model.parameters())
