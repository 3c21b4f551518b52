#!/usr/bin/env bash
# The control a DUS user asks about: is the deeper model, healed, better than the base model
# fine-tuned on the same data for the same tokens? Run after scripts/demo.sh, on its outputs:
#   1. fine-tune the base model (all parameters, cross-entropy) on the data the default heal
#      distils on (data/text/train.jsonl), with the heal's budget: the same steps, batch,
#      packed sequence length, warm-up and schedule (its learning rate, 1e-4, is the one
#      full-parameter distillation used in benchmarks/bench_healing.py; not tuned further)
#   2. compare base, unhealed, healed and the control on every bundled held-out text, with
#      the demo's settings, into DUS_RUN/report-control
# Knobs: DUS_RUN (default runs/demo), HEAL_STEPS (default 60), EVAL_TOKENS (default 4096).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/demo-env.sh
[ -d "$RUN/solar-healed" ] || { echo "run scripts/demo.sh first (no $RUN/solar-healed)" >&2; exit 2; }
start=$SECONDS
dus heal "$BASE" -c full -o "$RUN/control" --force --data data/text/train.jsonl --steps "$HEAL_STEPS" \
    --lr 1e-4 --batch-size 4 --max-length 256 --report-to none \
    --set sft.packing=true --set sft.packing_strategy=wrapped --set sft.assistant_only_loss=false \
    --set sft.activation_checkpointing=false --set sft.warmup_steps=4 --set calibrate.enabled=false
echo "control heal: $((SECONDS - start)) s"
dus compare "$BASE" "$RUN/solar" "$RUN/solar-healed" "$RUN/control" \
    -l base -l unhealed -l healed -l "base fine-tuned" --max-tokens "$EVAL_TOKENS" --no-generate -o "$RUN/report-control" --force
