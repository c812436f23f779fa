"""The launch-time cloning glue in one process: each rank's widened slice, the preservation check that fails
loudly, and the symmetry monitor (a plain ReferenceGPT stands in for the DeepSpeed engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import weight_file, write_weights_checkpoint
from megaclone.config import CloneConfig, ModelConfig, ParallelConfig
from megaclone.convert import ConvertOptions, convert_checkpoint
from megaclone.model import ReferenceGPT, init_params
from megaclone.parallel import Layout, build_layout
from megaclone.spec import spec_table
from megaclone.train.cloning import build_rank_clone, check_preservation, plan_clone, symmetry_monitor
from tests.convert import bit_equal, read_file_tensors
from tests.distributed import run_distributed

SMALL = ModelConfig(vocab_size=200, vocab_multiple=64, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=16)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = ReferenceGPT(SMALL)
    init_params(dict(model.named_parameters()), SMALL, seed=3)
    with torch.no_grad():  # non-trivial norms, so the tied final-norm rescaling matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return write_weights_checkpoint(tmp_path_factory.mktemp("small"), SMALL,
                                    {n: p.detach() for n, p in model.named_parameters()}, tp_size=2, pp_size=1)


def wide_model(small_ckpt: Path, **clone) -> tuple[ReferenceGPT, object]:
    source = plan_clone(CloneConfig(init_from=str(small_ckpt), factor=2, **clone), ParallelConfig(), 1)
    model = ReferenceGPT(source.wide)
    model.load_state_dict(build_rank_clone(source, Layout()), strict=True)
    return model.eval(), source


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, SMALL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def test_rank_slices_are_the_tp_slices_of_the_whole_clone(small_ckpt: Path) -> None:
    source = plan_clone(CloneConfig(init_from=str(small_ckpt), factor=2, noise_db=10.0), ParallelConfig(), 4)
    whole = build_rank_clone(source, Layout())
    specs = spec_table(source.wide)
    for tp_rank in range(4):
        part = build_rank_clone(source, Layout(tp_size=4, tp_rank=tp_rank, world_size=4))
        assert part.keys() == whole.keys()
        for name, tensor in part.items():
            assert torch.equal(tensor, whole[name][specs[name].tp_slices(tp_rank, 4)]), name


@pytest.mark.parametrize("variant", ["symmetric", "diagonal"])
def test_preservation_check_passes_for_a_clone(small_ckpt: Path, variant: str) -> None:
    model, source = wide_model(small_ckpt, variant=variant, noise_db=5.0)
    stats = check_preservation(model, Layout(), source, batch(), "fp32")
    assert stats["preservation_rel_error"] <= 1e-5
    assert stats["wide_loss"] == pytest.approx(stats["small_loss"], rel=1e-5)


def test_preservation_check_fails_loudly(small_ckpt: Path) -> None:
    model, source = wide_model(small_ckpt)
    with torch.no_grad():
        model.blocks[0].mlp.fc_in.weight[0, 0] += 0.5  # breaks the copies of one unit
    with pytest.raises(RuntimeError, match=r"did not preserve the function .* > 0.0001"):
        check_preservation(model, Layout(), source, batch(), "fp32")
    stats = check_preservation(model, Layout(), source, batch(), "bf16")  # bf16: reported, not enforced
    assert stats["preservation_rel_error"] > 1e-4


NOISE = (None, 0.0)  # off, and the launcher's default


def _split_clone_worker(rank: int, world_size: int, ckpt: str, tp: int) -> tuple[int, list, dict]:
    """build_rank_clone on one of 2 gloo ranks, recording the row share each call of build_clone_shard computed."""
    import megaclone.train.cloning as cloning

    shares, original = [], cloning.build_clone_shard

    def spy(*args, **kwargs):
        shares.append(kwargs["share"])
        return original(*args, **kwargs)

    cloning.build_clone_shard = spy
    layout = build_layout(ParallelConfig(tp_size=tp))
    out = {}
    for noise_db in NOISE:
        clone = CloneConfig(init_from=ckpt, factor=2, variant="diagonal", noise_db=noise_db, seed=4)
        out[noise_db] = build_rank_clone(plan_clone(clone, ParallelConfig(tp_size=tp), world_size), layout)
    return layout.tp_rank, shares, out


@pytest.mark.parametrize("tp", [1, 2])  # DP=2 (each replica computes half of every slice, then they exchange); TP=2
def test_launch_widening_equals_the_converter_bit_for_bit(small_ckpt: Path, tmp_path: Path, tp: int) -> None:
    results = run_distributed(_split_clone_worker, 2, str(small_ckpt), tp)
    dp_size = 2 // tp
    assert [shares for _, shares, _ in results] == [[(rank // tp, dp_size)] * len(NOISE) for rank in range(2)]
    for noise_db in NOISE:
        out = convert_checkpoint(ConvertOptions(input=small_ckpt, output=tmp_path / str(noise_db), tp_size=tp,
                                                pp_size=1, hyperclone=2, clone_variant="diagonal",
                                                clone_noise_db=noise_db, clone_seed=4, progress=False)).output
        for tp_rank, _, tensors in results:
            stored = read_file_tensors(out / weight_file(tp_rank, 0))
            assert stored.keys() == tensors[noise_db].keys()
            for name, tensor in tensors[noise_db].items():
                assert bit_equal(tensor, stored[name]), (noise_db, tp_rank, name)


def test_symmetry_monitor(small_ckpt: Path) -> None:
    plain, source = wide_model(small_ckpt)
    sims = symmetry_monitor(plain, plain, Layout(), source)()
    assert sims["clone_similarity"] == pytest.approx(1.0, abs=1e-12) and sims["clone_similarity_min"] > 1 - 1e-12
    noisy, source = wide_model(small_ckpt, noise_db=10.0)
    sims = symmetry_monitor(noisy, noisy, Layout(), source)()
    assert 0.5 < sims["clone_similarity_min"] <= sims["clone_similarity"] < 0.99
