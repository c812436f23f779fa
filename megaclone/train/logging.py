"""Training logs: console lines, a tqdm bar and a JSONL file on rank 0, TensorBoard when installed.

Every record is one JSON object per line in `<run_dir>/metrics.jsonl` (appended, so a resumed run
continues the same file); tests and tools read losses from there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger("megaclone.train")

# Dense bf16 peak FLOP/s per device, for MFU (unknown devices report no MFU).
_PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def setup_console_logging(rank: int) -> None:
    """INFO lines from rank 0 only; warnings and errors from every rank (prefixed with it)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("megaclone")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def quiet_libraries() -> None:
    """Keep DeepSpeed's and torch's lines that tell a user nothing off the console: DeepSpeed's accelerator guess
    on a CPU machine (megaclone picks gloo there itself), its INFO lines, and the FutureWarning torch raises, once
    per rank, when DeepSpeed's ZeRO calls the deprecated all_gather_into_tensor. Call before DeepSpeed is imported."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def peak_flops(device_name: str) -> float | None:
    for key, value in _PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def model_flops_per_token(num_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12 L d s for attention scores (PaLM appendix B)."""
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


def process_start_time() -> float | None:
    """Wall-clock time at which this process started (Linux: /proc, 10 ms resolution); None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Where the time to the first step goes: seconds per start-up phase on this rank, logged once.

    `lap(name)` charges the time since the previous lap to `name`; the first phase, `python`, runs from the
    process's start (interpreter, imports) to the clock's creation.
    """

    def __init__(self) -> None:
        self.process_start = process_start_time()
        self._last = time.time()
        self.phases: dict[str, float] = {}
        if self.process_start is not None:
            self.phases["python"] = max(0.0, self._last - self.process_start)

    def lap(self, name: str) -> None:
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now

    def record(self) -> dict[str, Any]:
        return {"phases": {k: round(v, 3) for k, v in self.phases.items()}, "process_start": self.process_start}
HEARTBEAT_S = 10.0  # a step's line goes to the console at least this often, whatever train.log_interval says


class MetricsLogger:
    """Rank 0 writes; every other rank holds a logger that does nothing, so callers need no rank checks."""

    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._bar = None
        self._tb = None
        self._last_line = time.monotonic()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         disable=None, file=sys.stderr)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None

    def event(self, kind: str, step: int, **values: Any) -> None:
        """Append one record {"event": kind, "step": step, "time": ..., **values}."""
        if not self.enabled:
            return
        record = {"event": kind, "step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def train_step(self, step: int, values: dict[str, Any], console: bool) -> None:
        """Record a step; its line goes to the console when `console`, or when the last line is HEARTBEAT_S old
        (a slow machine, or a long log_interval, never leaves the console silent)."""
        self.event("train", step, **values)
        if not self.enabled:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
        if console or time.monotonic() - self._last_line >= HEARTBEAT_S:
            text = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            self._bar.write(f"step {step}: {text}", file=sys.stdout)
            sys.stdout.flush()  # visible at once when stdout is a file or a pipe
            self._last_line = time.monotonic()

    def info(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
            sys.stdout.flush()
        else:
            log.info(message)
        self._last_line = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of `<run_dir>/metrics.jsonl`, optionally only those of one kind ("train", "eval", ...)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("event") == kind]
