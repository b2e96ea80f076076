#!/usr/bin/env bash
# One device call that checks correctness on the GPU and then times everything.
# Usage (from the repo root on the GPU machine): bash benchmarks/gpu_session.sh [OUT_DIR] [MODELS]
# Needs the GPU image's torch/triton/transformers/safetensors (nothing is installed); ~8 min for one model.
set -uo pipefail
OUT=${1:-benchmarks/results}
MODELS=${2:-qwen2.5-1.5b}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu_info.txt"
# 1. correctness on CUDA: kernels vs references, sampler on the Triton backend, CUDA graphs
timeout 240 python -m pytest -q -x tests/test_cuda.py tests/test_kernel_sample.py tests/test_kernel_kv_copy.py \
    tests/test_kernel_mh_accept.py tests/test_sampler.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
# 2. kernel microbenchmarks
timeout 150 python -m pytest -q benchmarks/bench_kernels.py --benchmark-only -p no:cacheprovider \
    --benchmark-columns=median,iqr,min,rounds --benchmark-json="$OUT/kernels.json" 2>&1 | tail -25
# 3. end to end (naive vs ours, with and without CUDA graphs)
timeout 420 python benchmarks/run_benchmarks.py --gpu --models "$MODELS" --out "$OUT" 2>&1 | tail -30
