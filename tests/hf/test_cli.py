"""tools/convert_hf.py runs from a checkout, converts both ways, and fails on user errors with exit code 2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from megaclone.checkpoint import load_model, read_manifest
from tests.hf.helpers import hf_load, hf_logits, sample_tokens, save_hf_model

REPO = Path(__file__).resolve().parents[2]


def load_cli():
    spec = importlib.util.spec_from_file_location("convert_hf", REPO / "tools" / "convert_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_then_export_from_the_command_line(tmp_path: Path, capsys) -> None:
    model = save_hf_model("qwen2", tmp_path / "hf")
    done = subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf.py"), "import", "--hf-dir", "hf",
                           "--output", "ckpt", "--tp", "2", "--pp", "2", "--vocab-multiple", "64"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "ckpt")
    assert (manifest.tp_size, manifest.pp_size, manifest.model.padded_vocab_size) == (2, 2, 128)
    ours, _ = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert (ours(sample_tokens()) - hf_logits(model, sample_tokens())).abs().max() <= 1e-5
    cli = load_cli()
    assert cli.main(["export", "--ckpt", str(tmp_path / "ckpt"), "--hf-dir", str(tmp_path / "out"),
                     "--dtype", "bfloat16"]) == 0
    assert "wrote Hugging Face model" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert hf_load(tmp_path / "out").model.embed_tokens.weight.dtype == torch.bfloat16


def test_user_errors_exit_2(tmp_path: Path, capsys) -> None:
    cli = load_cli()
    assert cli.main(["import", "--hf-dir", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    save_hf_model("gpt2", tmp_path / "hf")
    assert cli.main(["import", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["export", "--ckpt", str(tmp_path / "ckpt"), "--hf-dir", str(tmp_path / "o"),
                     "--family", "qwen2"]) == 2
    err = capsys.readouterr().err
    assert "convert_hf.py export: error: the qwen2 family cannot express this model" in err
    assert "norm='layernorm'" in err and not (tmp_path / "o").exists()


def test_new_families_from_the_command_line(tmp_path: Path, capsys) -> None:
    """OPT-350m's layout in and out at TP 2 x PP 2; Gemma-2 refused by the features it adds."""
    cli = load_cli()
    model = save_hf_model("opt_350m", tmp_path / "hf")
    assert cli.main(["import", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"), "--tp", "2",
                     "--pp", "2"]) == 0
    assert cli.main(["export", "--ckpt", str(tmp_path / "ckpt"), "--hf-dir", str(tmp_path / "out")]) == 0
    assert torch.equal(hf_logits(hf_load(tmp_path / "out"), sample_tokens()), hf_logits(model, sample_tokens()))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(config, model_type="gemma2")))
    capsys.readouterr()
    assert cli.main(["import", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt2")]) == 2
    assert "Gemma-2's sliding-window layers" in capsys.readouterr().err and not (tmp_path / "ckpt2").exists()
