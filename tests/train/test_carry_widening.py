"""Resume, not restart: carried Adam moments, step and schedule make the widened model follow the small one.

First the math in plain PyTorch (one process, torch AdamW): the gradient relation grad' = (grad o pi) / p
per role, the analytically scaled moments, and 20 steps of exact continuation. Then the launch path:
`launch/pretrain.py --hyperclone-optimizer carry` at ZeRO-1 and ZeRO-2, TP1 -> TP2, against the small run
resumed on the same batches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaclone.clone import build_clone_shard, check_carry_possible, clone_moment, widen_model_config
from megaclone.config import CloneConfig, ModelConfig, TrainConfig
from megaclone.model import ReferenceGPT
from megaclone.spec import spec_table
from megaclone.train.carry import (
    CARRY_KEY,
    CarrySchedule,
    build_carry_param_groups,
    clip_to_small_norm_,
    restarted,
    transition_progress,
)
from megaclone.train.optim import adamw, build_param_groups, lr_factor
from tests.clone import FAMILY_ARCHS, dict_reader, small_config
from tests.train.conftest import TINY, launch, metrics

ARCHS = {
    "tied-gelu": dict(),
    "untied-gelu": dict(tied_embeddings=False),
    "tied-swiglu": dict(activation="swiglu", norm="rmsnorm"),
    "untied-swiglu": dict(activation="swiglu", tied_embeddings=False, position="learned", num_query_groups=2),
    # the imported families' options: the tied fold in project_out (s = n q, p = 1), Gemma's sqrt(n) embedding
    # and final-norm factors, QK-norm over query groups
    "tied-opt350": FAMILY_ARCHS["opt350-post-relu-proj-tied"],
    "tied-gemma": FAMILY_ARCHS["gemma-geglu-offset-scaled-tied"],
    "untied-olmo2": FAMILY_ARCHS["olmo2-branch-qknorm-gqa-untied"],
}
TRAIN = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_iters=3, train_iters=30, weight_decay=0.1, grad_clip=0.5,
                    beta1=0.9, beta2=0.95, adam_eps=1e-8)
K, MORE = 6, 20  # small steps before the widening, steps after it


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(cfg: ModelConfig, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        window = torch.randint(0, cfg.vocab_size, (4, cfg.max_seq_len + 1), generator=g)
        out.append((window[:, :-1], window[:, 1:]))
    return out


def small_model(arch: str) -> tuple[ModelConfig, ReferenceGPT]:
    cfg = small_config("mha-gelu-ln-rope-bias-tied", **ARCHS[arch])
    torch.manual_seed(0)
    return cfg, ReferenceGPT(cfg)


def train_step(model: ReferenceGPT, opt: torch.optim.Optimizer, sched, batch, clip) -> tuple[float, float]:
    opt.zero_grad(set_to_none=True)
    loss = model(*batch)
    loss.backward()
    norm = clip()
    opt.step()
    sched.step()
    return loss.item(), float(norm)


def widen(cfg: ModelConfig, model: ReferenceGPT, opt: torch.optim.AdamW, clone_cfg: CloneConfig,
          transition: int | None = None) -> tuple[ReferenceGPT, torch.optim.AdamW, CarrySchedule]:
    """The wide model, its carry AdamW (moments and step from `opt`) and its schedule, all in one process."""
    n, m = clone_cfg.factor, clone_cfg.ffn_factor or clone_cfg.factor
    wide_cfg = widen_model_config(cfg, n, m)
    small = dict(model.named_parameters())
    weights = build_clone_shard(dict_reader({k: v.detach() for k, v in small.items()}), cfg, clone_cfg, 0, 1)
    wide = ReferenceGPT(wide_cfg)
    wide.load_state_dict(weights, strict=True)
    params = dict(wide.named_parameters())
    wide_opt = adamw(build_carry_param_groups(params, cfg, clone_cfg, TRAIN), TRAIN)
    specs = spec_table(wide_cfg)
    moments = {kind: {name: opt.state[p][kind] for name, p in small.items()} for kind in ("exp_avg", "exp_avg_sq")}
    for name, p in params.items():
        wide_opt.state[p] = {"step": opt.state[small[name]]["step"].clone(),
                             **{kind: clone_moment(specs[name], cfg, clone_cfg, dict_reader(moments[kind]), (), kind)
                                for kind in moments}}
    step = int(opt.state[small["embedding.word.weight"]]["step"])
    return wide, wide_opt, CarrySchedule(wide_opt, TRAIN, step, transition)


def run_small(cfg: ModelConfig, model: ReferenceGPT, data: list) -> tuple[torch.optim.AdamW, object, list]:
    opt = adamw(build_param_groups(dict(model.named_parameters()), cfg, TRAIN), TRAIN)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(TRAIN))
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)  # noqa: E731
    return opt, sched, [train_step(model, opt, sched, b, clip) for b in data]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradients_at_the_clone_point_are_copied_and_divided_by_p(arch: str) -> None:
    """grad' = (grad o pi) / p for every parameter: exactly the rule `clone_moment` applies to exp_avg."""
    cfg, model = small_model(arch)
    clone_cfg = CloneConfig(factor=2, ffn_factor=3)
    wide_cfg = widen_model_config(cfg, 2, 3)
    small = {k: v.detach() for k, v in model.named_parameters()}
    wide = ReferenceGPT(wide_cfg)
    wide.load_state_dict(build_clone_shard(dict_reader(small), cfg, clone_cfg, 0, 1), strict=True)
    (batch,) = batches(cfg, 1)
    model(*batch).backward()
    wide(*batch).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    specs = spec_table(wide_cfg)
    for name, p in wide.named_parameters():
        want = clone_moment(specs[name], cfg, clone_cfg, dict_reader(grads), (), "exp_avg")
        scale = grads[name].abs().max()
        assert (p.grad - want).abs().max() <= 1e-5 * scale, name


@pytest.mark.parametrize("arch,tied", [("untied-swiglu", False), ("tied-gelu", True)])
def test_moments_are_the_analytically_scaled_ones(arch: str, tied: bool) -> None:
    """m' = (m o pi) / p and v' = (v o pi) / p^2, with p written out per role independently of the code."""
    n, m = 2, 3
    cfg = small_config("mha-gelu-ln-rope-bias-tied", **ARCHS[arch])
    wide_specs = spec_table(widen_model_config(cfg, n, m))
    g = torch.Generator().manual_seed(1)
    state = {name: torch.rand(s.shape, generator=g) for name, s in spec_table(cfg).items()}
    clone_cfg = CloneConfig(factor=n, ffn_factor=m, variant="diagonal", noise_db=10.0)  # neither matters
    hid = cfg.hidden_size

    def moment(name: str, kind: str) -> torch.Tensor:
        return clone_moment(wide_specs[name], cfg, clone_cfg, dict_reader(state), (), kind)

    E = state["embedding.word.weight"]
    want = {"embedding.word.weight": (E.repeat_interleave(n, 1), n),
            "blocks.0.attn_norm.weight": (state["blocks.0.attn_norm.weight"].repeat_interleave(n), n),
            "final_norm.weight": (state["final_norm.weight"].repeat_interleave(n), 1 if tied else n)}
    unit = (cfg.heads_per_group + 2) * cfg.head_size
    qkv = state["blocks.0.attn.qkv.weight"].unflatten(0, (-1, unit))  # [groups, unit, hidden]
    want["blocks.0.attn.qkv.weight"] = (qkv.repeat_interleave(n, 0).flatten(0, 1).repeat_interleave(n, 1), n)
    out = state["blocks.1.mlp.fc_out.weight"]  # [hidden, ffn]
    want["blocks.1.mlp.fc_out.weight"] = (out.repeat_interleave(n, 0).repeat_interleave(m, 1), n)
    if tied:
        want["blocks.0.mlp.fc_in.bias"] = (state["blocks.0.mlp.fc_in.bias"].repeat_interleave(m), m)
        want["final_norm.bias"] = (state["final_norm.bias"].repeat_interleave(n), 1)
    else:
        gu = state["blocks.0.mlp.gate_up.weight"].unflatten(0, (-1, 2))  # [ffn, gate|up, hidden]
        want["blocks.0.mlp.gate_up.weight"] = (gu.repeat_interleave(m, 0).flatten(0, 1).repeat_interleave(n, 1), m)
        want["lm_head.weight"] = (state["lm_head.weight"].repeat_interleave(n, 1), 1)
        want["embedding.position.weight"] = (state["embedding.position.weight"].repeat_interleave(n, 1), n)
    assert hid * n == wide_specs["embedding.word.weight"].shape[1]
    for name, (copied, p) in want.items():
        assert torch.equal(moment(name, "exp_avg"), copied / p), (arch, name)
        assert torch.equal(moment(name, "exp_avg_sq"), copied / (p * p)), (arch, name)
    with pytest.raises(ValueError, match="moment kind 'exp_avg_sqrt'"):
        moment("final_norm.weight", "exp_avg_sqrt")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_continuation_plain_pytorch(arch: str) -> None:
    """K small steps; widen x2 with carry; 20 more steps of both on the same batches: the same losses."""
    cfg, model = small_model(arch)
    data = batches(cfg, K + MORE)
    opt, sched, _ = run_small(cfg, model, data[:K])
    wide, wide_opt, wide_sched = widen(cfg, model, opt, CloneConfig(factor=2))
    assert wide_sched.last_epoch == sched.last_epoch == K
    groups = wide_opt.param_groups
    assert wide_opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0], rel=1e-12)
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)  # noqa: E731
    clipped = 0
    for step, batch in enumerate(data[K:], start=K + 1):
        loss, norm = train_step(model, opt, sched, batch, clip)
        wide_loss, wide_norm = train_step(wide, wide_opt, wide_sched, batch,
                                          lambda: clip_to_small_norm_(groups, TRAIN.grad_clip))
        assert wide_loss == pytest.approx(loss, rel=1e-5), (step, wide_loss, loss)
        assert wide_norm == pytest.approx(norm, rel=1e-4), step
        clipped += norm > TRAIN.grad_clip
    assert 0 < clipped  # the clipping threshold mattered
    assert int(wide_opt.state[groups[0]["params"][0]]["step"]) == K + MORE


def test_carry_refuses_a_clone_that_unties() -> None:
    """A tied model with no parametric final norm and no project_out is untied by its clone (OLMo-1B): the small
    embedding's moments mix both uses' gradients, so there is nothing exact to carry."""
    cfg = small_config("olmo-plainln-swiglu-tied")
    with pytest.warns(UserWarning, match="unties"), pytest.raises(ValueError, match="cannot be carried"):
        check_carry_possible(cfg, CloneConfig(factor=2))
    check_carry_possible(small_config("gemma-geglu-offset-scaled-tied"), CloneConfig(factor=2))  # folds: fine


def test_without_the_scaled_groups_the_trajectory_departs() -> None:
    """The check above can fail: the run's own lr, eps and wd (an immediate transition) leave the small path."""
    cfg, model = small_model("tied-gelu")
    data = batches(cfg, K + MORE)
    opt, sched, _ = run_small(cfg, model, data[:K])
    wide, wide_opt, wide_sched = widen(cfg, model, opt, CloneConfig(factor=2), transition=0)
    assert all(g["lr"] == pytest.approx(sched.get_last_lr()[0]) for g in wide_opt.param_groups)
    clip = lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)  # noqa: E731
    gaps = []
    for batch in data[K:]:
        loss, _ = train_step(model, opt, sched, batch, clip)
        wide_loss, _ = train_step(wide, wide_opt, wide_sched, batch,
                                  lambda: clip_to_small_norm_(wide_opt.param_groups, TRAIN.grad_clip))
        gaps.append(abs(wide_loss - loss) / loss)
    assert gaps[0] < 1e-5 and max(gaps) > 1e-3  # same function at the clone point, then it departs


def test_transition_moves_each_group_to_the_runs_values() -> None:
    cfg, model = small_model("untied-gelu")
    data = batches(cfg, K)
    opt, _, _ = run_small(cfg, model, data)
    _, wide_opt, sched = widen(cfg, model, opt, CloneConfig(factor=2), transition=4)
    factor = lr_factor(TRAIN)
    seen = {}
    for step in range(K, K + 6):
        t = transition_progress(step, K, 4)
        for g in wide_opt.param_groups:
            c = g[CARRY_KEY]
            s, p = c["value_scale"], c["grad_scale"]
            assert g["lr"] == pytest.approx(TRAIN.lr * factor(step) * s ** (t - 1), rel=1e-12)
            assert g["eps"] == pytest.approx(TRAIN.adam_eps * p ** (t - 1), rel=1e-12)
            assert g["weight_decay"] == pytest.approx(c["weight_decay"] * s ** (1 - t), rel=1e-12)
            seen[(g["name"], step)] = (s, p)
        wide_opt.step()
        sched.step()
    assert [transition_progress(k, K, 4) for k in range(K, K + 6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert {sp for sp in seen.values()} >= {(2, 2), (1, 2), (2, 1)}  # linear, embedding/norm, lm_head groups
    assert transition_progress(K, K, 0) == 1.0 and transition_progress(10 ** 6, K, None) == 0.0


def test_restarted_schedule_is_reached_from_the_small_runs_last_lr() -> None:
    """clone.schedule restart: the run's warmup + cosine laid out from the widening, blended in linearly."""
    cfg, model = small_model("untied-gelu")
    opt, sched, _ = run_small(cfg, model, batches(cfg, K))
    start = sched.get_last_lr()[0]
    wide_train = dataclasses.replace(TRAIN, train_iters=K + 40, warmup_iters=5, lr=2e-3)
    _, wide_opt, _ = widen(cfg, model, opt, CloneConfig(factor=2), transition=8)
    wide_sched = CarrySchedule(wide_opt, wide_train, K, 8, start_lr=start)
    own = lr_factor(dataclasses.replace(wide_train, train_iters=40, lr_decay_iters=40))
    base = lambda g: g["lr"] * g[CARRY_KEY]["value_scale"] ** (1 - t)  # noqa: E731  (the multiplier removed)
    for step in range(K, K + 45):
        t = transition_progress(step, K, 8)
        want = (1 - t) * start + t * wide_train.lr * own(step - K)
        assert all(base(g) == pytest.approx(want, rel=1e-12) for g in wide_opt.param_groups), step
        wide_opt.step()
        wide_sched.step()
    assert restarted(wide_train, K).train_iters == 40 and own(4) == 1.0 and own(40) == TRAIN.min_lr / 2e-3
    first = CarrySchedule(wide_opt, wide_train, K, 8, start_lr=start)
    assert first.get_last_lr()[0] == pytest.approx(start, rel=1e-12)  # the first wide step: the small run's next lr


def test_groups_split_by_factor_and_keep_decay() -> None:
    cfg = small_config("mha-gelu-ln-rope-bias-tied", **ARCHS["tied-swiglu"])
    clone_cfg = CloneConfig(factor=2)
    wide = ReferenceGPT(widen_model_config(cfg, 2))
    params = dict(wide.named_parameters())
    groups = build_carry_param_groups(params, cfg, clone_cfg, dataclasses.replace(TRAIN, weight_decay=0.1))
    assert sum(len(g["params"]) for g in groups) == len(params)
    by_param = {id(p): g for g in groups for p in g["params"]}
    final = by_param[id(params["final_norm.weight"])]
    assert final[CARRY_KEY]["value_scale"] == 2 and final[CARRY_KEY]["grad_scale"] == 1
    assert final["weight_decay"] == 0.0 and final["lr"] == TRAIN.lr / 2
    qkv = by_param[id(params["blocks.0.attn.qkv.weight"])]
    assert qkv["weight_decay"] == pytest.approx(0.2) and qkv["eps"] == TRAIN.adam_eps / 2
    emb = by_param[id(params["embedding.word.weight"])]
    assert emb["lr"] == TRAIN.lr and emb["eps"] == TRAIN.adam_eps / 2 and groups[0][CARRY_KEY]["value_scale"] == 1


# The launch path: real `deepspeed` runs of launch/pretrain.py on CPU, small TP1 -> wide TP2.
LAUNCH_K, LAUNCH_END = 8, 28
LAUNCH_ARCHS = {"tied-gelu": [], "untied-swiglu": ["model.activation=swiglu", "model.tied_embeddings=false"]}


def _common(small_run, run_dir, *sets: str) -> list[str]:
    return ["--config", str(TINY), "--run-dir", str(run_dir), *small_run.data_args(), "train.lr_decay_iters=40",
            "train.eval_interval=100", "train.log_interval=100", *sets]


@pytest.mark.parametrize("arch,zero_stage", [("tied-gelu", 1), ("untied-swiglu", 2)])
def test_exact_continuation_launch(small_run, tmp_path, arch: str, zero_stage: int) -> None:
    """Small TP1 trained 8 steps, then resumed 20 steps; the x2 carry clone at TP2 the same 20 steps."""
    sets = LAUNCH_ARCHS[arch]
    ckpt = tmp_path / "ckpt"
    launch([*_common(small_run, tmp_path / "small", *sets), "--train-iters", str(LAUNCH_K), "--save", str(ckpt),
            "--zero-stage", str(zero_stage)], num_procs=1)
    launch([*_common(small_run, tmp_path / "small", *sets), "--load", str(ckpt), "--train-iters", str(LAUNCH_END),
            "--zero-stage", str(zero_stage)], num_procs=1)
    proc = launch(["--init-from", str(ckpt), "--hyperclone", "2", "--clone-variant", "symmetric", "--clone-noise-db",
                   "none", "--hyperclone-optimizer", "carry", "--tp", "2",
                   "--zero-stage", str(zero_stage), "--train-iters", str(LAUNCH_END),
                   *_common(small_run, tmp_path / "wide")])
    small = {r["step"]: r for r in metrics(tmp_path / "small", "train")}
    wide = {r["step"]: r for r in metrics(tmp_path / "wide", "train")}
    assert sorted(wide) == list(range(LAUNCH_K + 1, LAUNCH_END + 1))
    for step in wide:
        assert wide[step]["loss"] == pytest.approx(small[step]["loss"], rel=1e-5), step
        assert wide[step]["lr"] == pytest.approx(small[step]["lr"], rel=1e-9), step
        assert wide[step]["grad_norm"] == pytest.approx(small[step]["grad_norm"], rel=1e-4), step
    assert any(small[s]["grad_norm"] > 1.0 for s in wide)  # tiny.yaml clips at 1.0: clipping mattered
    (clone,) = metrics(tmp_path / "wide", "clone")
    assert clone["optimizer"] == "carry" and clone["preservation_rel_error"] <= 1e-5
    output = proc.stdout + proc.stderr
    assert "optimizer carried from step 8" in output and "lr x 1/2, eps x 1/2" in output


def test_flags_and_refusals(small_run) -> None:
    """The flags reach CloneConfig; what carry cannot do is refused before any work, naming the flag."""
    from megaclone.checkpoint import read_manifest, resolve_checkpoint
    from megaclone.config import ConfigError, RunConfig
    from megaclone.train.carry import check_carry_plan
    from megaclone.train.cli import build_plan, parse_args

    base = ["--init-from", str(small_run.ckpt), "--hyperclone", "2", "--config", str(TINY), *small_run.data_args()]
    plan = build_plan(parse_args([*base, "--hyperclone-optimizer", "carry", "--hyperclone-lr-transition", "5",
                                  "--train-iters", "40"]), 2)
    assert (plan.cfg.clone.optimizer, plan.cfg.clone.lr_transition) == ("carry", 5)
    assert build_plan(parse_args(base), 2).cfg.clone.optimizer == "fresh"
    # carry reads on from the small run's data position, fresh restarts the corpus, unless --hyperclone-data says
    assert plan.cfg.clone.continues_data and not build_plan(parse_args(base), 2).cfg.clone.continues_data
    assert build_plan(parse_args([*base, "--hyperclone-data", "continue"]), 2).cfg.clone.continues_data
    assert not build_plan(parse_args([*base, "--hyperclone-optimizer", "carry", "--hyperclone-data", "restart",
                                      "--train-iters", "40"]), 2).cfg.clone.continues_data
    restart = [*base, "--hyperclone-optimizer", "carry", "--hyperclone-schedule", "restart", "--train-iters", "40"]
    assert build_plan(parse_args([*restart, "--hyperclone-lr-transition", "0"]), 2).cfg.clone.schedule == "restart"
    with pytest.raises(ConfigError, match="needs clone.optimizer='carry' and clone.lr_transition"):
        build_plan(parse_args(restart), 2)
    with pytest.raises(ConfigError, match="--hyperclone-schedule"):
        CloneConfig(init_from="x", factor=2, optimizer="carry", lr_transition=3, schedule="later").validate()
    with pytest.raises(ConfigError, match="clone.data"):
        CloneConfig(init_from="x", factor=2, data="rewind").validate()
    with pytest.raises(ConfigError, match="--hyperclone-lr-transition"):
        build_plan(parse_args([*base, "--hyperclone-lr-transition", "5"]), 2)
    with pytest.raises(ConfigError, match="zero_stage=3"):
        build_plan(parse_args([*base, "--hyperclone-optimizer", "carry", "--zero-stage", "3", "--train-iters", "40"]),
                   2)
    with pytest.raises(ConfigError, match="pp_size=2: supported with PP=1 only"):
        build_plan(parse_args([*base, "--hyperclone-optimizer", "carry", "--pp", "2", "--train-iters", "40"]), 2)
    with pytest.raises(ConfigError, match="must exceed it"):
        build_plan(parse_args([*base, "--hyperclone-optimizer", "carry", "--train-iters", "30"]), 2)
    path = resolve_checkpoint(small_run.ckpt)
    cfg = RunConfig(clone=CloneConfig(init_from=str(path), factor=2, optimizer="carry"))
    with pytest.raises(ConfigError, match="holds no optimizer state"):
        check_carry_plan(cfg, dataclasses.replace(read_manifest(path), optimizer=None), path)
    cfg.clone.lr_transition, cfg.clone.schedule, cfg.train.train_iters = 5, "restart", 40
    manifest = read_manifest(path)
    check_carry_plan(cfg, manifest, path)
    no_lr = dataclasses.replace(manifest, optimizer={**manifest.optimizer, "scheduler": {"last_epoch": 30}})
    with pytest.raises(ConfigError, match="records no learning rate"):
        check_carry_plan(cfg, no_lr, path)
    with pytest.raises(SystemExit):
        parse_args([*base, "--hyperclone-optimizer", "adam"])
