#!/usr/bin/env bash
# Install dus and what it needs into the current Python environment.
#   bash scripts/install.sh          the runtime only (`pip install -e .`): what the main job runs;
#                                    no compiler work (llama-cpp-python is not installed)
#   bash scripts/install.sh test     also the test extra, with llama-cpp-python (compiles
#                                    llama.cpp, ~5 minutes the first time; pip caches the wheel)
#                                    and mergekit 0.1.5, the reference the tests compare against
# torch comes first and pinned to the CPU build 2.13.0 when no torch is present: the
# project's own range (torch>=2.4) is then already satisfied and pip pulls no CUDA build.
# Everything else installs within scripts/constraints.txt (the versions the suite was checked
# with), so a new release upstream cannot turn a fresh machine red overnight;
# DUS_NEWEST=1 resolves the newest versions the project allows instead (run it each session).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-runtime}
case "$mode" in runtime|test) ;; *) echo "usage: bash scripts/install.sh [test]" >&2; exit 2 ;; esac
. scripts/python-env.sh
PIP="python -m pip --disable-pip-version-check"
if [ "${DUS_NEWEST:-}" = 1 ]; then
    CONSTRAINTS=()
    echo "dus: DUS_NEWEST=1: resolving the newest allowed versions (no scripts/constraints.txt)" >&2
else
    CONSTRAINTS=(-c scripts/constraints.txt)
fi
if ! python -c "import torch" >/dev/null 2>&1; then
    $PIP install --quiet "torch==2.13.0"
fi
if [ "$mode" = runtime ]; then
    $PIP install --quiet "${CONSTRAINTS[@]}" -e .
else
    # llama-cpp-python compiles llama.cpp: portable flags. Where it cannot build, install the
    # rest and say so: the llama.cpp tests then skip, saying why.
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
    if ! $PIP install --quiet "${CONSTRAINTS[@]}" -e ".[test]"; then
        echo "warning: llama-cpp-python did not build; installing without it (the llama.cpp export checks will skip)" >&2
        $PIP install --quiet "${CONSTRAINTS[@]}" -e ".[search]" "pytest>=8" "hypothesis>=6.100" "deepspeed>=0.16" "bitsandbytes>=0.48" "lm-eval>=0.4.13"
    fi
    # mergekit is the reference that tests/test_mergekit_compat.py and benchmarks/ compare
    # against; dus never imports it. Its requirements are all satisfied by the line above.
    $PIP install --quiet "${CONSTRAINTS[@]}" "mergekit==0.1.5"
fi
python -c "import torch, transformers, trl, peft; print(f'dus installed ($mode): torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"
