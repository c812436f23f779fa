"""CPU training throughput: megaclone (GPT in its DeepSpeed engine, as `launch/pretrain.py` builds it) against a
plain nanoGPT-style PyTorch GPT of the same shape, written here so the baseline owes nothing to megaclone's layers.

Fairness: one process, the same thread count, the same random batches, parameter shapes checked equal, the same
AdamW (betas, eps, weight decay on matrices and embeddings only, lr schedule), gradient clipping in both, the same
loss (softmax over the real vocabulary, padding excluded). Rounds rotate which model goes first so that machine
noise (and cache warmth) hits all alike; the ratio is the median of per-round paired ratios. Two clocks: wall time
(what a user sees) and process CPU time, which stays meaningful when other processes share the cores (with
--threads 1 it is the time on an idle core; with more threads it also counts OpenMP spin-waits). The `--launch`
runs time real `python`/`deepspeed --num_gpus 2` processes and read tokens/s from the run's `metrics.jsonl`.

    python bench/cpu_throughput.py --configs tiny small --steps 3 --rounds 20
    python bench/cpu_throughput.py --configs tiny small --threads 1   # on a busy machine: read the CPU-time ratio
    python bench/cpu_throughput.py --configs small --breakdown     # engine vs model share of the gap
    python bench/cpu_throughput.py --configs small --profile       # torch.profiler tables, per model
    python bench/cpu_throughput.py --configs tiny small --launch   # also real runs: TP=1 (1 proc), TP=2, DP=2 (2 procs)

Numbers are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megaclone.config import ModelConfig, RunConfig, load_run_config  # noqa: E402
from megaclone.spec import num_params  # noqa: E402
from megaclone.train.optim import lr_factor  # noqa: E402  (a scalar schedule: shared so both use the same lr)

Batch = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# The plain model: nanoGPT's structure, with the architecture options of ModelConfig so any config can be matched.
# ---------------------------------------------------------------------------------------------------------------

def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=True)
    return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


class PlainAttention(nn.Module):
    """Fused qkv laid out [all q heads | all k heads | all v heads] (llama-style); rope tables computed once."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.groups, self.head_size = cfg.num_heads, cfg.num_query_groups, cfg.head_size
        qkv_bias = cfg.bias if getattr(cfg, "qkv_bias", None) is None else cfg.qkv_bias
        self.qkv = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_query_groups) * cfg.head_size, qkv_bias)
        self.out = nn.Linear(cfg.num_heads * cfg.head_size, cfg.hidden_size, cfg.bias)
        self.dropout = cfg.attention_dropout
        self.rope = cfg.position == "rope"
        if self.rope:
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_size, 2).float() / cfg.head_size)
            angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq).repeat(1, 2)  # [max_seq, head]
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        s, half = x.shape[2], x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[:s] + rotated * self.sin[:s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.head_size
        q, k, v = self.qkv(x).split([self.heads * hd, self.groups * hd, self.groups * hd], dim=-1)
        q = q.view(b, s, self.heads, hd).transpose(1, 2)  # [batch, heads, seq, head]
        k = k.view(b, s, self.groups, hd).transpose(1, 2)  # [batch, groups, seq, head]
        v = v.view(b, s, self.groups, hd).transpose(1, 2)
        if self.rope:
            q, k = self._rotate(q), self._rotate(k)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True, enable_gqa=self.groups != self.heads)
        return self.out(y.transpose(1, 2).reshape(b, s, self.heads * hd))  # [batch, seq, heads x head]


class PlainMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated, self.approximate = cfg.activation == "swiglu", "none" if cfg.activation == "gelu_exact" else "tanh"
        self.fc_in = nn.Linear(cfg.hidden_size, (2 if self.gated else 1) * cfg.ffn_size, cfg.bias)
        self.fc_out = nn.Linear(cfg.ffn_size, cfg.hidden_size, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # [batch, seq, ffn] each
            return self.fc_out(F.silu(gate) * up)
        return self.fc_out(F.gelu(h, approximate=self.approximate))


class PlainBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = _norm(cfg), PlainAttention(cfg), _norm(cfg), PlainMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


# Architecture options of imported models that the plain baseline does not model, with their plain values.
UNMODELLED = {"parallel_residual": False, "rope_fraction": 1.0, "rope_scaling": "none"}


class PlainGPT(nn.Module):
    """nanoGPT's GPT: pre-norm blocks, (tied) embeddings; loss over the real vocabulary rows of the head only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        for key, plain in UNMODELLED.items():
            if getattr(cfg, key, plain) != plain:
                raise ValueError(f"model.{key}={getattr(cfg, key)!r}: the plain baseline models only {plain!r}")
        self.vocab = cfg.vocab_size
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.hidden_size) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.num_layers))
        self.ln_f = _norm(cfg)
        self.lm_head = None if cfg.tied_embeddings else nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)  # [batch, seq, hidden]
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(tokens.shape[1]))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.ln_f(x), head[: self.vocab])  # [batch, seq, vocab]: padding rows never scored
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def plain_optimizer(model: nn.Module, cfg: RunConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with megaclone's settings: decay on matrices and embeddings, none on norms and biases."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay,
                             "weight_decay": 0.0}], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.adam_eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(t))


def torch_loop_step(model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                    cfg: RunConfig) -> Callable[[list[Batch]], float]:
    """The plain torch training step both non-DeepSpeed variants use: accumulate, clip, step, schedule."""
    accum = cfg.train.grad_accum_steps

    def step(micro_batches: list[Batch]) -> float:
        total = 0.0
        for tokens, labels in micro_batches:
            loss = model(tokens, labels)
            (loss / accum).backward()
            total += loss.item()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return total / accum

    return step


def make_plain_step(cfg: RunConfig) -> tuple[nn.Module, Callable[[list[Batch]], float]]:
    model = PlainGPT(cfg.model)
    opt, sched = plain_optimizer(model, cfg)
    return model, torch_loop_step(model, opt, sched, cfg)


# ---------------------------------------------------------------------------------------------------------------
# megaclone: the engine `launch/pretrain.py` builds, stepped by the training loop's own `train_step`.
# ---------------------------------------------------------------------------------------------------------------

def make_megaclone_step(cfg: RunConfig) -> tuple[nn.Module, Callable[[list[Batch]], float]]:
    import torch.distributed as dist

    from megaclone.parallel import TPRNGTracker, build_layout
    from megaclone.train.engine import build_engine, build_model
    from megaclone.train.loop import train_step
    from megaclone.train.run import init_distributed

    threads = torch.get_num_threads()
    if not dist.is_initialized():
        init_distributed()  # a plain single process, like `python launch/pretrain.py`
    torch.set_num_threads(threads)  # init_distributed may split cores between local ranks: keep the bench's count
    layout = build_layout(cfg.parallel)
    module = build_model(cfg, layout, TPRNGTracker(cfg.train.seed, layout.tp_rank))
    engine = build_engine(cfg, layout, module, torch.device("cpu"))

    def step(micro_batches: list[Batch]) -> float:
        loss, _ = train_step(engine, iter(micro_batches), layout)
        return loss

    return module, step


def make_megaclone_model_step(cfg: RunConfig) -> tuple[nn.Module, Callable[[list[Batch]], float]]:
    """megaclone's GPT (TP=1) stepped exactly like the plain model, without DeepSpeed: separates the model's cost
    from the engine's in `--breakdown`."""
    from megaclone.model import GPT, global_named_parameters, init_params
    from megaclone.train.optim import build_optimizer

    module = GPT(cfg.model)
    init_params(global_named_parameters(module, cfg.model), cfg.model, cfg.train.seed)
    opt = build_optimizer(global_named_parameters(module, cfg.model), cfg.model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.train))
    return module, torch_loop_step(module, opt, sched, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Side-by-side measurement
# ---------------------------------------------------------------------------------------------------------------

def bench_run_config(name: str, overrides: list[str]) -> RunConfig:
    """The config as a TP=1, PP=1, fp32 run on random data (vocabulary: the config's, else its tokenizer size)."""
    cfg = load_run_config(ROOT / "configs" / f"{name}.yaml", overrides)
    if cfg.train.precision != "fp32":
        print(f"{name}: train.precision={cfg.train.precision} -> fp32 (CPU benchmark)")
    model = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)
    cfg = dataclasses.replace(cfg, model=model, parallel=dataclasses.replace(cfg.parallel, tp_size=1, pp_size=1),
                              train=dataclasses.replace(cfg.train, precision="fp32"))
    cfg.validate(world_size=1)
    return cfg


def _shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for p in module.parameters())


def _run(step: Callable[[list[Batch]], float], steps: list[list[Batch]]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for `steps`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for micro_batches in steps:
        step(micro_batches)
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(plain: list[float], other: list[float]) -> dict[str, float]:
    """Paired per-round ratios (other tok/s over plain tok/s) summarised by their median and quartiles: a burst of
    load from another process on a shared machine spoils a round or two of one model; the median ignores them."""
    ratios = sorted(p / m for p, m in zip(plain, other))
    return {"ratio": statistics.median(ratios), "q1": ratios[len(ratios) // 4],
            "q3": ratios[(3 * len(ratios)) // 4], "of_totals": sum(plain) / sum(other)}


def build_variants(cfg: RunConfig, breakdown: bool) -> dict[str, tuple[nn.Module, Callable[[list[Batch]], float]]]:
    variants = {"plain": make_plain_step(cfg), "megaclone": make_megaclone_step(cfg)}
    if breakdown:
        if cfg.parallel.zero_stage != 0:
            zero0 = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, zero_stage=0))
            variants["megaclone ZeRO-0"] = make_megaclone_step(zero0)
        variants["megaclone GPT, no DeepSpeed"] = make_megaclone_model_step(cfg)
    return variants


def bench_config(name: str, num_steps: int, rounds: int, overrides: list[str], profile: bool = False,
                 breakdown: bool = False) -> dict:
    cfg = bench_run_config(name, overrides)
    b, s, accum = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.grad_accum_steps
    gen = torch.Generator().manual_seed(0)
    steps = [[(torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen),
               torch.randint(0, cfg.model.vocab_size, (b, s), generator=gen)) for _ in range(accum)]
             for _ in range(num_steps)]
    variants = build_variants(cfg, breakdown)
    shapes = {label: _shapes(module) for label, (module, _) in variants.items()}
    for label, shape in shapes.items():
        if shape != shapes["plain"]:
            raise AssertionError(f"{name}: parameter shapes differ: plain {shapes['plain']} vs {label} {shape}")
    first_loss = {label: fn(steps[0]) for label, (_, fn) in variants.items()}  # also the warm-up
    for _, fn in variants.values():
        _run(fn, steps[1:3])
    wall: dict[str, list[float]] = {label: [] for label in variants}
    cpu: dict[str, list[float]] = {label: [] for label in variants}
    order = list(variants)
    load_before = os.getloadavg()[0]
    for r in range(rounds):
        for label in order[r % len(order):] + order[: r % len(order)]:  # every variant leads in turn
            w, c = _run(variants[label][1], steps)
            wall[label].append(w)
            cpu[label].append(c)
    tokens = num_steps * b * s * accum  # per round
    result = {"config": name, "params": num_params(cfg.model), "layers": cfg.model.num_layers,
              "hidden": cfg.model.hidden_size, "vocab": cfg.model.vocab_size, "batch": b, "seq": s, "accum": accum,
              "threads": torch.get_num_threads(), "steps": num_steps, "rounds": rounds,
              "tokens_per_s": {label: tokens / statistics.median(t) for label, t in wall.items()},
              "tokens_per_cpu_s": {label: tokens / statistics.median(t) for label, t in cpu.items()},
              "wall": {label: _summary(wall["plain"], t) for label, t in wall.items() if label != "plain"},
              "cpu": {label: _summary(cpu["plain"], t) for label, t in cpu.items() if label != "plain"},
              "first_loss": first_loss, "load_avg": (load_before, os.getloadavg()[0])}
    result["ratio"] = result["wall"]["megaclone"]["ratio"]
    if profile:
        result["profile"] = {label: profile_step(fn, steps[:5]) for label, (_, fn) in variants.items()}
    return result


def profile_step(step: Callable[[list[Batch]], float], steps: list[list[Batch]], top: int = 18) -> str:
    """torch.profiler table (self CPU time) over a few steps: the ops where one model spends more than the other."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for micro_batches in steps:
            step(micro_batches)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ---------------------------------------------------------------------------------------------------------------
# Real multi-process runs
# ---------------------------------------------------------------------------------------------------------------

def launch_tokens_per_s(name: str, run_dir: Path, procs: int, extra: list[str], steps: int,
                        threads: int | None = None) -> dict:
    """Median tokens/s of the steps after the first two in a real run, read from its `metrics.jsonl`."""
    script = [str(ROOT / "launch" / "pretrain.py")]
    if procs > 1:
        cmd = ["deepspeed", "--num_gpus", str(procs), "--master_port", str(29600 + procs), *script]
    else:
        cmd = [sys.executable, *script]
    cmd += ["--config", str(ROOT / "configs" / f"{name}.yaml"), "--train-iters", str(steps), "--run-dir", str(run_dir),
            "--set", "train.eval_interval=0", "train.eval_iters=1", "train.precision=fp32", "checkpoint.save=''",
            *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT", "OMP_NUM_THREADS")}
    if threads:  # else pretrain.py shares the cores between its local ranks
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = max(i for i, r in enumerate(records) if r.get("event") == "start")  # this run's records only
    run = records[start:]
    train = [r for r in run if r.get("event") == "train"][2:]  # drop warm-up steps
    if not train:
        raise RuntimeError(f"{run_dir}/metrics.jsonl: no train records after warm-up (steps={steps})")
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "tokens_per_step": round(train[0]["tokens_per_s"] * train[0]["step_time"]), "layout": run[0]["layout"],
            "world_size": run[0]["world_size"]}


# (label, processes, flags, threads per process: None = pretrain.py's default, the cores shared between ranks)
LAUNCHES = (("TP=1 (1 proc x 2 threads)", 1, [], None), ("TP=1 (1 proc x 1 thread)", 1, [], 1),
            ("TP=2 (2 procs x 1 thread)", 2, ["--tp", "2"], None),
            ("DP=2 ZeRO-1 (2 procs x 1 thread)", 2, ["--tp", "1", "--zero-stage", "1"], None))


def bench_launches(name: str, steps: int) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / name  # one directory: the corpus and tokenizer are built once and reused
        for label, procs, extra, threads in LAUNCHES:
            load = os.getloadavg()[0]
            r = launch_tokens_per_s(name, run_dir, procs, extra, steps, threads)
            out.append({"config": name, "run": label, **r, "load_avg": (load, os.getloadavg()[0])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"], help="names under configs/")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per model per round")
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds (order flips every round)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time megaclone with ZeRO-0 and megaclone's GPT without DeepSpeed")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of every variant")
    parser.add_argument("--launch", action="store_true", help="also real runs: TP=1, TP=2 and DP=2 via deepspeed")
    parser.add_argument("--launch-only", action="store_true", help="only the real runs")
    parser.add_argument("--launch-steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.configs if not args.launch_only else []:
        r = bench_config(name, args.steps, args.rounds, args.set, args.profile, args.breakdown)
        results.append(r)
        print(f"{name}: {r['params'] / 1e6:.2f}M params (L={r['layers']} d={r['hidden']} V={r['vocab']}), batch "
              f"{r['batch']}x{r['seq']}x{r['accum']}, {r['threads']} threads, {r['rounds']} rounds x {r['steps']} "
              f"steps, load average {r['load_avg'][0]:.2f} -> {r['load_avg'][1]:.2f}", flush=True)
        for label, rate in r["tokens_per_s"].items():
            line = (f"  {label:28s} {rate:8.0f} tok/s {r['tokens_per_cpu_s'][label]:8.0f} tok/CPU-s  step-1 loss "
                    f"{r['first_loss'][label]:.4f}")
            if label != "plain":
                w, c = r["wall"][label], r["cpu"][label]
                line += (f"  ratio {w['ratio']:.3f} (quartiles {w['q1']:.3f}-{w['q3']:.3f}, of totals "
                         f"{w['of_totals']:.3f}); CPU-time ratio {c['ratio']:.3f} ({c['q1']:.3f}-{c['q3']:.3f})")
            print(line, flush=True)
        for label, table in r.get("profile", {}).items():
            print(f"--- {name} {label}: torch.profiler, {min(5, args.steps)} steps ---\n{table}", flush=True)
    for name in args.configs if args.launch or args.launch_only else []:
        for r in bench_launches(name, args.launch_steps):
            results.append(r)
            print(f"{name} {r['run']}: {r['tokens_per_s']:.0f} tok/s ({r['tokens_per_step']} tokens/step, median of "
                  f"steps 3-{args.launch_steps}; load average {r['load_avg'][0]:.2f} -> {r['load_avg'][1]:.2f})",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in results], indent=1))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
