"""Layout invariance and shard locality (docs/design.md, "Shard locality and layout invariance").

Widened weights assembled from `build_clone_shard` at any target TP x PP are bit-identical to TP=1,
noise included, and every target rank reads exactly the contiguous small units its copies come from.
"""

from __future__ import annotations

import pytest

from megaclone.clone import build_clone_shard, clone_factors, widen_model_config
from megaclone.config import CloneConfig, ConfigError, ParallelConfig
from megaclone.spec import build_param_specs, spec_table, stages_of
from tests.clone import ARCHS, FAMILY_ARCHS, assemble, bit_equal, dict_reader, random_small_state, small_config

LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]  # (tp, pp)
CASES = [  # (n, m, variant, extra small-config keys)
    (2, 2, "symmetric", {}),
    (2, 1, "diagonal", {}),
    (3, 3, "diagonal", {}),
    (4, 2, "symmetric", {}),
    (2, 2, "diagonal", {"ffn_size": 18}),  # 18 FFN units: TP4 cuts through the copies of one unit
]


def fits(cfg, tp: int, pp: int) -> bool:
    try:
        ParallelConfig(tp_size=tp, pp_size=pp).validate(cfg)
    except ConfigError:
        return False
    return True


def build_layout_shards(state, cfg, clone_cfg, tp: int, pp: int, log=None):
    return {(t, p): build_clone_shard(dict_reader(state, log), cfg, clone_cfg, t, tp, p, pp)
            for p in range(pp) for t in range(tp)}


@pytest.mark.filterwarnings("ignore:the clone unties")
@pytest.mark.parametrize("arch,case", [(arch, case) for arch in sorted(ARCHS) for case in range(len(CASES))]
                         + [(arch, case) for arch in sorted(FAMILY_ARCHS) for case in (0, 2)])
def test_layout_invariance(arch: str, case: int) -> None:
    n, m, variant, extra = CASES[case]
    cfg = small_config(arch, **extra)
    state = random_small_state(cfg, seed=3)
    clone_cfg = CloneConfig(factor=n, ffn_factor=m, variant=variant, noise_db=10.0, seed=11)
    wide_cfg = widen_model_config(cfg, n, m)
    reference = build_clone_shard(dict_reader(state), cfg, clone_cfg, 0, 1)
    checked = []
    for tp, pp in LAYOUTS[1:]:
        if not fits(wide_cfg, tp, pp):
            continue
        full = assemble(wide_cfg, build_layout_shards(state, cfg, clone_cfg, tp, pp), tp, pp)
        assert full.keys() == reference.keys()
        for name, t in full.items():
            assert bit_equal(t, reference[name]), f"{name} differs at tp={tp} pp={pp}"
        checked.append((tp, pp))
    assert (1, 2) in checked and (len(checked) > 1 or n == 3)  # MQA x3 has 3 groups: no TP2/TP4


def test_cut_copies_case_is_exercised() -> None:
    """The MQA and ffn_size=18 cases really cut through the copies of one small unit at some target TP."""
    for arch, extra, tp in (("mqa-gelu-ln-rope-untied", {}, 2), ("mha-gelu-ln-rope-bias-tied", {"ffn_size": 18}, 4)):
        small = small_config(arch, **extra)
        assert not fits(small, tp, 1) and fits(widen_model_config(small, 2), tp, 1)


def expected_small_index(wide_spec, n: int, m: int, tp_rank: int, tp_size: int) -> tuple[tuple[int, int], ...]:
    """Whole small units [first_copy_unit // f, last_copy_unit // f + 1) along the TP axis, all of every other axis."""
    factors = {"hidden": n, "embed": n, "groups": n, "ffn": m, "vocab": 1, "seq": 1}
    out = []
    for dim, axis in enumerate(wide_spec.axes):
        f, unit = factors[axis.kind], axis.unit_size
        small_units = axis.num_units // f
        if dim != wide_spec.tp_axis:
            out.append((0, small_units * unit))
            continue
        per = axis.num_units // tp_size  # wide units per target rank
        first, last = tp_rank * per, (tp_rank + 1) * per - 1
        if small_units % tp_size == 0:  # the design statement: rank r needs units [r U / t', (r+1) U / t')
            assert (first // f, last // f + 1) == (tp_rank * small_units // tp_size,
                                                   (tp_rank + 1) * small_units // tp_size)
        out.append(((first // f) * unit, (last // f + 1) * unit))
    return tuple(out)


@pytest.mark.parametrize("arch", [*sorted(ARCHS), "opt350-post-relu-proj-tied", "olmo2-branch-qknorm-gqa-untied"])
@pytest.mark.parametrize("n,m,extra", [(2, 2, {}), (4, 1, {}), (2, 2, {"ffn_size": 18})])
def test_locality(arch: str, n: int, m: int, extra: dict) -> None:
    cfg = small_config(arch, **extra)
    state = random_small_state(cfg)
    clone_cfg = CloneConfig(factor=n, ffn_factor=m, noise_db=0.0)
    wide_cfg = widen_model_config(cfg, n, m)
    wide_specs = build_param_specs(wide_cfg)
    small_specs = spec_table(cfg)
    for tp, pp in LAYOUTS:
        if not fits(wide_cfg, tp, pp):
            continue
        for p in range(pp):
            for t in range(tp):
                log: list = []
                build_clone_shard(dict_reader(state, log), cfg, clone_cfg, t, tp, p, pp)
                want = {s.name: expected_small_index(s, n, m, t, tp) for s in wide_specs
                        if p in stages_of(s, wide_cfg, pp)}
                assert [name for name, _ in log] == list(want), "one read per parameter of the stage"
                for name, index in log:
                    got = tuple((sl.start, sl.stop) for sl in index)
                    assert got == want[name], f"{name} at tp={t}/{tp} pp={p}/{pp}"
                    assert len(index) == len(small_specs[name].shape)


def test_bad_factors_and_layouts_raise() -> None:
    cfg = small_config("mha-gelu-ln-rope-bias-tied")
    state = random_small_state(cfg)
    with pytest.raises(ValueError, match="--hyperclone=1"):
        build_clone_shard(dict_reader(state), cfg, CloneConfig(factor=1), 0, 1)
    with pytest.raises(ValueError, match="--hyperclone-ffn=0"):
        clone_factors(CloneConfig(factor=2, ffn_factor=0))
    with pytest.raises(ValueError, match="variant='wide'"):
        clone_factors(CloneConfig(factor=2, variant="wide"))
    with pytest.raises(ValueError, match="noise_db=nan"):
        clone_factors(CloneConfig(factor=2, noise_db=float("nan")))
    with pytest.raises(ValueError, match="x3 .*num_query_groups=12.*parallel.tp_size=5"):
        build_clone_shard(dict_reader(state), cfg, CloneConfig(factor=3), 0, 5)
    with pytest.raises(ValueError, match="tp_rank=2"):
        build_clone_shard(dict_reader(state), cfg, CloneConfig(factor=2), 2, 2)


@pytest.mark.parametrize("noise_db", [None, 0.0])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_row_shares_make_the_whole_shard(arch: str, noise_db) -> None:
    """`share=(k, K)`: the K parts of a target rank's slices (what its K data-parallel replicas each compute),
    stacked in order, are that rank's slices bit for bit, also when a part is empty (K above the rows)."""
    import torch

    cfg = small_config(arch)
    state = random_small_state(cfg, seed=2)
    for clone_cfg, tp_rank, tp_size, pp_rank, pp_size in [
            (CloneConfig(factor=2, variant="diagonal", noise_db=noise_db, seed=1), 1, 2, 0, 1),
            (CloneConfig(factor=2, variant="diagonal", noise_db=noise_db, seed=1), 0, 1, 1, 2),
            (CloneConfig(factor=2, noise_db=noise_db, grow_layers=4, grow_method="stack"), 1, 2, 1, 2)]:  # depth too
        whole = build_clone_shard(dict_reader(state), cfg, clone_cfg, tp_rank, tp_size, pp_rank, pp_size)
        for parts in (2, 3, 40):
            shares = [build_clone_shard(dict_reader(state), cfg, clone_cfg, tp_rank, tp_size, pp_rank, pp_size,
                                        share=(k, parts)) for k in range(parts)]
            assert all(set(s) == set(whole) for s in shares)
            for name, tensor in whole.items():
                assert bit_equal(torch.cat([s[name] for s in shares]), tensor), (name, parts)
    with pytest.raises(ValueError, match="share=\\(2, 2\\)"):
        build_clone_shard(dict_reader(state), cfg, clone_cfg, 0, 1, share=(2, 2))
