"""Pretrain a GPT with TP/PP/ZeRO on DeepSpeed, from scratch, resumed, or HyperCloned from a smaller checkpoint.

    deepspeed --num_gpus 2 launch/pretrain.py --config configs/tiny.yaml --tp 2 --save runs/tiny/ckpt
    torchrun --nproc_per_node 2 launch/pretrain.py --config configs/tiny.yaml --zero-stage 2
    python launch/pretrain.py --config configs/small.yaml
    deepspeed --num_gpus 2 launch/pretrain.py --init-from runs/tiny/ckpt --hyperclone 2 --clone-noise-db 10
"""

import os
import sys
from pathlib import Path

RANK = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
if RANK == "0" and not {"-h", "--help"} & set(sys.argv):  # the imports below take seconds: say something first
    print("pretrain.py: starting (torch and DeepSpeed load first)", flush=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megaclone.train.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
