"""Shared by the launches of the cluster tests: one tokenized copy of the bundled corpus per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from megaclone.data import prepare_data


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Token shards and a 512-piece tokenizer of the bundled corpus (configs/tiny.yaml's); returns the prefix."""
    prefix = tmp_path_factory.mktemp("cluster_data") / "corpus"
    prepare_data(prefix, vocab_size=512, seed=0)
    return prefix
