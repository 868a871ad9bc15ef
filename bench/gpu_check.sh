#!/usr/bin/env bash
# One script for a lent GPU machine: build the CUDA extension, run the GPU tests (CUDA and compiled Triton
# kernels) and the GPU benchmark, and print a short table. Writes logs and JSON under ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import ospo_fast, ospo_fast._extension as e; print('cpp', e.has_cpp(), 'cuda kernels', e.has_cuda_kernels(), 'triton', e.has_triton())"
python3 -m pytest -q tests/test_owen.py tests/test_ops.py tests/test_metrics.py 2>&1 | tee "$out/gpu_tests.log" | tail -5
python3 bench/bench_owen.py --games 4096 --no-encoder --json "$out/owen_gpu.json" 2>&1 | tee "$out/gpu_bench.log" | grep -E "workload|cuda|triton|dense"
