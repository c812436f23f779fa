"""The console never stays silent through training: a step's line at least every HEARTBEAT_S seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaclone.train.logging import HEARTBEAT_S, MetricsLogger


def test_a_step_line_at_least_every_heartbeat(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=10)
    try:
        logger.train_step(1, {"loss": 5.0, "lr": 1e-3}, console=False)
        assert "step 1:" not in capsys.readouterr().out  # a fresh line was printed a moment ago
        logger._last_line -= HEARTBEAT_S  # as if the last line were HEARTBEAT_S old
        logger.train_step(2, {"loss": 4.9, "lr": 1e-3}, console=False)
        assert "step 2: loss=4.9" in capsys.readouterr().out
        logger.train_step(3, {"loss": 4.8, "lr": 1e-3}, console=False)
        assert "step 3:" not in capsys.readouterr().out
        logger.train_step(4, {"loss": 4.7, "lr": 1e-3}, console=True)  # log_interval's lines as before
        assert "step 4: loss=4.7" in capsys.readouterr().out
    finally:
        logger.close()
