#!/usr/bin/env bash
# GPU check for the fused ACON-C kernels, sized for <= 5 minutes on one H200:
#   1. CUDA kernel tests (tests/test_fused.py -m gpu),
#   2. scripts/bench_activation.py in bf16 (contiguous and channels_last, with % of copy bandwidth),
#   3. scripts/bench_train_step.py, ShuffleNetV2 1.0x and ResNet-50, bf16 autocast, batch 32, 224 px.
# Results go to benchmarks/gpu_<date>_*.md with the date and the GPU name in the header.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp=$(date -u +%Y-%m-%d)
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
out="benchmarks/gpu_${stamp}"
mkdir -p benchmarks
header="date: ${stamp} UTC; GPU: ${gpu}; torch $(python -c 'import torch; print(torch.__version__)'); triton $(python -c 'import triton; print(triton.__version__)')"
echo "$header"

timeout 100 python -m pytest -q -m gpu tests/test_fused.py -p no:cacheprovider | tee "${out}_tests.txt"

{
  echo "$header"
  echo
  timeout 60 python scripts/bench_activation.py --device cuda --dtype bf16 --repeats 30
  echo
  timeout 45 python scripts/bench_activation.py --device cuda --dtype bf16 --repeats 30 --channels-last --quick
} | tee "${out}_activation.md"

{
  echo "$header"
  echo
  timeout 110 python scripts/bench_train_step.py --device cuda --amp bf16 --batch 32 --img 224 \
    --steps 20 --warmup 5 --channels-last
} | tee "${out}_train_step.md"
