# Sourced by scripts/demo.sh and benchmarks/control.sh (from the repository root): the
# Python to use, and the main job's knobs with their defaults.
. scripts/python-env.sh
RUN=${DUS_RUN:-runs/demo}
HEAL_STEPS=${HEAL_STEPS:-60}
EVAL_TOKENS=${EVAL_TOKENS:-4096}
BASE=models/SmolLM2-135M-Instruct
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
