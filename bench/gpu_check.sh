#!/usr/bin/env bash
# One script for a GPU machine: build the CUDA extension, run the GPU tests (the CUDA and compiled Triton
# kernels, the packed encoder path, the fused loss, the no-sync trainer step), then the GPU benchmarks, and
# print a short summary. Each stage has its own time limit so that a slow one cannot hide the others.
# Logs and JSON go under ${OUT:-bench/results}.
#
#     bash bench/gpu_check.sh                     # every stage
#     bash bench/gpu_check.sh tests attribution   # the build, then only these (tests attribution owen kernels step)
set -uo pipefail
stages=${*:-tests attribution owen kernels step}
wanted() { [[ " $stages " == *" $1 "* ]]; }
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# Build for this card only (one architecture compiles in a fraction of the time of torch's default list).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
stage() { echo; echo "== $1 ($(date +%T))"; }

stage "machine"
python3 -c "import torch, triton; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader

stage "build (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
if ! timeout 240 python3 -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
  tail -40 "$out/build.log"
  echo "build failed"
  exit 1
fi
python3 -c "import ospo_fast._extension as e; print('cpp', e.has_cpp(), '| cuda kernels', e.has_cuda_kernels(), '| triton', e.has_triton())"

if wanted tests; then
stage "GPU tests (-m gpu)"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfE --continue-on-collection-errors -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi

if wanted attribution; then
stage "bench: attribution, 64 responses x 64 coalitions"
timeout 150 python3 bench/bench_attribution.py --device cuda --responses 64 --budget 64 --loop-responses 1 \
  --json "$out/attribution_gpu.json" 2>&1 | grep -v "Loading weights" | tee "$out/attribution_gpu.log"
fi

if wanted owen; then
stage "bench: Owen aggregation, 4096 games"
timeout 90 python3 bench/bench_owen.py --games 4096 --no-encoder --json "$out/owen_gpu.json" 2>&1 | tee "$out/owen_gpu.log" \
  | grep -E "workload| cuda +float"
fi

if wanted kernels; then
stage "kernel test files, with their CUDA and compiled Triton parametrisations"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_owen.py tests/test_ops.py tests/test_dispatch.py tests/test_packing.py \
  tests/test_encoder_kernels.py tests/test_encoder_forward.py tests/test_evaluator.py tests/test_attribution.py \
  tests/test_device.py tests/test_loss.py \
  tests/test_metrics.py tests/test_advantages.py 2>&1 | tee "$out/kernel_tests.log" | tail -15
fi

if wanted step; then
stage "bench: one training step"
timeout 90 python3 bench/bench_step.py --json "$out/step_gpu.json" 2>&1 | grep -v "Loading weights" | tail -8 | tee "$out/step_gpu.log"
fi

stage "summary ($stages)"
if wanted tests; then echo "tests (-m gpu):    $(tail -1 "$out/gpu_tests.log")"; fi
if wanted kernels; then echo "tests (kernels):   $(tail -1 "$out/kernel_tests.log")"; fi
if wanted attribution; then
  grep -E "^(bf16|fp32|the same),|GEMM floor|packed|shap|loop|host time to issue|timings of one" "$out/attribution_gpu.log"
  sed -n '/^whole OwenAttributor call/,/^ *4 /p' "$out/attribution_gpu.log"
fi
if wanted owen; then grep -E "aggregate.* cuda +float" "$out/owen_gpu.log"; fi
