#!/usr/bin/env bash
# The megaclone demo on the bundled corpus (U.S. State of the Union addresses, public domain):
#   1. tokenizer + packed shards, a small GPT trained with DeepSpeed (NPROC processes), checkpoints
#   2. a generated sample from the small model's checkpoint
#   3. HyperCloning: the small checkpoint widened 2x at launch, each rank building its own slice,
#      the function-preservation error measured and logged, training continued at the new width
#   4. a summary: small model's loss, preservation error, wide model's loss before and after
# On CPU NPROC processes run over gloo; on a GPU machine they take one GPU each.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
RUN=${RUN:-runs/demo}
WIDE_ITERS=${WIDE_ITERS:-300}
export PYTHONUNBUFFERED=1

echo "== 1/4 train the small model (configs/small.yaml, $NPROC processes)"
deepspeed --num_gpus "$NPROC" launch/pretrain.py --config configs/small.yaml \
    --run-dir "$RUN/small" --save "$RUN/small/ckpt"

echo "== 2/4 sample from the small model"
python tools/generate.py --ckpt "$RUN/small/ckpt" --prompt "The state of the Union" --tokens 60

echo "== 3/4 widen 2x (HyperCloning: the defaults, diagonal + 0 dB zero-sum noise) and train on at the new width"
deepspeed --num_gpus "$NPROC" launch/pretrain.py --init-from "$RUN/small/ckpt" --hyperclone 2 \
    --config configs/small.yaml --train-iters "$WIDE_ITERS" \
    --set train.warmup_iters=30 train.eval_interval=100 checkpoint.save_interval=0 \
    --run-dir "$RUN/wide" --save "$RUN/wide/ckpt"

echo "== 4/4 summary"
python - "$RUN" <<'PY'
import sys
from megaclone.train import read_metrics

run = sys.argv[1]
small = read_metrics(f"{run}/small", "eval")
clone = read_metrics(f"{run}/wide", "clone")[-1]
wide = read_metrics(f"{run}/wide", "eval")
print(f"small model: held-out loss {small[0]['eval_loss']:.4f} (step {small[0]['step']}) -> "
      f"{small[-1]['eval_loss']:.4f} (step {small[-1]['step']})")
print(f"widened 2x: max |logit diff| / max |logit| = {clone['preservation_rel_error']:.2e}, "
      f"loss small {clone['small_loss']:.4f} vs wide {clone['wide_loss']:.4f} on the same batch")
print(f"wide model: held-out loss {wide[0]['eval_loss']:.4f} at the widening -> {wide[-1]['eval_loss']:.4f} "
      f"after {wide[-1]['step'] - wide[0]['step']} more steps")
PY
