"""A clone computes the small model's function: fp32 logits agree to 1e-5 of max |logit|.

Grid: three architectures x n in {2, 3, 4} x m in {1, n} x {symmetric, diagonal} x noise {off, 10, -5 dB}.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megaclone.clone import VARIANTS, build_clone_shard, widen_model_config
from megaclone.config import CloneConfig
from tests.clone import ARCHS, FAMILY_ARCHS, build_model, dict_reader, random_small_state, small_config

TOLERANCE = 1e-5


@functools.cache
def small_case(arch: str):
    cfg = small_config(arch)
    state = random_small_state(cfg, seed=sorted([*ARCHS, *FAMILY_ARCHS]).index(arch))
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = build_model(cfg, state)(tokens)
    return cfg, state, tokens, logits


def clone_logits(arch: str, clone_cfg: CloneConfig, corrupt=None) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, state, tokens, logits = small_case(arch)
    wide = build_clone_shard(dict_reader(state), cfg, clone_cfg, tp_rank=0, tp_size=1)
    if corrupt is not None:
        corrupt(wide)
    wide_cfg = widen_model_config(cfg, clone_cfg.factor, clone_cfg.ffn_factor)
    with torch.no_grad():
        return build_model(wide_cfg, wide)(tokens), logits


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("noise_db", [None, 10.0, -5.0])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,m", [(2, 1), (2, 2), (3, 1), (3, 3), (4, 1), (4, 4)])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_clone_preserves_function(arch: str, n: int, m: int, variant: str, noise_db: float | None) -> None:
    clone_cfg = CloneConfig(factor=n, ffn_factor=m, variant=variant, noise_db=noise_db, seed=7)
    got, want = clone_logits(arch, clone_cfg)
    assert got.shape == want.shape
    assert relative_error(got, want) <= TOLERANCE


@pytest.mark.filterwarnings("ignore:the clone unties")
@pytest.mark.parametrize("noise_db", [None, 10.0])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n,m", [(2, 2), (3, 1)])
@pytest.mark.parametrize("arch", sorted(FAMILY_ARCHS))
def test_clone_of_family_options_preserves_function(arch: str, n: int, m: int, variant: str,
                                                    noise_db: float | None) -> None:
    clone_cfg = CloneConfig(factor=n, ffn_factor=m, variant=variant, noise_db=noise_db, seed=7)
    got, want = clone_logits(arch, clone_cfg)
    assert relative_error(got, want) <= TOLERANCE


def test_small_logits_are_not_degenerate() -> None:
    """The oracle must be sensitive: logits spread out and depend on the token history (attention)."""
    for arch in [*ARCHS, *FAMILY_ARCHS]:
        cfg, state, tokens, logits = small_case(arch)
        assert logits.std() > 0.3
        shifted = tokens.clone()
        shifted[:, 0] = (shifted[:, 0] + 1) % cfg.vocab_size
        with torch.no_grad():
            other = build_model(cfg, state)(shifted)
        assert relative_error(other[:, -1], logits[:, -1]) > 1e-3, arch


def _swap_qkv_copies(wide: dict[str, torch.Tensor]) -> None:
    """Give new group 0 the rows of the copy of another small group (a wrong clone map)."""
    w = wide["blocks.0.attn.qkv.weight"]
    unit = w.shape[0] // 8  # 4 small groups x2
    w[:unit], w[-unit:] = w[-unit:].clone(), w[:unit].clone()


def _undo_final_norm_fold(wide: dict[str, torch.Tensor]) -> None:
    for name in ("final_norm.weight", "final_norm.bias"):
        wide[name] *= 2


def _undo_project_out_fold(wide: dict[str, torch.Tensor]) -> None:
    wide["project_out.weight"] *= 2


def _halve_gemma_embedding(wide: dict[str, torch.Tensor]) -> None:
    """A tied embedding divided by n (the reference implementation's tied GPT-NeoX bug) instead of sqrt(n)."""
    wide["embedding.word.weight"] /= 2 ** 0.5


def _fold_the_weight_not_the_gain(wide: dict[str, torch.Tensor]) -> None:
    """(w o pi) / c instead of (1 + w o pi) / c - 1 for a gain 1 + w."""
    c = 2 ** 0.5
    wide["final_norm.weight"] = ((1 + wide["final_norm.weight"]) * c - 1) / c


def _drop_qk_norm_copy(wide: dict[str, torch.Tensor]) -> None:
    w = wide["blocks.0.attn.q_norm.weight"]
    half = w.shape[0] // 2
    w[:half], w[half:] = w[half:].clone(), w[:half].clone()


@pytest.mark.parametrize("arch,corrupt", [
    ("mha-gelu-ln-rope-bias-tied", _swap_qkv_copies), ("mha-gelu-ln-rope-bias-tied", _undo_final_norm_fold),
    ("opt350-post-relu-proj-tied", _undo_project_out_fold), ("gemma-geglu-offset-scaled-tied", _halve_gemma_embedding),
    ("gemma-geglu-offset-scaled-tied", _fold_the_weight_not_the_gain),
    ("olmo2-branch-qknorm-gqa-untied", _drop_qk_norm_copy)])
def test_wrong_clones_fail_the_tolerance(arch: str, corrupt) -> None:
    """Negative control: the tolerance catches a wrong map or a missing rescale by orders of magnitude."""
    got, want = clone_logits(arch, CloneConfig(factor=2), corrupt)
    assert relative_error(got, want) > 100 * TOLERANCE
