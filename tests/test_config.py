"""Bad configurations fail before any work, naming the key and the constraint."""

from __future__ import annotations

import pytest

from megaclone.config import ConfigError, ModelConfig, ParallelConfig, load_run_config


def test_unknown_key_named(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden_size: 64\n  hiden_layers: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.*hiden_layers"):
        load_run_config(path)


def test_unknown_section_named(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="optimiser"):
        load_run_config(path)


def test_missing_file_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_run_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, where", [
    ("model:\n  hidden_size: 64\n   num_layers: 2\n", ":3:14: YAML syntax error: mapping values are not allowed here"),
    ("model: {hidden_size: 64\n", ":2:1: YAML syntax error: expected ',' or '}', but got '<stream end>'"),
    ("model:\n\thidden_size: 64\n", ":2:1: YAML syntax error: found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_error_names_file_line_column(tmp_path, text: str, where: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert str(e.value).startswith(f"{path}{where}")
    with pytest.raises(ConfigError, match=r"--set 'train.lr=\[3e-4':1:6: YAML syntax error: expected ',' or ']'"):
        load_run_config(None, ["train.lr=[3e-4"])


def test_overrides_apply_and_validate() -> None:
    cfg = load_run_config(None, ["model.hidden_size=64", "model.num_heads=4", "train.lr=3e-4"])
    assert cfg.model.hidden_size == 64 and cfg.model.head_size == 16 and cfg.train.lr == 3e-4
    with pytest.raises(ConfigError, match="model.activation"):
        load_run_config(None, ["model.activation=tanh"])


@pytest.mark.parametrize(("model", "parallel", "match"), [
    (dict(num_heads=4, num_query_groups=2), dict(tp_size=4), r"num_query_groups=2.*tp_size=4"),
    (dict(vocab_multiple=6), dict(tp_size=4), r"padded vocabulary.*tp_size=4"),
    (dict(), dict(pp_size=2, zero_stage=3), r"zero_stage=3.*pp_size=2"),
    (dict(num_layers=1), dict(pp_size=2), r"num_layers=1.*pp_size=2"),
])
def test_layout_constraints(model: dict, parallel: dict, match: str) -> None:
    cfg = ModelConfig(vocab_size=100, hidden_size=32, num_heads=4, **{k: v for k, v in model.items()
                                                                      if k != "num_heads"})
    with pytest.raises(ConfigError, match=match):
        ParallelConfig(**parallel).validate(cfg)


def test_world_size_must_divide() -> None:
    with pytest.raises(ConfigError, match=r"world size 3.*2 x 1"):
        ParallelConfig(tp_size=2).validate(world_size=3)


def test_padded_vocab_independent_of_tp() -> None:
    cfg = ModelConfig(vocab_size=1000, vocab_multiple=128)
    assert cfg.padded_vocab_size == 1024


def test_value_types_checked(tmp_path) -> None:
    path = tmp_path / "types.yaml"
    path.write_text("train:\n  lr: 3e-4\n  micro_batch_size: two\n")
    with pytest.raises(ConfigError, match=r"train.micro_batch_size='two': expected int"):
        load_run_config(path)
    path.write_text("train:\n  lr: 3e-4\n")
    assert load_run_config(path).train.lr == 3e-4


def test_zero0_pipeline_clipping_refused() -> None:
    with pytest.raises(ConfigError, match=r"zero_stage=0 with parallel.pp_size=2"):
        load_run_config(None, ["parallel.pp_size=2", "parallel.zero_stage=0"]).validate()
    load_run_config(None, ["parallel.pp_size=2", "parallel.zero_stage=0", "train.grad_clip=0"]).validate()


@pytest.mark.parametrize("values,match", [
    (dict(norm_placement="sandwich"), r"model.norm_placement='sandwich'"),
    (dict(parallel_residual=True, norm_placement="post"), "parallel_residual=True needs model.norm_placement='pre'"),
    (dict(norm_unit_offset=True, norm_affine=False), "norm_unit_offset=True needs model.norm_affine=True"),
    (dict(position_offset=2), r"position_offset=2 .*position='learned' \(got 'rope'\)"),
    (dict(position="learned", position_offset=-1), "position_offset=-1 must be >= 0"),
    (dict(embed_size=0), "model.embed_size=0 must be a positive integer"),
    (dict(activation="reglu"), r"model.activation='reglu'"),
])
def test_family_options_validate(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**values)


def test_family_option_properties() -> None:
    assert ModelConfig(activation="geglu", hidden_size=96, num_heads=4).ffn_size == 256  # gated: 8/3 d, rounded
    opt = ModelConfig(hidden_size=64, num_heads=4, embed_size=32)
    assert opt.has_projections and opt.embedding_size == 32
    assert not ModelConfig(hidden_size=64, num_heads=4, embed_size=64).has_projections
    assert ModelConfig().embedding_size == 128 and ModelConfig(activation="relu").ffn_size == 512
