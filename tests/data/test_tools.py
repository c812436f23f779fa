"""The command-line tools run from a checkout, write what they say, and fail on user errors with exit code 2."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from megaclone.data import Tokenizer, TokenShard

REPO = Path(__file__).resolve().parents[2]
TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog number {i * 7}" for i in range(200))


def run_tool(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_train_tokenizer_then_preprocess(tmp_path):
    inputs = []
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"document {i}\n{TEXT}", encoding="utf-8")
        inputs.append(str(tmp_path / f"{i}.txt"))
    done = run_tool("train_tokenizer.py", "--input", *inputs, "--output-prefix", "tok", "--vocab-size", "300",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert Tokenizer.load(tmp_path / "tok.model").vocab_size == 300
    done = run_tool("preprocess_data.py", "--input", *inputs, "--tokenizer", "tok.model", "--output-prefix", "out/d",
                    "--valid-fraction", "0.25", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    train, valid = (TokenShard.open(tmp_path / "out" / "d", split) for split in ("train", "valid"))
    assert (train.num_documents, valid.num_documents) == (3, 1)


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "tools" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, args, message", [
    ("preprocess_data.py", ["--input", "missing.txt", "--output-prefix", "d"], "missing.txt does not exist"),
    ("preprocess_data.py", ["--input", "in.txt", "--tokenizer", "absent.model", "--output-prefix", "d"],
     "absent.model does not exist"),
    ("preprocess_data.py", ["--input", "in.txt", "--output-prefix", "d", "--vocab-size", "300",
                            "--valid-fraction", "1.5"], "valid_fraction=1.5"),
    ("train_tokenizer.py", ["--input", "in.csv", "--output-prefix", "t"], "unsupported extension '.csv'"),
    ("train_tokenizer.py", ["--input", "in.txt", "--output-prefix", "t", "--vocab-size", "100000"],
     "vocab_size=100000"),
])
def test_user_errors_exit_2_with_a_message(tmp_path, monkeypatch, capsys, name, args, message):
    (tmp_path / "in.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "in.csv").write_text(TEXT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert load_tool(name).main(args) == 2
    err = capsys.readouterr().err
    assert f"{name}: error:" in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "in.txt"]  # nothing half-written
