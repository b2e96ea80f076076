#!/usr/bin/env bash
# GPU checks and timings for the device tool, in two calls of < 10 minutes each (results under $OUT,
# which is what the tool brings back):
#   bash benchmarks/gpu_session.sh tests "$OUT"                  # ~4 min: CUDA tests + kernel microbenchmarks
#   bash benchmarks/gpu_session.sh e2e "$OUT" qwen2.5-1.5b      # ~5-8 min per model: naive vs ours (+ CUDA graphs)
#   bash benchmarks/gpu_session.sh workload "$OUT" qwen2.5-7b   # MATH500-shaped run (mh, smc) + a profile
# Uses the GPU image's torch/triton/transformers/safetensors; pytest, pytest-benchmark and scipy
# must be importable (carry wheels if the image lacks them: see the device README).
set -uo pipefail
MODE=${1:?usage: gpu_session.sh tests|e2e|workload OUT [MODELS]}
OUT=${2:?give the output folder: the device tool OUT}
MODELS=${3:-qwen2.5-1.5b}
mkdir -p "$OUT"
PY=${PYTHON:-python3}  # the GPU image's python3 holds torch; `python` may not exist there
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # keeps carried wheels (/tmp/site)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  "$PY" -c "import pytest, pytest_benchmark, scipy, tqdm; print('test deps ok')" || echo "MISSING test deps"
} 2>&1 | tee "$OUT/gpu_info.txt"
if [ "$MODE" = tests ]; then
  # 1. correctness on CUDA (no -x: every failure is reported)
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernel_sample.py \
      tests/test_kernel_kv_copy.py tests/test_kernel_mh_accept.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
  # 2. kernel microbenchmarks
  timeout 200 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_kernels.py --benchmark-only \
      --benchmark-columns=median,iqr,min,rounds --benchmark-json="$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -25
elif [ "$MODE" = workload ]; then
  # 4. 64 prompts of ~150 tokens, budget 768, block 192, 10 MH steps, alpha 4, EOS off; then a profiled short run
  timeout 560 "$PY" benchmarks/bench_workload.py --model "${3:-qwen2.5-7b}" --device cuda --methods mh,smc \
      --profile --out "$OUT" 2>&1 | tee "$OUT/workload.log" | tail -60
else
  # 3. end to end; results are written after every model
  timeout 560 "$PY" benchmarks/run_benchmarks.py --gpu --models "$MODELS" --out "$OUT" 2>&1 | tee "$OUT/e2e.log" | tail -30
fi
