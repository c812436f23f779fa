#!/usr/bin/env bash
# The megaclone demo on the bundled corpus (U.S. State of the Union addresses, public domain), in about 5 minutes
# on 2 CPU cores:
#   1. a tokenizer and token shards, then a small GPT trained with DeepSpeed (NPROC processes), with checkpoints
#   2. a generated sample from the small model's checkpoint
#   3. HyperCloning: the small checkpoint widened 2x at launch (each rank building its own slice, the preservation
#      error measured and logged), then trained on at the new width, with the small run's settings and token shards
#   4. a summary: the held-out loss before and after, what the numbers mean, where every output went, and a PNG
# On CPU the NPROC processes run over gloo; on a GPU machine they take one GPU each. Outputs go under RUN, the
# paths the README's examples use (runs/demo/small/ckpt, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}
RUN=${RUN:-runs/demo}
SMALL_ITERS=${SMALL_ITERS:-500}
WIDE_ITERS=${WIDE_ITERS:-200}
export PYTHONUNBUFFERED=1
if ! nvidia-smi -L >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu  # no GPU: say so, instead of a DeepSpeed warning from every process that looks for one
fi
START=$SECONDS
stage() { echo "== $1 [$((SECONDS - START)) s]"; }
if [ -e "$RUN" ]; then  # a run appends to its metrics.jsonl, and --save refuses to write over a step directory
    echo "== removing the previous demo's outputs under $RUN (keeping its token shards, which this run reuses)"
    rm -rf "$RUN/small/ckpt" "$RUN/small/metrics.jsonl" "$RUN/small/tensorboard" "$RUN/wide" "$RUN/heldout_loss.png"
fi
DEEPSPEED=(deepspeed --quiet --num_gpus "$NPROC")  # --quiet: no launcher INFO lines; errors still show

stage "1/4 train the small model (configs/small.yaml, $SMALL_ITERS steps, $NPROC processes; they start in ~10 s)"
"${DEEPSPEED[@]}" launch/pretrain.py --config configs/small.yaml --train-iters "$SMALL_ITERS" \
    --set train.eval_interval=50 --run-dir "$RUN/small" --save "$RUN/small/ckpt"

stage "2/4 sample from the small model's checkpoint"
python tools/generate.py --ckpt "$RUN/small/ckpt" --prompt "The state of the Union" --tokens 60

stage "3/4 widen it 2x (HyperCloning, the defaults: diagonal copies + 0 dB zero-sum noise) and train on at the new width"
# No --config: the wide run takes the small run's training settings and token shards from its checkpoint.
"${DEEPSPEED[@]}" launch/pretrain.py --init-from "$RUN/small/ckpt" --hyperclone 2 --train-iters "$WIDE_ITERS" \
    --set train.warmup_iters=30 train.eval_interval=20 --run-dir "$RUN/wide" --save "$RUN/wide/ckpt"

stage "4/4 summary"
python tools/widening_report.py --small "$RUN/small" --wide "$RUN/wide" --png "$RUN/heldout_loss.png"
stage "done"
