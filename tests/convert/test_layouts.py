"""Resharding and widening between layouts: the output is what a training launch would build, bit for bit.

Every layout of {TP1, TP2, TP4, PP2, TP2xPP2} appears as a source and as a target, up and down, with and
without widening (n = 2 and 3). Without widening every stored tensor equals the source's slice; with
widening it equals `build_clone_shard` of that target rank; the logits equal the source's (exactly /
within 1e-5 relative), and each target file reads only the source bytes it needs.
"""

from __future__ import annotations

import math

import pytest
import torch

from megaclone.checkpoint import (
    ShardReader,
    load_full_state,
    load_model,
    read_manifest,
    storage_stage,
    weight_file,
    write_weights_checkpoint,
)
from megaclone.clone import build_clone_shard, clone_checkpoint, widen_model_config
from megaclone.clone.plan import small_read_ranges
from megaclone.config import CloneConfig
from megaclone.convert import ConvertOptions, convert_checkpoint
from megaclone.spec import build_param_specs, stages_of
from tests.convert import ARCHS, bit_equal, layout_digests, make_source, read_file_tensors

A, B = sorted(ARCHS)  # A: gqa-swiglu-rms-learned-nobias-untied, B: mha-gelu-ln-rope-bias-tied
CASES = [  # (arch, source (tp, pp), target (tp, pp), n, m, variant, noise_db, chunk_bytes)
    (B, (1, 1), (2, 2), 0, None, None, None, 1 << 20),
    (A, (2, 2), (1, 1), 0, None, None, None, 40),
    (B, (4, 1), (1, 2), 0, None, None, None, 1 << 20),
    (A, (1, 2), (4, 1), 0, None, None, None, 72),
    (B, (2, 1), (4, 1), 2, 2, "symmetric", 10.0, 1 << 20),
    (A, (4, 1), (2, 1), 3, 3, "diagonal", None, 1 << 20),
    (B, (2, 2), (1, 1), 2, 1, "diagonal", 20.0, 56),
    (A, (1, 2), (2, 2), 3, 2, "symmetric", 10.0, 1 << 20),
    (A, (1, 1), (4, 1), 2, 2, "diagonal", 10.0, 100),
    (B, (4, 1), (2, 2), 3, 3, "symmetric", None, 1 << 20),
    (A, (2, 1), (1, 2), 0, None, None, None, 1 << 20),
]


def test_every_layout_is_source_and_target() -> None:
    layouts = {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)}
    for widen in (True, False):
        cases = [c for c in CASES if bool(c[3]) == widen]
        assert {c[1] for c in cases} | {c[2] for c in cases} == layouts
    assert {c[1] for c in CASES} == layouts and {c[2] for c in CASES} == layouts
    assert {c[3] for c in CASES} == {0, 2, 3}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """ROOT of the same small model (per arch) at every layout a case reads from."""
    base = tmp_path_factory.mktemp("sources")
    return {(arch, tp, pp): make_source(base / f"{arch}-tp{tp}-pp{pp}", arch, tp, pp)
            for arch, (tp, pp), *_ in CASES}


def expected_shard(src, clone_cfg, t: int, tp: int, p: int, pp: int) -> dict[str, torch.Tensor]:
    """What target rank (t, p) holds at launch: build_clone_shard, or the plain TP slice of the source."""
    with ShardReader(src) as reader:
        if clone_cfg is not None:
            return build_clone_shard(reader.read, reader.config, clone_cfg, t, tp, p, pp)
        cfg = reader.config
        return {s.name: reader.read(s.name, s.tp_slices(t, tp)) for s in build_param_specs(cfg)
                if p in stages_of(s, cfg, pp)}


def logits(path, tokens: torch.Tensor) -> torch.Tensor:
    model, _ = load_model(path)
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_conversion(case: int, sources, tmp_path) -> None:
    arch, (stp, spp), (tp, pp), n, m, variant, noise_db, chunk = CASES[case]
    src = sources[(arch, stp, spp)]
    small = read_manifest(src)
    clone_cfg = CloneConfig(init_from=str(src), factor=n, ffn_factor=m, variant=variant, noise_db=noise_db,
                            seed=5) if n else None
    wide_cfg = widen_model_config(small.model, n, m) if n else small.model
    opts = dict(hyperclone=n, hyperclone_ffn=m, clone_variant=variant, clone_noise_db=noise_db, clone_seed=5) if n \
        else {}
    report = convert_checkpoint(ConvertOptions(input=src, output=tmp_path / "out", tp_size=tp, pp_size=pp,
                                               chunk_bytes=chunk, progress=False, verify=case % 2 == 0, **opts))
    out = report.output
    assert out == tmp_path / "out" / "step_00000007" and (tmp_path / "out" / "latest").read_text().strip() == out.name
    manifest = read_manifest(out)
    assert manifest.model == wide_cfg and (manifest.tp_size, manifest.pp_size) == (tp, pp)
    assert manifest.step == 7 and manifest.data == {"consumed_samples": 1234} and manifest.deepspeed is None
    assert (out / "tokenizer.model").read_bytes() == (src / "step_00000007" / "tokenizer.model").read_bytes()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left

    # every file: exactly the tensors its stage stores, each bit-equal to what a launch builds for that rank
    for p in range(pp):
        for t in range(tp):
            stored = read_file_tensors(out / weight_file(t, p))
            want = expected_shard(src, clone_cfg, t, tp, p, pp)
            specs = {s.name: s for s in build_param_specs(wide_cfg)}
            assert set(stored) == {k for k in want if storage_stage(specs[k], wide_cfg, pp) == p}
            for name, w in want.items():
                got = stored[name] if name in stored else read_file_tensors(out / weight_file(t, 0))[name]
                assert bit_equal(got, w), f"{name} at tp{t} pp{p}"

    # function preservation against the source's load_model
    tokens = torch.randint(0, small.model.vocab_size, (2, 8), generator=torch.Generator().manual_seed(case))
    a, b = logits(src, tokens), logits(out, tokens)
    if n:
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    else:
        assert torch.equal(a, b)
        full_a, full_b = load_full_state(src), load_full_state(out)
        assert all(bit_equal(full_a[k], full_b[k]) for k in full_a)
    if report.verify is not None:
        assert report.verify["exact"] == (not n)

    # locality: each target file reads exactly the source elements its tensors copy, nothing more
    by_rel = {r.rel: r for r in report.files}
    assert set(by_rel) == {weight_file(t, p) for t in range(tp) for p in range(pp)}
    specs = {s.name: s for s in build_param_specs(wide_cfg)}
    for p in range(pp):
        for t in range(tp):
            need = 0
            for spec in specs.values():
                if storage_stage(spec, wide_cfg, pp) != p:
                    continue
                index = spec.tp_slices(t, tp)
                if n and chunk >= 1 << 20:  # whole tensors: the clone reads its tight small range once
                    need += math.prod(b - a for a, b in small_read_ranges(spec, n, m or n, index)) * 4
                elif not n:
                    need += math.prod(spec.tp_shape(tp)) * 4
            if need:
                assert by_rel[weight_file(t, p)].bytes_read == need, weight_file(t, p)
            if not n and stp == tp:  # same TP degree: target rank t reads only source rank t's files
                assert all(f"tp{t:02d}-" in rel for rel in by_rel[weight_file(t, p)].reads)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_files_identical_to_checkpoint_writers(arch: str, tmp_path) -> None:
    """Converted files are byte-identical to those write_weights_checkpoint and clone_checkpoint save."""
    src = make_source(tmp_path / "src", arch, 2, 2)
    plain = convert_checkpoint(ConvertOptions(input=src, output=tmp_path / "plain", tp_size=4, pp_size=1,
                                              chunk_bytes=64, progress=False)).output
    ref = write_weights_checkpoint(tmp_path / "ref", read_manifest(src).model, load_full_state(src), 4, 1)
    assert layout_digests(plain, 4, 1) == layout_digests(ref, 4, 1)

    clone_cfg = CloneConfig(init_from=str(src), factor=2, variant="diagonal", noise_db=10.0, seed=3)
    wide = convert_checkpoint(ConvertOptions(input=src, output=tmp_path / "wide", tp_size=2, pp_size=2,
                                             hyperclone=2, clone_variant="diagonal", clone_noise_db=10.0, clone_seed=3,
                                             chunk_bytes=48, progress=False)).output
    ref_wide = clone_checkpoint(src, tmp_path / "ref_wide", clone_cfg, 2, 2)
    assert layout_digests(wide, 2, 2) == layout_digests(ref_wide, 2, 2)
    assert read_manifest(wide).files == read_manifest(ref_wide).files
