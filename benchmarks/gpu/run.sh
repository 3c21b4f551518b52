#!/usr/bin/env bash
# The GPU run (benchmarks/gpu/README.md): installs the carried wheels offline, then runs
# gpu_bench.py's stages (random 7B-shaped Llama -> dus build -> heal four ways -> compare),
# writing $OUT/gpu.json and the whole log, $OUT/gpu.log. Run from anywhere:
#
#   bash benchmarks/gpu/run.sh                       # on the device: SHAPE=7b DEVICE=cuda
#   SHAPE=tiny DEVICE=cpu WHEELS=none OUT=/tmp/o bash benchmarks/gpu/run.sh   # CPU dry run
#                                                    # (tests/test_gpu_script.py; the wheels are for python 3.12)
#
# Settings are environment variables; gpu_bench.py's docstring lists them.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo" || exit 1
PYTHON="${PYTHON:-python3}"
export OUT="${OUT:-$repo/out/gpu}"
mkdir -p "$OUT" || exit 1
wheels="${WHEELS:-$here/wheels}"

{
  date -u '+started %Y-%m-%dT%H:%M:%SZ'
  if [ "$wheels" != none ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    # --target keeps the image's own packages untouched; --no-deps: prepare.sh chose every wheel
    site="${SITE:-/tmp/dus-gpu-site}"
    echo "installing $(ls "$wheels"/*.whl | wc -l) carried wheels into $site"
    # a failed install still runs the stages: the environment stage and each stage's error then
    # say what is missing, in gpu.json
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$wheels"/*.whl || echo "wheel install FAILED; going on with what is installed"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "no wheels in $wheels: using the packages already installed"
  fi
  # the worktree's dus first, whatever else is installed
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # The 7B run holds about 55 GB on disk at its peak (source, build, one healed output); where
  # /tmp has less and the RAM-backed /dev/shm more, use that (the machine has 128 GiB of memory).
  if [ -z "${WORK:-}" ]; then
    WORK=/tmp/dus-gpu
    tmp_free=$(df -Pk /tmp | awk 'NR==2 {print $4}')
    shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
    if [ "${SHAPE:-7b}" = 7b ] && [ "${tmp_free:-0}" -lt $((60 * 1024 * 1024)) ] \
       && [ "${shm_free:-0}" -gt "${tmp_free:-0}" ]; then WORK=/dev/shm/dus-gpu; fi
    echo "WORK=$WORK (free KiB: /tmp ${tmp_free:-?}, /dev/shm ${shm_free:-?})"
    export WORK
  fi
  "$PYTHON" "$here/gpu_bench.py"
} 2>&1 | tee "$OUT/gpu.log"
