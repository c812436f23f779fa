"""Check that a grown checkpoint computes the same function as the small one it was cloned from.

    python tools/verify_clone.py --small runs/small/ckpt --large runs/wide/ckpt
    python tools/verify_clone.py --small A --large B --text held_out.txt --tokens 8192

Both checkpoints (any layout) are loaded whole into this CPU process. The logits are compared on random
tokens, or on held-out text when --text is given (the small checkpoint must carry its tokenizer.model).
Prints the max abs and relative logit difference (relative to the small model's max |logit|), the next-token
loss of both and, per layer, the mean cosine similarity between the copies of the widened attention and MLP
weights (1.0: the copies are still identical). A depth growth by stack or interleave (read from the large
checkpoint's provenance) does not preserve the function by construction: its loss change is reported and not
judged. Exit code 0: within --tolerance (or not preserving by construction); 1: past it; 2: bad input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megaclone.checkpoint import CheckpointError, load_model, read_manifest, resolve_checkpoint  # noqa: E402
from megaclone.clone import (  # noqa: E402
    axis_factor,
    clone_factors,
    copy_similarity,
    depth_plan,
    describe_growth,
    groups_factor,
    grown_model_config,
)
from megaclone.config import GROW_METHODS, CloneConfig, ModelConfig  # noqa: E402
from megaclone.spec import build_param_specs  # noqa: E402

MONITORED = ("qkv", "attn_out", "mlp_in", "mlp_gate_up", "mlp_out")


class InputError(ValueError):
    """A problem with the command line or the inputs (exit code 2)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", required=True, help="small checkpoint: root (follows `latest`) or step directory")
    parser.add_argument("--large", required=True, help="widened checkpoint: root or step directory")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens to compare in total (default 2048)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward pass (default 4)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default min(128, max_seq_len))")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="max abs logit difference allowed, relative to max |logit| (default 1e-5)")
    parser.add_argument("--text", help="held-out text file, tokenized with the small checkpoint's tokenizer.model")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random tokens")
    return parser.parse_args(argv)


def clone_factors_between(small: ModelConfig, large: ModelConfig, grow_method: str = "zero") -> CloneConfig:
    """The clone config that grows `small` into `large`, or InputError naming what differs."""
    n, rest = divmod(large.hidden_size, small.hidden_size)
    m, rest_ffn = divmod(large.ffn_size, small.ffn_size)
    g, rest_groups = divmod(large.num_query_groups, small.num_query_groups)
    grow = large.num_layers if large.num_layers != small.num_layers else 0
    if rest or rest_ffn or rest_groups or min(n, m, g) < 1 or (n == m == 1 and not grow):
        raise InputError(f"the large model (hidden {large.hidden_size}, ffn {large.ffn_size}, groups "
                         f"{large.num_query_groups}, {large.num_layers} layers) is not an integer growth of the small "
                         f"one (hidden {small.hidden_size}, ffn {small.ffn_size}, groups {small.num_query_groups}, "
                         f"{small.num_layers} layers)")
    clone = CloneConfig(init_from="small", factor=n, ffn_factor=m, groups_factor=g, grow_layers=grow,
                        grow_method=grow_method)
    try:
        expected = grown_model_config(small, clone)
    except ValueError as e:
        raise InputError(f"the large model is not a growth of the small one: {e}") from e
    diffs = [f"{k}: large has {getattr(large, k)!r}, a {describe_growth(small, clone)} clone has "
             f"{getattr(expected, k)!r}" for k in vars(expected) if getattr(large, k) != getattr(expected, k)]
    if diffs:
        raise InputError("the large checkpoint is not a HyperClone of the small one: " + "; ".join(diffs))
    return clone


def recorded_grow_method(large_path: str, small: ModelConfig, large: ModelConfig) -> str:
    """How the large checkpoint was deepened, from its manifest's provenance (only asked when the depths differ)."""
    if large.num_layers == small.num_layers:
        return "zero"
    record = read_manifest(large_path).provenance.get("hyperclone") or {}
    method = record.get("grow_method")
    if method not in GROW_METHODS:
        raise InputError(f"the large checkpoint has {large.num_layers} layers, the small one {small.num_layers}, but "
                         f"{large_path}'s manifest records no growth method (provenance.hyperclone.grow_method: "
                         f"{method!r})")
    return method


def build_tokens(args: argparse.Namespace, small_path: str, cfg: ModelConfig) -> tuple[torch.Tensor, str]:
    """[rows, seq] token ids to compare on, and a description of where they came from."""
    seq = args.seq if args.seq is not None else min(128, cfg.max_seq_len)
    if not 2 <= seq <= cfg.max_seq_len:
        raise InputError(f"--seq={seq}: expected 2 <= seq <= max_seq_len={cfg.max_seq_len}")
    if args.tokens < seq or args.batch < 1:
        raise InputError(f"--tokens={args.tokens} must be >= --seq={seq} and --batch={args.batch} >= 1")
    rows = args.tokens // seq
    if args.text is None:
        g = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, cfg.vocab_size, (rows, seq), generator=g), f"random tokens (seed {args.seed})"
    from megaclone.data import Tokenizer

    text_path = Path(args.text)
    if not text_path.is_file():
        raise InputError(f"--text {text_path} does not exist")
    manifest = read_manifest(small_path)
    if manifest.tokenizer is None:
        raise InputError(f"--text needs a tokenizer, but the small checkpoint {small_path} has no tokenizer.model")
    tokenizer = Tokenizer.load(resolve_checkpoint(small_path) / manifest.tokenizer)
    ids = tokenizer.encode(text_path.read_text(encoding="utf-8"))
    if len(ids) < seq:
        raise InputError(f"--text {text_path} has {len(ids)} tokens, fewer than --seq={seq}")
    if max(ids) >= cfg.vocab_size:
        raise InputError(f"tokenizer of {small_path} gives id {max(ids)} >= model vocab_size={cfg.vocab_size}")
    rows = min(rows, len(ids) // seq)
    return torch.tensor(ids[: rows * seq]).view(rows, seq), f"text {text_path}"  # [rows, seq]


@torch.no_grad()
def compare_logits(small: torch.nn.Module, large: torch.nn.Module, tokens: torch.Tensor,
                   batch: int) -> tuple[float, float, float, float]:
    """(max abs difference, small model's max |logit|, small loss, large loss) over all tokens; the losses are
    the mean next-token cross-entropy."""
    max_diff, max_logit, losses = 0.0, 0.0, torch.zeros(2, dtype=torch.float64)
    for start in range(0, tokens.shape[0], batch):
        chunk = tokens[start: start + batch]
        ref, got = small(chunk), large(chunk)  # [batch, seq, vocab]
        max_diff = max(max_diff, (got - ref).abs().max().item())
        max_logit = max(max_logit, ref.abs().max().item())
        labels = chunk[:, 1:].flatten()
        for k, logits in enumerate((ref, got)):
            losses[k] += F.cross_entropy(logits[:, :-1].flatten(0, 1), labels, reduction="sum").item()
    count = tokens.shape[0] * (tokens.shape[1] - 1)
    return max_diff, max_logit, float(losses[0] / count), float(losses[1] / count)


def similarity_table(large: torch.nn.Module, cfg: ModelConfig, n: int, m: int, g: int | None = None) -> list[str]:
    params = dict(large.named_parameters())
    specs = {(s.layer, s.role): s for s in build_param_specs(cfg) if not s.is_bias}
    columns = [r for r in MONITORED if r != ("mlp_in" if cfg.gated else "mlp_gate_up")]
    lines = ["layer  " + "  ".join(f"{c:>11s}" for c in columns)]
    for layer in range(1, cfg.num_layers + 1):
        cells = []
        for role in columns:
            spec = specs[(layer, role)]
            if axis_factor(spec.axes[0], n, m, g) == 1:
                cells.append(f"{'n/a':>11s}")
                continue
            cells.append(f"{copy_similarity(params[spec.name].detach(), spec, n, m, g=g):11.6f}")
        lines.append(f"{layer - 1:5d}  " + "  ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not (args.tolerance >= 0 and math.isfinite(args.tolerance)):
            raise InputError(f"--tolerance={args.tolerance}: expected a finite number >= 0")
        small, small_cfg = load_model(args.small)
        large, large_cfg = load_model(args.large)
        clone = clone_factors_between(small_cfg, large_cfg, recorded_grow_method(args.large, small_cfg, large_cfg))
        tokens, source = build_tokens(args, args.small, small_cfg)
    except (CheckpointError, InputError, FileNotFoundError, ValueError) as e:
        print(f"verify_clone: error: {e}", file=sys.stderr)
        return 2
    n, m = clone_factors(clone)
    depth = depth_plan(small_cfg, clone)
    print(f"small {args.small}: hidden {small_cfg.hidden_size}, heads {small_cfg.num_heads}, "
          f"groups {small_cfg.num_query_groups}, ffn {small_cfg.ffn_size}, {small_cfg.num_layers} layers")
    print(f"large {args.large}: {describe_growth(small_cfg, clone)} clone: hidden {large_cfg.hidden_size}, heads "
          f"{large_cfg.num_heads}, groups {large_cfg.num_query_groups}, ffn {large_cfg.ffn_size}, "
          f"{large_cfg.num_layers} layers")
    print(f"comparing {tokens.numel()} tokens ({tokens.shape[0]} x {tokens.shape[1]}) of {source}")
    max_diff, max_logit, small_loss, large_loss = compare_logits(small, large, tokens, args.batch)
    relative = max_diff / max_logit if max_logit > 0 else (0.0 if max_diff == 0 else math.inf)
    print(f"max |logit| {max_logit:.6g}   max abs diff {max_diff:.3e}   relative {relative:.3e}   "
          f"(tolerance {args.tolerance:g})")
    print(f"next-token loss: small {small_loss:.6f}   large {large_loss:.6f}   change {large_loss - small_loss:+.6f}")
    print("mean cosine similarity between the copies of each output unit (1.0: copies identical):")
    for line in similarity_table(large, large_cfg, n, m, groups_factor(clone)):
        print("  " + line)
    if not depth.preserving:
        print(f"NOT CHECKED: depth growth by {depth.method} does not preserve the function by construction; the "
              f"loss changed by {large_loss - small_loss:+.6f} on these tokens")
        return 0
    ok = relative <= args.tolerance
    print("PASS: the large model computes the small model's function" if ok else
          f"FAIL: relative logit difference {relative:.3e} exceeds the tolerance {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
