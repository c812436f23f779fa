"""README.md's training, HyperCloning, checkpoint and conversion examples run as written, in the order given, after
the demo: the commands are read from README.md itself, so the test breaks when the README drifts.

They run in a scratch directory that holds `launch/`, `configs/` and `tools/` of this checkout, with the session's tiny
small checkpoint (tests/train/conftest.py) standing in for the demo's `runs/demo/small/ckpt`, and the tiny corpus it
built standing in for `runs/tiny/data`. What is changed, and only this, to make them tiny:

    SUBSTITUTE   whole words: the 4-process example's configs/small.yaml becomes configs/tiny.yaml, and
                 path/to/llama a tiny random Llama written here
    FLAG_VALUES  a flag's value: the carry example's --train-iters 900 and --hyperclone-lr-transition 100 (the demo's
                 small run ends at step 600; the stand-in at step 30)
`deepspeed` runs as `python -m deepspeed.launcher.runner --master_port <free port>` and `python` as this interpreter.
Every substitution must be used, so that the table cannot outlive the README line it was made for.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import LAUNCH_TIMEOUT, LAUNCHER_VARS, ROOT, SmallRun, _free_port

DEMO_SMALL_CKPT = "runs/demo/small/ckpt"
SECTIONS = ("Training", "HyperCloning", "Checkpoints")  # the sections whose examples run on one machine
FLAG_VALUES = {("--train-iters", "900"): "40", ("--hyperclone-lr-transition", "100"): "5"}


def readme_examples() -> list[tuple[str, str]]:
    """(language, code) of every bash or python block under SECTIONS, in README order; bash as one command per item
    (continuation lines joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    examples = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        if section.split("\n", 1)[0].strip() not in SECTIONS:
            continue
        for language, code in re.findall(r"^```(bash|python)\n(.*?)^```", section, flags=re.M | re.S):
            if language == "python":
                examples.append((language, code))
                continue
            for line in code.replace("\\\n", " ").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    examples.append((language, line))
    return examples


def _command(line: str, substitute: dict[str, str], used: set) -> list[str]:
    words = shlex.split(line, comments=True)
    for i, word in enumerate(words):
        if word in substitute:
            words[i] = substitute[word]
            used.add(word)
        if i and (words[i - 1], word) in FLAG_VALUES:
            words[i] = FLAG_VALUES[(words[i - 1], word)]
            used.add((words[i - 1], word))
    if words[0] == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(_free_port()), *words[1:]]
    assert words[0] == "python", f"README example {line!r}: expected deepspeed or python"
    return [sys.executable, *words[1:]]


def test_the_demo_writes_the_checkpoint_the_examples_read() -> None:
    demo = (ROOT / "launch" / "demo.sh").read_text()
    assert "RUN=${RUN:-runs/demo}" in demo and '--save "$RUN/small/ckpt"' in demo
    readme = (ROOT / "README.md").read_text()
    assert f"--init-from {DEMO_SMALL_CKPT}" in readme
    generate = (ROOT / "tools" / "generate.py").read_text()  # its --help shows the module docstring
    assert re.search(r"--ckpt (\S+)", generate).group(1) == DEMO_SMALL_CKPT


def test_readme_examples_run_in_order(small_run: SmallRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.hf.helpers import save_hf_model

    work = tmp_path / "work"
    for name in ("launch", "configs", "tools"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).symlink_to(ROOT / name)
    (work / DEMO_SMALL_CKPT).parent.mkdir(parents=True)
    (work / DEMO_SMALL_CKPT).symlink_to(small_run.ckpt)
    (work / "runs" / "tiny").mkdir()
    (work / "runs" / "tiny" / "data").symlink_to(small_run.data_prefix.parent)  # the same tiny corpus, built once
    llama = tmp_path / "llama"
    save_hf_model("llama", llama)
    substitute = {"configs/small.yaml": "configs/tiny.yaml", "path/to/llama": str(llama)}
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(ROOT)
    used: set = set()
    outputs = []
    for language, code in readme_examples():
        if language == "python":
            monkeypatch.chdir(work)
            namespace: dict = {}
            exec(compile(code, "README.md", "exec"), namespace)
            logits, cfg = namespace["logits"], namespace["cfg"]
            assert tuple(logits.shape) == (*namespace["tokens"].shape, cfg.padded_vocab_size)
            outputs.append(("python block", ""))
            continue
        cmd = _command(code, substitute, used)
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README example failed ({proc.returncode}): {code}\n{output[-5000:]}"
        outputs.append((code, output))
    assert used == set(substitute) | set(FLAG_VALUES), "a substitution no README line needs any more"

    def output_of(pattern: str) -> str:
        (found,) = [out for code, out in outputs if re.search(pattern, code)]
        return found

    for code, output in outputs:  # DeepSpeed's and torch's noise stays off the ranks' console
        if code.startswith("deepspeed"):
            assert "FutureWarning" not in output and "built successfully" not in output, code
            assert output.count("Setting accelerator to CPU") <= 2, code  # the launcher's own processes, not ranks
    exact = output_of(r"--tp 2 --load runs/tiny/ckpt")
    assert "start: resuming" in exact and "exactly (DeepSpeed's own state" in exact
    elastic = output_of(r"--zero-stage 2 --load runs/tiny/ckpt")
    start = elastic.index("start: resuming")  # said at start, before the model is built and trained
    assert "through the layout-free path" in elastic[start:].splitlines()[0]
    assert start < re.search(r"^step \d+:", elastic, flags=re.M).start()
    cloned = output_of(r"--run-dir runs/wide --save runs/wide/ckpt")
    assert re.search(r"settings from the source checkpoint \S+: train\.\*", cloned)  # the small run's, inherited
    assert "step 30:" in cloned and "step 31:" not in cloned  # its train_iters among them
    assert "PASS: the large model computes the small model's function" in output_of(r"verify_clone")
    assert (work / "runs" / "wide-tp4" / "latest").is_file() and (work / "runs" / "llama" / "latest").is_file()
    assert (work / "runs" / "wide0" / "ckpt" / "step_00000000" / "manifest.json").is_file()
