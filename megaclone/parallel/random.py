"""Dropout randomness under tensor parallelism.

Activations inside a TP region (attention heads split across ranks) need a different dropout mask
on each TP rank; replicated activations (the residual stream) need the same mask on every TP rank.
The default generator is seeded identically across a TP group; `TPRNGTracker.fork()` switches to
a per-TP-rank stream for the split regions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class TPRNGTracker:
    """A second RNG stream, seeded per TP rank, swapped in around TP-split dropout."""

    def __init__(self, seed: int, tp_rank: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        saved = _get_state(self.device)
        torch.manual_seed(seed + 2718 + tp_rank)
        self.state = _get_state(self.device)
        _set_state(saved, self.device)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        saved = _get_state(self.device)
        _set_state(self.state, self.device)
        try:
            yield
        finally:
            self.state = _get_state(self.device)
            _set_state(saved, self.device)

    def state_dict(self) -> dict:
        return {"state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.state = state["state"]
