"""Sample text from a megaclone checkpoint of any layout (loaded whole into one CPU process).

    python tools/generate.py --ckpt runs/demo/small/ckpt --prompt "The state of the Union" --tokens 60
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclone.checkpoint import CheckpointError, load_model, read_manifest, resolve_checkpoint  # noqa: E402
from megaclone.data import Tokenizer  # noqa: E402


@torch.no_grad()
def sample(model: torch.nn.Module, tokens: list[int], new_tokens: int, temperature: float, top_k: int,
           max_seq_len: int, generator: torch.Generator) -> list[int]:
    """Autoregressive sampling with temperature and top-k; the context is cut to the model's window."""
    out = list(tokens)
    for _ in range(new_tokens):
        context = torch.tensor([out[-max_seq_len:]])
        logits = model(context)[0, -1].float()  # [vocab]
        if temperature <= 0:
            out.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out.append(int(torch.multinomial(logits.softmax(-1), 1, generator=generator)))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint root (follows `latest`) or step directory")
    parser.add_argument("--prompt", default="The")
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.ckpt)
        manifest = read_manifest(ckpt)
        if not manifest.tokenizer:
            raise CheckpointError(f"{ckpt}: the manifest names no tokenizer; cannot turn a prompt into tokens")
        tokenizer = Tokenizer.load(ckpt / manifest.tokenizer)
        model, cfg = load_model(ckpt)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids = sample(model, tokenizer.encode(args.prompt), args.tokens, args.temperature, args.top_k,
                 cfg.max_seq_len, torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
