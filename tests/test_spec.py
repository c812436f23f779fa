"""The parameter-spec table: shapes match the model, TP shards tile the tensor, stages cover layers."""

from __future__ import annotations

import pytest
import torch

from megaclone.config import ModelConfig
from megaclone.model import GPT, ReferenceGPT
from megaclone.parallel import TPGroup
from megaclone.rng import counter_normal
from megaclone.spec import ParamSpec, build_param_specs, stage_layer_range, stages_of

ARCHS = [dict(), dict(activation="swiglu", norm="rmsnorm", position="learned", bias=False, tied_embeddings=False,
                      num_query_groups=2),
         # OPT-350m and OLMo-2 / Gemma options: project_in / project_out, positions at an offset, no final norm;
         # QK-norm split over TP, norms without parameters
         dict(activation="relu", norm_placement="post", final_norm=False, position="learned", position_offset=2,
              embed_size=16, tied_embeddings=False),
         dict(activation="geglu", norm="rmsnorm", qk_norm=True, norm_unit_offset=True, num_query_groups=2,
              head_size=16),
         dict(norm_affine=False, qk_norm=True)]


def cfg_of(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, vocab_multiple=32, hidden_size=32, num_layers=3, num_heads=4,
                                 max_seq_len=16), **kw})


@pytest.mark.parametrize("kw", ARCHS)
def test_specs_match_reference_model(kw: dict) -> None:
    cfg = cfg_of(**kw)
    specs = {s.name: s.shape for s in build_param_specs(cfg)}
    model = {n: tuple(p.shape) for n, p in ReferenceGPT(cfg).named_parameters()}
    assert specs == model


@pytest.mark.parametrize("kw", ARCHS)
@pytest.mark.parametrize("tp", [1, 2])
def test_tp_shapes_match_sharded_model(kw: dict, tp: int) -> None:
    cfg = cfg_of(**kw)
    model = {n: tuple(p.shape) for n, p in GPT(cfg, TPGroup(None, tp, 0)).named_parameters()}
    assert {s.name: s.tp_shape(tp) for s in build_param_specs(cfg)} == model


def test_tp_ranges_tile_whole_units() -> None:
    cfg = cfg_of(num_query_groups=2, activation="swiglu")
    for spec in build_param_specs(cfg):
        if spec.tp_axis is None:
            continue
        axis = spec.axes[spec.tp_axis]
        ranges = [spec.tp_range(r, 2) for r in range(2)]
        assert ranges[0][0] == 0 and ranges[-1][1] == axis.size and ranges[0][1] == ranges[1][0]
        assert ranges[0][1] % axis.unit_size == 0


def test_roundtrip_dict() -> None:
    for spec in build_param_specs(cfg_of()):
        assert ParamSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(("layers", "pp"), [(3, 2), (4, 3), (5, 3), (2, 2)])
def test_stages_cover_every_layer_once(layers: int, pp: int) -> None:
    cfg = cfg_of(num_layers=layers, tied_embeddings=False)
    ranges = [stage_layer_range(cfg, pp, s) for s in range(pp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layers + 3
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    for spec in build_param_specs(cfg):
        assert len(stages_of(spec, cfg, pp)) == 1


def test_tied_embedding_on_first_and_last_stage() -> None:
    cfg = cfg_of()
    word = next(s for s in build_param_specs(cfg) if s.role == "embedding")
    assert stages_of(word, cfg, 2) == (0, 1) and stages_of(word, cfg, 1) == (0,)


def test_counter_normal_is_layout_invariant() -> None:
    full = counter_normal(7, "w", (64, 32))
    part = counter_normal(7, "w", (64, 32), (slice(16, 48), slice(8, 24)))
    assert torch.equal(full[16:48, 8:24], part)
    assert not torch.equal(full, counter_normal(8, "w", (64, 32)))
    assert abs(full.mean().item()) < 0.1 and abs(full.std().item() - 1) < 0.1
