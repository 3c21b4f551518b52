#!/bin/bash
# dus heal on SLURM: one task per node, each running `accelerate launch` for its GPUs.
#   sbatch launch/slurm.sh out/solar out/solar-healed train/lora-seam.yaml
#SBATCH --job-name=dus-heal
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

MODEL=${1:?usage: sbatch launch/slurm.sh MODEL OUT [CONFIG] [extra dus heal args...]}
OUT=${2:?usage: sbatch launch/slurm.sh MODEL OUT [CONFIG] [extra dus heal args...]}
CONFIG=${3:-train/lora-seam.yaml}
shift $(( $# < 3 ? $# : 3 ))

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# The first node of the job hosts the rendezvous. (sed reads the whole list: `head -n 1` may
# close the pipe while scontrol still writes, and pipefail then kills the job with SIGPIPE.)
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-29500}
# Compute nodes are often offline: dus logs W&B offline there unless a key is present;
# upload afterwards with `wandb sync $OUT/wandb/offline-run-*`.

# --resume makes a requeued job (scontrol requeue, preemption) continue from the latest checkpoint.
RESUME=()
if compgen -G "$OUT/checkpoints/checkpoint-*" > /dev/null; then RESUME=(--resume); fi

srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --multi_gpu \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_IP \
  --main_process_port $MAIN_PORT \
  --rdzv_backend c10d \
  --mixed_precision bf16 \
  -m dus heal $MODEL -c $CONFIG -o $OUT ${RESUME[*]} $*"
