#!/usr/bin/env bash
# One script for a lent GPU machine: build the CUDA extension, run the GPU tests (CUDA and compiled Triton
# kernels, the fused loss, the no-sync trainer step) and the GPU benchmarks, and print a short table.
# Logs and JSON go under ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import ospo_fast._extension as e; print('cpp', e.has_cpp(), 'cuda kernels', e.has_cuda_kernels(), 'triton', e.has_triton())"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -3
python3 -m pytest -q tests/test_owen.py tests/test_ops.py tests/test_evaluate.py 2>&1 | tail -1
python3 bench/bench_owen.py --games 4096 --no-encoder --json "$out/owen_gpu.json" 2>&1 | grep -E "workload|cuda|triton|dense" | tee "$out/owen_gpu.log"
python3 bench/bench_attribution.py --device cuda --responses 64 --budget 64 --no-shap --loop-responses 1 \
  --json "$out/attribution_gpu.json" 2>&1 | grep -v Loading | tee "$out/attribution_gpu.log"
python3 bench/bench_step.py --json "$out/step_gpu.json" 2>&1 | grep -v Loading | tail -5 | tee "$out/step_gpu.log"
