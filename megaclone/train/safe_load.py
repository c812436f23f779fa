"""DeepSpeed's state files without unpickling: `torch.load(weights_only=True)` with DeepSpeed's own types allowed.

DeepSpeed loads its checkpoint files with `torch.load(..., weights_only=False)`, which runs whatever a pickle
asks for: a checkpoint from elsewhere could run code. Every file on the `--load` path (model states, ZeRO
optimizer partitions, the pipeline's per-layer files, at ZeRO 0-3, fp32 and bf16) is read through the engine's
`checkpoint_engine`, so `install_weights_only_loader` wraps that engine with one whose `load` is `load_torch_file`.
Besides tensors and plain containers, DeepSpeed writes three types of its own (seen in checkpoints of every
stage with DeepSpeed 0.19); they are allowed by name, and a file that needs any other type is refused with the
file and the type named.
"""

from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from megaclone.checkpoint import CheckpointError

# Non-tensor types in DeepSpeed's state files: the ZeRO / bf16 optimizers' loss scaler, the ZeRO stage and the
# parameter-fragment addresses of their partitions.
DEEPSPEED_TYPES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _allowed_types() -> list[Any]:
    types = []
    for qualified in DEEPSPEED_TYPES:
        module, _, name = qualified.rpartition(".")
        types.append((getattr(importlib.import_module(module), name), qualified))
    return types


def load_torch_file(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` with DeepSpeed's types allowed; anything else is a CheckpointError
    naming the file and the type. `mmap`: map the tensors instead of reading them (a cheap full check)."""
    try:
        with torch.serialization.safe_globals(_allowed_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED.search(str(e))
        what = f"the type {found.group(1)}" if found else "an operation of the weights-only unpickler"
        raise CheckpointError(f"{path}: refused to load: it needs {what}, which is not one of the types DeepSpeed "
                              f"writes ({', '.join(DEEPSPEED_TYPES)}); a checkpoint file must never run code, so "
                              f"this one was not unpickled") from None
    except (RuntimeError, OSError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable torch checkpoint file (truncated or damaged?): {first}") from e


class WeightsOnlyLoads:
    """A DeepSpeed checkpoint engine whose `load` is `load_torch_file`; everything else (saving) is the wrapped
    engine's. DeepSpeed calls the engine only through its methods, so the wrapper stands in for any of them."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_torch_file(path, map_location=map_location)


def install_weights_only_loader(engine: Any) -> None:
    """Make every state file `engine.load_checkpoint` reads go through `load_torch_file`."""
    if not isinstance(engine.checkpoint_engine, WeightsOnlyLoads):
        engine.checkpoint_engine = WeightsOnlyLoads(engine.checkpoint_engine)
