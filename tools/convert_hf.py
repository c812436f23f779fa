"""Convert between Hugging Face checkpoints (Llama, Mistral, Qwen2, GPT-NeoX/Pythia, GPT-2, OPT, OLMo, OLMo-2, Gemma)
and megaclone.

    python tools/convert_hf.py import --hf-dir models/pythia-160m --output runs/pythia/ckpt --tp 2 --pp 2
    python tools/convert_hf.py export --ckpt runs/wide/ckpt --hf-dir out/wide-hf [--family gpt_neox]

Import reads config.json, the safetensors weights (sharded ones through model.safetensors.index.json) and
the tokenizer (tokenizer.model, else tokenizer.json), and writes a megaclone checkpoint at the given
layout tensor by tensor. Export writes config.json, model.safetensors and the tokenizer files, loadable by
transformers.AutoModelForCausalLM.from_pretrained. See docs/hf.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclone.hf import FAMILIES, export_hf_checkpoint, import_hf_checkpoint  # noqa: E402
from megaclone.hf.files import DTYPES  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="HF model directory -> megaclone checkpoint")
    i.add_argument("--hf-dir", required=True, type=Path, help="directory with config.json and *.safetensors")
    i.add_argument("--output", required=True, type=Path, help="new checkpoint ROOT (must not exist or be empty)")
    i.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written shards")
    i.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written shards")
    i.add_argument("--vocab-multiple", type=int, default=128,
                   help="pad the vocabulary to a multiple of this (default 128; the padding rows are zeros)")
    e = sub.add_parser("export", help="megaclone checkpoint -> HF model directory")
    e.add_argument("--ckpt", required=True, type=Path, help="checkpoint ROOT (follows `latest`) or step directory")
    e.add_argument("--hf-dir", required=True, type=Path, help="new output directory (must not exist or be empty)")
    e.add_argument("--family", choices=FAMILIES, default=None,
                   help="HF family to write (default: the imported one, else the only family that fits)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    e.add_argument("--max-shard-gb", type=float, default=5.0, help="split model.safetensors above this size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "import":
            step_dir = import_hf_checkpoint(args.hf_dir, args.output, args.tp, args.pp, args.vocab_multiple)
            print(f"wrote megaclone checkpoint {step_dir} (tp={args.tp}, pp={args.pp})")
        else:
            out = export_hf_checkpoint(args.ckpt, args.hf_dir, args.family, args.dtype,
                                       max(1, int(args.max_shard_gb * (1 << 30))))
            print(f"wrote Hugging Face model {out}")
    except (ValueError, FileNotFoundError) as err:
        print(f"convert_hf.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
