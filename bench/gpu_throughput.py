"""GPU training throughput and MFU of the large configs at TP=1 in bf16 on one device.

Runs without DeepSpeed (the GPU machine may lack it): megaclone's `GPT` with fp32 master weights, bf16 autocast,
torch's fused AdamW (megaclone's parameter groups) and gradient clipping, optionally `torch.compile`d. When
DeepSpeed is importable, `--engine auto` uses the engine `launch/pretrain.py` builds instead (bf16 weights, fp32
masters in the optimizer). Batches are random tokens, so data loading is not measured.

MFU = model FLOPs per token x tokens/s / peak bf16 FLOP/s, with model FLOPs per token = 6 N + 12 L H Q s
(PaLM, appendix B: N = parameters that take part in matmuls, i.e. all but the position embedding and an untied
input embedding; L layers, H heads of size Q, s the sequence length; causal masking not discounted). MFU
without the attention term (6 N only) is printed too. Peak: 989e12 (H100 SXM and H200, dense bf16); set
--peak-flops for other devices.

    python bench/gpu_throughput.py                                   # gpt-350m and gpt-1.3b, 10 timed steps
    python bench/gpu_throughput.py --compile --engine torch --json gpu.json
    python bench/gpu_throughput.py --configs configs/tiny.yaml --steps 2 --warmup 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megaclone.checkpoint.manifest import atomic_write_text  # noqa: E402
from megaclone.config import ModelConfig, RunConfig, load_run_config  # noqa: E402
from megaclone.model import GPT, global_named_parameters  # noqa: E402
from megaclone.spec import build_param_specs, num_params  # noqa: E402
from megaclone.train.optim import build_optimizer  # noqa: E402

H100_PEAK_BF16 = 989e12  # dense bf16 FLOP/s, H100 SXM and H200 alike
Batch = tuple[torch.Tensor, torch.Tensor]


def matmul_params(cfg: ModelConfig) -> int:
    """N of 6N: every parameter except lookups that do no matmul (positions; the input embedding when untied)."""
    lookups = {"pos_embedding"} | ({"embedding"} if not cfg.tied_embeddings else set())
    return sum(s.numel for s in build_param_specs(cfg) if s.role not in lookups)


def flops_per_token(cfg: ModelConfig, seq_len: int, attention: bool = True) -> float:
    """Training FLOPs per token: 6 N, plus 12 L H Q s for the attention scores and values when `attention`."""
    extra = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len if attention else 0.0
    return 6.0 * matmul_params(cfg) + extra


def bench_run_config(path: Path, overrides: list[str]) -> RunConfig:
    """The config at TP=1, PP=1, DP=1 in bf16 (vocabulary: the config's, else the size its tokenizer will have)."""
    cfg = load_run_config(path, overrides)
    model = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)
    cfg = dataclasses.replace(cfg, model=model, parallel=dataclasses.replace(cfg.parallel, tp_size=1, pp_size=1),
                              train=dataclasses.replace(cfg.train, precision="bf16"))
    cfg.validate(world_size=1)
    return cfg


@torch.no_grad()
def fast_init(module: nn.Module, cfg: ModelConfig) -> None:
    """Spec-table roles, on the device: norms 1, biases 0, the rest N(0, init_std). Speed does not depend on the
    exact values, and megaclone's layout-invariant counter init takes minutes for 1.3B parameters on a CPU."""
    roles = {s.name: s for s in build_param_specs(cfg)}
    for name, p in global_named_parameters(module, cfg).items():
        spec = roles[name]
        if spec.is_bias:
            p.zero_()
        elif spec.role in ("norm", "final_norm"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, cfg.init_std)


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def build_torch_step(cfg: RunConfig, device: torch.device, compile_model: bool) -> Callable[[list[Batch]], None]:
    """fp32 master weights, bf16 autocast, fused AdamW (on CUDA), clipping: what a DeepSpeed-free run would do."""
    module = GPT(cfg.model).to(device)
    fast_init(module, cfg.model)
    optimizer = build_optimizer(global_named_parameters(module, cfg.model), cfg.model, cfg.train)
    forward = torch.compile(module) if compile_model else module
    accum, clip = cfg.train.grad_accum_steps, cfg.train.grad_clip

    def step(micro_batches: list[Batch]) -> None:
        for tokens, labels in micro_batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward(tokens, labels)
            (loss / accum).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_deepspeed_step(cfg: RunConfig, device: torch.device, compile_model: bool) -> Callable[[list[Batch]], None]:
    """The engine `launch/pretrain.py` builds (ZeRO stage from the config, bf16), stepped by the loop's train_step."""
    import torch.distributed as dist

    from megaclone.parallel import TPRNGTracker, build_layout
    from megaclone.train.engine import build_engine, build_model
    from megaclone.train.loop import train_step
    from megaclone.train.run import init_distributed

    if not dist.is_initialized():
        init_distributed()
    layout = build_layout(cfg.parallel)
    module = build_model(cfg, layout, TPRNGTracker(cfg.train.seed, layout.tp_rank, device), init=False)
    fast_init(module.to(device), cfg.model)
    engine = build_engine(cfg, layout, module, device)
    if compile_model:
        engine.compile()

    def step(micro_batches: list[Batch]) -> None:
        train_step(engine, iter(micro_batches), layout)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(path: Path, args: argparse.Namespace, device: torch.device, use_deepspeed: bool) -> dict:
    overrides = list(args.set)
    for key, value in (("train.micro_batch_size", args.micro_batch), ("data.seq_len", args.seq_len),
                       ("train.grad_accum_steps", args.grad_accum)):
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = bench_run_config(path, overrides)
    b, s, accum = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.train.grad_accum_steps
    torch.manual_seed(cfg.train.seed)
    batches = [[(torch.randint(0, cfg.model.vocab_size, (b, s), device=device),
                 torch.randint(0, cfg.model.vocab_size, (b, s), device=device)) for _ in range(accum)]
               for _ in range(2)]
    build = build_deepspeed_step if use_deepspeed else build_torch_step
    step = build(cfg, device, args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):  # compilation, allocator and autotuning warm-up
        step(batches[i % 2])
    _sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        step(batches[i % 2])
    _sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * b * s * accum / seconds
    result = {"config": str(path), "engine": "deepspeed" if use_deepspeed else "torch", "compile": args.compile,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "params": num_params(cfg.model), "matmul_params": matmul_params(cfg.model),
              "layers": cfg.model.num_layers, "hidden": cfg.model.hidden_size, "vocab": cfg.model.vocab_size,
              "micro_batch": b, "seq": s, "grad_accum": accum, "steps": args.steps,
              "step_time": seconds / args.steps, "tokens_per_s": tokens_per_s,
              "flops_per_token": flops_per_token(cfg.model, s)}
    if args.peak_flops:
        result["peak_flops"] = args.peak_flops
        result["mfu"] = result["flops_per_token"] * tokens_per_s / args.peak_flops
        result["mfu_6n"] = flops_per_token(cfg.model, s, attention=False) * tokens_per_s / args.peak_flops
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _describe(r: dict) -> str:
    text = (f"{Path(r['config']).stem}: {r['params'] / 1e6:.1f}M params, batch {r['micro_batch']}x{r['seq']}"
            f"x{r['grad_accum']}, {r['engine']}{' +compile' if r['compile'] else ''} on {r['device']}: "
            f"{r['tokens_per_s']:.0f} tok/s, {r['step_time'] * 1e3:.1f} ms/step")
    if "mfu" in r:
        text += f", MFU {100 * r['mfu']:.1f}% (6N only {100 * r['mfu_6n']:.1f}%) of {r['peak_flops']:.3g} FLOP/s"
    if "peak_memory_gib" in r:
        text += f", peak memory {r['peak_memory_gib']:.1f} GiB"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path,
                        default=[ROOT / "configs" / "gpt-350m.yaml", ROOT / "configs" / "gpt-1.3b.yaml"])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--micro-batch", type=int, help="override train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, help="override data.seq_len")
    parser.add_argument("--grad-accum", type=int, help="override train.grad_accum_steps")
    parser.add_argument("--set", nargs="+", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help=f"peak bf16 FLOP/s for MFU (default on CUDA: {H100_PEAK_BF16:.0e}, H100 SXM / H200; "
                             "on CPU no MFU unless given)")
    parser.add_argument("--engine", choices=("auto", "deepspeed", "torch"), default="auto",
                        help="auto: DeepSpeed's engine when importable, else plain torch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (engine.compile() on DS)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for key in ("steps", "warmup"):
        if getattr(args, key) < (1 if key == "steps" else 0):
            parser.error(f"--{key}={getattr(args, key)} is too small")
    for path in args.configs:
        if not path.is_file():
            parser.error(f"--configs: config file {path} does not exist")
    device = torch.device(args.device)
    if device.type == "cuda" and args.peak_flops is None:
        args.peak_flops = H100_PEAK_BF16
    has_ds = deepspeed_available()
    if args.engine == "deepspeed" and not has_ds:
        parser.error("--engine deepspeed: deepspeed is not installed")
    use_deepspeed = args.engine == "deepspeed" or (args.engine == "auto" and has_ds)
    print(f"torch {torch.__version__}, device {device}, engine {'deepspeed' if use_deepspeed else 'torch'}", flush=True)
    results = []
    for path in args.configs:
        try:
            r = bench_config(path, args, device, use_deepspeed)
        except torch.OutOfMemoryError as e:
            print(f"{path.stem}: out of memory ({str(e).splitlines()[0]}); try a smaller --micro-batch", flush=True)
            r = {"config": str(path), "error": "out of memory"}
            torch.cuda.empty_cache()
        else:
            print(_describe(r), flush=True)
        results.append(r)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=1))
    if use_deepspeed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if all(math.isfinite(r.get("tokens_per_s", math.nan)) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
