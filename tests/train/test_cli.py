"""Bad launches fail before any work: the plan names the key or file and the constraint, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaclone.checkpoint import write_weights_checkpoint
from megaclone.config import ModelConfig
from megaclone.model import ReferenceGPT, init_params
from megaclone.train.cli import build_plan, parse_args
from megaclone.train.run import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def plan(argv: list[str], world_size: int = 1):
    return build_plan(parse_args(argv), world_size)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weight-only checkpoint of the tiny model (random weights): enough for every planning check."""
    cfg = ModelConfig(vocab_size=512, vocab_multiple=64, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64)
    model = ReferenceGPT(cfg)
    init_params(dict(model.named_parameters()), cfg, seed=0)
    state = {n: p.detach() for n, p in model.named_parameters()}
    root = tmp_path_factory.mktemp("small_ckpt")
    return write_weights_checkpoint(root, cfg, state, tp_size=2, pp_size=1)


def test_good_plan_resolves_vocab_and_layout(tmp_path: Path) -> None:
    p = plan(["--config", TINY, "--tp", "2", "--run-dir", str(tmp_path / "run")], world_size=4)
    assert p.cfg.model.vocab_size == 512  # data.vocab_size: the tokenizer is trained on the fly
    assert (p.cfg.parallel.tp_size, p.cfg.model.padded_vocab_size) == (2, 512)
    assert p.data.build and p.data.prefix == tmp_path / "run" / "data" / "corpus"
    assert not (tmp_path / "run").exists()  # planning writes nothing


@pytest.mark.parametrize("argv, world, message", [
    (["--tp", "3"], 3, r"model.num_query_groups=4 \(num_heads=4\) must be divisible by parallel.tp_size=3"),
    (["--tp", "2", "--set", "model.vocab_multiple=513"], 2,
     r"padded vocabulary 513 \(model.vocab_multiple=513\) must be divisible by parallel.tp_size=2"),
    (["--pp", "2", "--zero-stage", "3"], 2, r"parallel.zero_stage=3 cannot be combined with parallel.pp_size=2"),
    (["--set", "train.lerning_rate=3e-4"], 1,  # the flag's mistake, named as such (not as one of tiny.yaml's keys)
     r"^--set train.lerning_rate=3e-4: unknown key 'lerning_rate' in section 'train'; known keys: \['adam_eps'"),
    (["--set", "optimizer.lr=1"], 1, r"^--set optimizer.lr=1: unknown section 'optimizer'; known: \['checkpoint'"),
    (["--tp", "2"], 3, r"world size 3 is not divisible by parallel.tp_size x parallel.pp_size = 2 x 1"),
    (["--set", "data.seq_len=128"], 1, r"data.seq_len=128 exceeds model.max_seq_len=64"),
    (["--set", "model.vocab_size=100"], 1, r"model.vocab_size=100 is smaller than the tokenizer's vocabulary 512"),
])
def test_bad_config_names_key(argv: list[str], world: int, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        plan(["--config", TINY, "--run-dir", str(tmp_path / "run"), *argv], world_size=world)
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_yaml_names_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  hidden_size: 64\n  num_layer: 2\n")
    with pytest.raises(ValueError, match=rf"{config}: model: unknown key\(s\) \['num_layer'\]"):
        plan(["--config", str(config)])


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config file .*nope.yaml does not exist"):
        plan(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(FileNotFoundError, match=rf"token shard file {tmp_path}/shards_train.bin does not exist"):
        plan(["--config", TINY, "--set", f"data.data_prefix={tmp_path}/shards"])
    with pytest.raises(FileNotFoundError, match=r"tokenizer model .*missing.model does not exist"):
        plan(["--config", TINY, "--set", f"data.tokenizer={tmp_path}/missing.model"])


def test_load_of_another_model_fails_before_work(small_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"different model .*model.hidden_size: checkpoint 64 != run 32"):
        plan(["--config", TINY, "--load", str(small_ckpt.parent), "--set", "model.hidden_size=32"])
    (tmp_path / "notes.txt").write_text("not a checkpoint root")  # an empty one starts from scratch (test_resume)
    with pytest.raises(ValueError, match=r"not a megaclone checkpoint \(no manifest.json"):
        plan(["--config", TINY, "--load", str(tmp_path)])


def test_resume_needs_the_saved_layout(small_ckpt: Path, tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(small_ckpt, tmp_path / "ds" / small_ckpt.name)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["deepspeed"] = "deepspeed"  # as if written by training at TP=2, ZeRO-1
    manifest["layout"].update(tp_size=2, zero_stage=1)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"exact resume needs the layout .*tp_size: checkpoint 2 != run 1"):
        plan(["--load", str(ckpt)], world_size=2)
    assert plan(["--load", str(ckpt), "--tp", "2"], world_size=2).resume.deepspeed == "deepspeed"


def test_load_without_config_takes_the_checkpoint_model(small_ckpt: Path, tmp_path: Path) -> None:
    p = plan(["--load", str(small_ckpt.parent), "--run-dir", str(tmp_path / "run")])
    assert p.cfg.model.hidden_size == 64 and p.cfg.data.seq_len == 64  # seq_len clamped to the model's
    assert p.data.tokenizer is None and p.resume is not None and p.resume.deepspeed is None
    p = plan(["--load", str(small_ckpt.parent), "--set", "model.dropout=0.2"])  # training-time options may change
    assert (p.cfg.model.hidden_size, p.cfg.model.dropout) == (64, 0.2)
    with pytest.raises(ValueError, match=r"model.num_layers: checkpoint 2 != run 3"):
        plan(["--load", str(small_ckpt.parent), "--set", "model.num_layers=3"])


def test_main_reports_error_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, save = tmp_path / "run", tmp_path / "ckpt"
    code = main(["--config", TINY, "--pp", "2", "--zero-stage", "2", "--run-dir", str(run_dir), "--save", str(save)])
    assert code == 2
    assert "pretrain.py: error: parallel.zero_stage=2 cannot be combined" in capsys.readouterr().err
    assert not run_dir.exists() and not save.exists()


@pytest.mark.parametrize("case", ["save is a file", "save under a file", "save unwritable", "run dir under a file",
                                  "yaml syntax"])
def test_bad_paths_and_yaml_exit_2_before_any_work(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Found while planning, not at the first save after all the steps ran; nothing is created."""
    a_file, broken = tmp_path / "a_file", tmp_path / "broken.yaml"
    a_file.write_text("x")
    broken.write_text("model:\n  hidden_size: 64\n   num_layers: 2\n")
    save, run_dir, config = tmp_path / "ckpt", tmp_path / "run", TINY
    sysfs = Path("/sys/megaclone-ckpt")  # no process, root included, may create entries in sysfs
    if case == "save is a file":
        save, message = a_file, f"--save (checkpoint.save) {a_file} is a file"
    elif case == "save under a file":
        save, message = a_file / "ckpt", f"--save (checkpoint.save) {a_file}/ckpt lies under {a_file}, which is a file"
    elif case == "save unwritable":
        save, message = sysfs, f"--save (checkpoint.save) {sysfs}: cannot write in /sys"
    elif case == "run dir under a file":
        run_dir, message = a_file / "run", f"--run-dir (run_dir) {a_file}/run lies under {a_file}, which is a file"
    else:
        config, message = broken, f"{broken}:3:14: YAML syntax error: mapping values are not allowed here"
    assert main(["--config", str(config), "--run-dir", str(run_dir), "--save", str(save)]) == 2
    assert f"pretrain.py: error: {message}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "broken.yaml"]
    assert a_file.read_text() == "x" and not sysfs.exists()


# --- cloning at launch -----------------------------------------------------------------------------------------


def symmetry_warnings(p) -> list[str]:
    return [w for w in p.warnings if "without symmetry breaking" in w]


def test_clone_plan_widens_source(small_ckpt: Path, tmp_path: Path) -> None:
    p = plan(["--init-from", str(small_ckpt), "--hyperclone", "2", "--hyperclone-ffn", "3", "--tp", "4",
              "--clone-noise-db", "10", "--run-dir", str(tmp_path / "run")], world_size=4)
    wide = p.cfg.model
    assert (wide.hidden_size, wide.num_heads, wide.num_query_groups, wide.head_size, wide.ffn_size) == \
        (128, 8, 8, 16, 768)
    assert p.clone.provenance()["hyperclone"]["factor"] == 2 and p.cfg.data.seq_len == 64
    assert not symmetry_warnings(p)  # noise breaks the symmetry


def test_clone_defaults_and_the_warning_without_symmetry_breaking(small_ckpt: Path) -> None:
    """--hyperclone alone uses the measured best variant and noise; turned off (flag or config), it warns."""
    from megaclone.config import HYPERCLONE_DEFAULTS

    p = plan(["--init-from", str(small_ckpt), "--hyperclone", "2"])
    assert (p.cfg.clone.variant, p.cfg.clone.noise_db) == (HYPERCLONE_DEFAULTS["variant"],
                                                           HYPERCLONE_DEFAULTS["noise_db"])
    assert HYPERCLONE_DEFAULTS["noise_db"] is not None and not symmetry_warnings(p)
    for off in (["--clone-noise-db", "none"], ["--set", "clone.noise_db=null"]):
        p = plan(["--init-from", str(small_ckpt), "--hyperclone", "2", "--clone-variant", "symmetric", *off])
        assert (p.cfg.clone.variant, p.cfg.clone.noise_db) == ("symmetric", None)
        assert symmetry_warnings(p)
    p = plan(["--init-from", str(small_ckpt), "--hyperclone", "2", "--clone-noise-db", "none", "--set",
              "model.dropout=0.1"])
    assert p.cfg.model.dropout == 0.1 and not symmetry_warnings(p)
    with pytest.raises(SystemExit):
        plan(["--init-from", str(small_ckpt), "--hyperclone", "2", "--clone-noise-db", "loud"])


@pytest.mark.parametrize("argv, message", [
    (["--hyperclone", "2"], r"clone.factor \(--hyperclone\) and clone.grow_layers \(--grow-layers\) need "
                            r"clone.init_from \(--init-from\)"),
    (["--grow-layers", "8"], r"need clone.init_from \(--init-from\)"),
    (["--init-from", "{ckpt}", "--hyperclone", "1"], r"clone.factor \(--hyperclone\) = 1 keeps the width"),
    (["--init-from", "{ckpt}", "--hyperclone", "2", "--hyperclone-groups", "3"],
     r"clone.groups_factor \(--hyperclone-groups\) = 3: expected a divisor of clone.factor"),
    (["--init-from", "{ckpt}"], r"--init-from needs --hyperclone"),
    (["--init-from", "{ckpt}", "--hyperclone", "2", "--set", "model.hidden_size=32"],
     r"--set model.hidden_size: cannot be set for a cloned run"),
    (["--init-from", "{ckpt}", "--hyperclone", "2", "--train-iters", "0"], r"--train-iters 0 .* give --save"),
    (["--init-from", "{ckpt}", "--hyperclone", "2", "--load", "{ckpt}"], r"--load and --init-from exclude"),
])
def test_bad_clone_flags(argv: list[str], message: str, small_ckpt: Path) -> None:
    with pytest.raises(ValueError, match=message):
        plan([a.format(ckpt=small_ckpt) for a in argv])


@pytest.mark.parametrize("flag", ["--hyperclone", "--hyperclone-groups", "--grow-layers"])
@pytest.mark.parametrize("factor, shown", [("0", "0"), ("1.5", "'1.5'"), ("two", "'two'"), ("-2", "-2")])
def test_clone_factor_must_be_positive_integer(flag: str, factor: str, shown: str,
                                               capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--init-from", "x", f"{flag}={factor}"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got {shown}" in capsys.readouterr().err


def test_clone_groups_not_divisible_by_target_tp(small_ckpt: Path) -> None:
    with pytest.raises(ValueError, match=r"after growing .* x2 .*num_query_groups=8 .*parallel.tp_size=3"):
        plan(["--init-from", str(small_ckpt), "--hyperclone", "2", "--tp", "3"], world_size=3)


def test_growth_plan(small_ckpt: Path, tmp_path: Path) -> None:
    """--grow-layers, --hyperclone 1 --hyperclone-ffn and --hyperclone-groups reach the plan and its provenance."""
    p = plan(["--init-from", str(small_ckpt), "--grow-layers", "5", "--hyperclone", "1", "--hyperclone-ffn", "2",
              "--pp", "2", "--run-dir", str(tmp_path / "run")], world_size=2)
    assert (p.cfg.model.num_layers, p.cfg.model.hidden_size, p.cfg.model.ffn_size) == (5, 64, 512)
    assert p.clone.depth.sources == (0, 0, 1, 1, 1) and p.clone.depth.preserving
    record = p.clone.provenance()["hyperclone"]
    assert (record["factor"], record["ffn_factor"], record["grow_layers"], record["grow_method"]) == (1, 2, 5, "zero")
    assert record["depth"]["inserted"] == [1, 3, 4]
    p = plan(["--init-from", str(small_ckpt), "--grow-layers", "4", "--grow-method", "stack"])
    assert p.cfg.model.num_layers == 4 and not p.clone.depth.preserving and p.clone.factors == (1, 1)
    assert p.cfg.clone.variant == "diagonal"  # the launch defaults, as the converter's
    p = plan(["--init-from", str(small_ckpt), "--hyperclone", "2", "--hyperclone-groups", "1"])
    assert (p.cfg.model.num_heads, p.cfg.model.num_query_groups, p.cfg.model.hidden_size) == (8, 4, 128)
    with pytest.raises(ValueError, match=r"after growing .*2 -> 3 layers by zero: model.num_layers=3 must be >= "
                                         r"parallel.pp_size=4"):
        plan(["--init-from", str(small_ckpt), "--grow-layers", "3", "--pp", "4"], world_size=4)


@pytest.mark.parametrize("argv, message", [
    (["--grow-layers", "2"], "--grow-layers) = 2: the target number of layers must exceed the source's 2"),
    (["--grow-layers", "3", "--grow-method", "stack"], "--grow-layers 3 must be a multiple of the source's 2"),
    (["--hyperclone", "2", "--grow-method", "interleave"], "--grow-method) = 'interleave' needs clone.grow_layers"),
    (["--hyperclone", "2", "--hyperclone-groups", "1", "--hyperclone-optimizer", "carry"],
     "(--hyperclone-groups) = 1 < 2: the k and v rows"),
])
def test_bad_growth_flags_write_nothing(argv: list[str], message: str, small_ckpt: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    run_dir, save = tmp_path / "run", tmp_path / "save"
    code = main(["--init-from", str(small_ckpt), *argv, "--run-dir", str(run_dir), "--save", str(save)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists() and not save.exists()


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_clone_sources_write_nothing(small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    not_ckpt = tmp_path / "empty"
    not_ckpt.mkdir()
    unknown = _copy_checkpoint(small_ckpt, tmp_path / "v99" / small_ckpt.name)
    manifest = json.loads((unknown / "manifest.json").read_text())
    manifest["format_version"] = 99
    (unknown / "manifest.json").write_text(json.dumps(manifest))
    corrupt = _copy_checkpoint(small_ckpt, tmp_path / "corrupt" / small_ckpt.name)
    shard = corrupt / "weights" / "tp01-pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x7f" * 8  # same size, different tensor bytes
    shard.write_bytes(bytes(data))
    cases = [(not_ckpt, "not a megaclone checkpoint"), (tmp_path / "missing", "does not exist"),
             (unknown, "unknown format_version 99"), (corrupt, f"checksum mismatch for {shard}")]
    for source, message in cases:
        run_dir, save = tmp_path / "run", tmp_path / "save"
        code = main(["--init-from", str(source), "--hyperclone", "2", "--run-dir", str(run_dir), "--save", str(save)])
        assert code == 2, source
        assert message in capsys.readouterr().err
        assert not run_dir.exists() and not save.exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_argparse_speaks_from_rank_0_only(rank: int, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """Under a launcher every rank parses the same command line: a bad flag is reported once, not once per rank."""
    import megaclone.train.run as run_module

    monkeypatch.setattr(run_module, "RANK0_REPORT_WAIT_S", 0.0)
    for key, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(key, str(value))
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", TINY, "--lerning-rate", "3e-4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("pretrain.py: error: unrecognized arguments: --lerning-rate 3e-4" in err) == (rank == 0)
    assert ("usage: pretrain.py" in err) == (rank == 0)


def test_the_start_line_says_what_the_run_starts_from(small_ckpt: Path, tmp_path: Path) -> None:
    from megaclone.train.run import describe_start

    run = ["--run-dir", str(tmp_path / "run")]
    assert describe_start(plan(["--init-from", str(small_ckpt), "--hyperclone", "2", *run])) == \
        f"start: the x2 HyperCloning widening (FFN x2) of {small_ckpt} (step 0), fresh optimizer, training after step 0"
    assert describe_start(plan(["--init-from", str(small_ckpt), "--grow-layers", "3", *run])).startswith(
        f"start: the growth to 3 layers (zero) of {small_ckpt} (step 0)")
    assert describe_start(plan(["--load", str(small_ckpt), *run])) == \
        f"start: the weights of {small_ckpt} (step 0), a fresh optimizer from step 0 (the checkpoint holds no " \
        "optimizer state)"
    assert describe_start(plan(["--config", TINY, *run])) == "start: random initialisation (seed 1234)"
