"""A resume you can trust, on 2 gloo ranks in-process: training checkpoints at ZeRO-1, ZeRO-2 (DP=2) and PP=2,
each saved by `save_training_checkpoint` and resumed by `resume_training_checkpoint` as a launch does.

- The manifest records a sha256 for every file of the step, DeepSpeed's included.
- An untouched checkpoint resumes bit-exact (the next step's loss and the fp32 masters equal the uninterrupted run's).
- A pickle payload in every file of one kind (model states, ZeRO optimizer states, the pipeline's layer files), with
  the manifest's digests forged to match, is refused twice: by the pre-flight verification, naming the file and
  the type, and by DeepSpeed's own load once it goes through megaclone's weights-only checkpoint engine. The
  payload's marker file is never created.
- A truncated or byte-flipped file of each kind (those and the fp32 weight and Adam-state safetensors) is refused by
  the verification, naming the file and the previous complete step, on every rank alike.
- A manifest of an earlier megaclone (no digests for DeepSpeed's files) still resumes, and its truncated model
  states are still a named error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megaclone.checkpoint import CheckpointError, read_manifest, resolve_checkpoint
from megaclone.config import load_run_config
from megaclone.data import DistributedBatchSampler
from megaclone.parallel import TPRNGTracker, build_layout
from megaclone.train.checkpointing import (
    resume_training_checkpoint,
    save_training_checkpoint,
    verify_resume_checkpoint,
)
from megaclone.train.engine import build_engine, build_model, fp32_masters
from megaclone.train.loop import train_step
from megaclone.train.safe_load import load_torch_file
from tests.distributed import run_distributed

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SETTINGS = {"zero1": ["parallel.zero_stage=1"], "zero2": ["parallel.zero_stage=2"],
            "pp2": ["parallel.zero_stage=1", "parallel.pp_size=2"]}
KINDS = {"model states": "deepspeed/mp_rank_*_model_states.pt", "optimizer states": "deepspeed/*optim_states.pt",
         "layer files": "deepspeed/layer_*-model_states.pt", "weights": "weights/*.safetensors",
         "adam files": "optim/*.safetensors"}
PICKLED = ("model states", "optimizer states", "layer files")  # DeepSpeed's torch files


class Payload:
    """Unpickled, it creates `marker`: proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _batches(cfg, layout, steps: int) -> list:
    """`steps` optimizer steps' micro-batches of random tokens, the same on every run (per DP rank)."""
    gen = torch.Generator().manual_seed(1000 + layout.dp_rank)
    b, s, v = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    n = steps * cfg.train.grad_accum_steps
    return [(torch.randint(0, v, (b, s), generator=gen), torch.randint(0, v, (b, s), generator=gen)) for _ in range(n)]


def _engine(cfg, layout):
    torch.manual_seed(cfg.train.seed + 100 * layout.pp_rank)
    tracker = TPRNGTracker(cfg.train.seed, layout.tp_rank)
    module = build_model(cfg, layout, tracker)
    sampler = DistributedBatchSampler(1000, cfg.train.micro_batch_size, layout.dp_rank, layout.dp_size, 0)
    return build_engine(cfg, layout, module, torch.device("cpu")), module, sampler, tracker


def files_of(step_dir: Path, kind: str) -> list[Path]:
    return sorted(step_dir.glob(KINDS[kind]))


def forge_digests(step_dir: Path) -> None:
    """Rewrite every digest in the manifest to match the files as they are now (what an attacker would do)."""
    path = step_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for entries in (manifest["files"], manifest["optimizer"]["files"], manifest["other_files"]):
        for rel in entries:
            data = (step_dir / rel).read_bytes()
            entries[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    path.write_text(json.dumps(manifest))


def copy_step(root: Path, into: Path) -> Path:
    """A copy of `root` (both steps and `latest`) to tamper with; returns the copy of the latest step."""
    shutil.copytree(root, into)
    return resolve_checkpoint(into)


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    else:  # one byte flipped in the middle: same size, other content
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _refusals(step_dir: Path, cfg, layout, engine, load: bool) -> list[str | None]:
    """What refusing `step_dir` said: the pre-flight's message and (`load`) the DeepSpeed load's, None if none."""
    messages: list[str | None] = []
    for attempt in ("verify", "load") if load else ("verify",):
        try:
            if attempt == "verify":
                verify_resume_checkpoint(step_dir, read_manifest(step_dir), cfg, layout, None)
            else:
                sampler = DistributedBatchSampler(1000, cfg.train.micro_batch_size, layout.dp_rank, layout.dp_size, 0)
                resume_training_checkpoint(step_dir, engine, sampler, TPRNGTracker(cfg.train.seed, layout.tp_rank))
            messages.append(None)
        except CheckpointError as e:
            messages.append(f"{type(e).__name__}: {e}")
        dist.barrier()
    return messages


def _setting(rank: int, tmp: Path, name: str) -> dict:
    cfg = load_run_config(TINY, ["model.vocab_size=512", "train.eval_interval=0", *SETTINGS[name]])
    layout = build_layout(cfg.parallel)
    root, out = tmp / name / "ckpt", {"name": name}
    batches = _batches(cfg, layout, 3)
    engine, module, sampler, tracker = _engine(cfg, layout)
    for step in (1, 2):
        train_step(engine, iter(batches[(step - 1) * cfg.train.grad_accum_steps:]), layout)
        save_training_checkpoint(root, step, cfg, layout, engine, module, sampler, tracker, None, {})
    expected = train_step(engine, iter(batches[2 * cfg.train.grad_accum_steps:]), layout)[0]
    masters = fp32_masters(engine, dict(module.named_parameters()))

    # An untouched checkpoint: verified, then resumed bit-exact.
    step_dir = resolve_checkpoint(root)
    manifest = read_manifest(step_dir)
    out["recorded"] = sorted(manifest.digests())
    out["held"] = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*")
                         if p.is_file() and p.name != "manifest.json")
    verify_resume_checkpoint(step_dir, manifest, cfg, layout, None)
    engine, module, sampler, tracker = _engine(cfg, layout)
    out["resumed_step"] = resume_training_checkpoint(root, engine, sampler, tracker)
    out["loss"] = (train_step(engine, iter(batches[2 * cfg.train.grad_accum_steps:]), layout)[0], expected)
    resumed = fp32_masters(engine, dict(module.named_parameters()))
    out["masters_equal"] = all(torch.equal(resumed[n], masters[n]) for n in masters)

    # Every file of one kind carries a payload; the digests are forged to match.
    out["pickled"] = {}
    for kind in PICKLED:
        marker = tmp / name / f"marker-{kind.replace(' ', '-')}"
        step_dir = tmp / name / f"payload-{kind.replace(' ', '-')}"
        if rank == 0:
            step_dir = copy_step(root, step_dir)
            for path in files_of(step_dir, kind):
                state = load_torch_file(path)  # our own file, written above (DeepSpeed's types only)
                state["payload"] = Payload(marker)
                torch.save(state, path)
            forge_digests(step_dir)
        dist.barrier()
        step_dir = resolve_checkpoint(step_dir)
        if files_of(step_dir, kind):
            out["pickled"][kind] = (*_refusals(step_dir, cfg, layout, engine, load=True), marker.exists())

    # Truncated and byte-flipped files of each kind, digests left as saved.
    out["damaged"] = {}
    for kind in KINDS:
        for how in ("truncated", "flipped"):
            step_dir = tmp / name / f"{how}-{kind.replace(' ', '-')}"
            if rank == 0:
                step_dir = copy_step(root, step_dir)
                if files_of(step_dir, kind):
                    damage(files_of(step_dir, kind)[-1], how)
            dist.barrier()
            step_dir = resolve_checkpoint(step_dir)
            if files_of(step_dir, kind):
                out["damaged"][kind, how] = (str(files_of(step_dir, kind)[-1]),
                                             _refusals(step_dir, cfg, layout, engine, load=False)[0])
    if name == "zero1":
        out["earlier"] = _earlier_manifest(rank, root, tmp / name, cfg, layout, engine, batches, expected)
    return out


def _earlier_manifest(rank: int, root: Path, tmp: Path, cfg, layout, engine, batches, expected: float) -> dict:
    """A manifest without `other_files` (as earlier megaclone versions wrote): resumes bit-exact, DeepSpeed's files
    only checked for loading; a truncated model-states file is still refused, by name."""
    out = {}
    for case in ("intact", "truncated"):
        step_dir = tmp / f"earlier-{case}"
        if rank == 0:
            step_dir = copy_step(root, step_dir)
            manifest = json.loads((step_dir / "manifest.json").read_text())
            del manifest["other_files"]
            (step_dir / "manifest.json").write_text(json.dumps(manifest))
            if case == "truncated":
                damage(files_of(step_dir, "model states")[0], "truncated")
        dist.barrier()
        step_dir = resolve_checkpoint(step_dir)
        out[case] = _refusals(step_dir, cfg, layout, engine, load=False)[0]
        if case == "intact":
            sampler = DistributedBatchSampler(1000, cfg.train.micro_batch_size, layout.dp_rank, layout.dp_size, 0)
            resume_training_checkpoint(step_dir, engine, sampler, TPRNGTracker(cfg.train.seed, layout.tp_rank))
            out["loss"] = (train_step(engine, iter(batches[2 * cfg.train.grad_accum_steps:]), layout)[0], expected)
    return out


def _worker(rank: int, world: int, tmp: str) -> list[dict]:
    return [_setting(rank, Path(tmp), name) for name in SETTINGS]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict]]]:
    tmp = tmp_path_factory.mktemp("integrity")
    return tmp, run_distributed(_worker, 2, str(tmp), use_deepspeed=True)


def test_every_file_is_recorded(results) -> None:
    _, ranks = results
    for setting in ranks[0]:
        assert setting["recorded"] == setting["held"], setting["name"]
        assert any(rel.startswith("deepspeed/") for rel in setting["recorded"])


def test_untouched_checkpoints_resume_bit_exact(results) -> None:
    _, ranks = results
    for rank_results in ranks:
        for setting in rank_results:
            assert setting["resumed_step"] == 2
            got, want = setting["loss"]
            assert got == want, setting["name"]
            assert setting["masters_equal"], setting["name"]


def test_pickle_payloads_are_refused_and_never_run(results) -> None:
    tmp, ranks = results
    kinds = {setting["name"]: sorted(setting["pickled"]) for setting in ranks[0]}
    assert kinds == {"zero1": ["model states", "optimizer states"], "zero2": ["model states", "optimizer states"],
                     "pp2": ["layer files", "model states", "optimizer states"]}
    for rank_results in ranks:
        for setting in rank_results:
            for kind, (verified, loaded, marker_made) in setting["pickled"].items():
                where = (setting["name"], kind)
                assert not marker_made, where
                assert verified.startswith("ResumeRefused") and "it needs the type io.open" in verified, where
                assert str(tmp / setting["name"] / f"payload-{kind.replace(' ', '-')}") in verified, where
                # Without the pre-flight, DeepSpeed's own load refuses too, naming its file and the type.
                assert loaded is not None and "refused to load: it needs the type io.open" in loaded, where
    assert not list(tmp.rglob("marker-*"))


def test_damaged_files_are_refused_naming_file_and_previous_step(results) -> None:
    _, ranks = results
    for setting in ranks[0]:
        kinds = {kind for kind, _ in setting["damaged"]}
        assert kinds == set(KINDS) - (set() if setting["name"] == "pp2" else {"layer files"}), setting["name"]
    for setting in ranks[0]:
        for (kind, how), (path, message) in setting["damaged"].items():
            where = (setting["name"], kind, how)
            assert message is not None and message.startswith("ResumeRefused"), where
            detail = "bytes, the manifest records" if how == "truncated" else "sha256"
            assert f"{path}: " in message and detail in message, where
            root = next(p for p in Path(path).parents if p.name.startswith("step_")).parent
            assert f"The previous complete checkpoint is {root / 'step_00000001'}" in message, where
    assert [s["damaged"] for s in ranks[0]] == [s["damaged"] for s in ranks[1]]  # every rank refuses alike


def test_earlier_manifests_still_load(results) -> None:
    _, ranks = results
    for rank_results in ranks:
        earlier = next(s for s in rank_results if s["name"] == "zero1")["earlier"]
        assert earlier["intact"] is None
        got, want = earlier["loss"]
        assert got == want
        assert earlier["truncated"].startswith("ResumeRefused")
        assert "mp_rank_00_model_states.pt: not a readable torch checkpoint file" in earlier["truncated"]
