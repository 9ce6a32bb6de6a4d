#!/usr/bin/env bash
# The prepared GPU check (issue 20): on a CUDA machine, in at most 8 minutes, the
# GPU-marked tests and the generation and PPO-step benchmarks on the bundled model
# in 4-bit NF4 on the GPU, with their figures printed for the README.
#
#     bash scripts/gpu_check.sh
#
# It sets up with `make setup` (on a CUDA machine the pinned torch from PyPI is a
# CUDA build) and refuses to run, saying so, where no CUDA device is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_S=${GPU_CHECK_LIMIT_S:-480}
start=$(date +%s)

make setup >/dev/null
PY=.venv/bin/python
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device is visible to torch here; nothing to check." >&2
    exit 1
fi
$PY -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'

left() { echo $(( LIMIT_S - ($(date +%s) - start) )); }
step() {  # a step that runs past what is left of the limit is stopped, and the check fails
    local name=$1 budget; shift
    budget=$(left)
    if (( budget <= 0 )); then echo "gpu_check: out of time before: $name" >&2; exit 124; fi
    echo "== $name (at most $budget s)"
    timeout "$budget" "$@"
}
step "GPU-marked tests" $PY -m pytest -m gpu -q -rs tests/test_gpu.py
step "generation: two candidates of 64 tokens, NF4 on the GPU" $PY bench/generation.py --weights nf4 --runs 10
step "PPO step: 8 prompts x 64 tokens, NF4 on the GPU" $PY bench/ppo_step.py --weights nf4 --steps 3
echo "gpu_check: done in $(( $(date +%s) - start )) s"
