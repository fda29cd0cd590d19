#!/usr/bin/env bash
# GPU check, sized for about 10 minutes on one H200:
#   1. python -m acon.doctor (versions, fused kernels vs the reference form, gloo and NCCL all-reduces),
#   2. CUDA kernel tests (tests/test_fused.py -m gpu),
#   3. scripts/bench_activation.py in bf16 (contiguous and channels_last, with % of copy bandwidth),
#   4. scripts/bench_train_step.py, ShuffleNetV2 1.0x and ResNet-50, bf16 autocast, batch 32, 224 px,
#   5. scripts/smoke_train.py: ShuffleNetV2 0.5x, 200 steps on synthetic JPEGs per activation and input
#      pipeline (reference, fast, gpu), step times vs ReLU, fallbacks the runs recorded.
# Results go to benchmarks/gpu_<date>_*.md with the date and the GPU name in the header.
#
# scripts/gpu_check.sh --cpu runs the parts that need no GPU (the doctor and a 2-step smoke run of ReLU and
# ACON-C on the reference and gpu pipelines) on the CPU, writing to a temporary folder: a check of this
# script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp=$(date -u +%Y-%m-%d)

if [[ "${1:-}" == "--cpu" ]]; then
  out_dir=$(mktemp -d /tmp/acon-gpu-check-cpu.XXXXXX)
  echo "gpu_check --cpu: results in ${out_dir}"
  python -m acon.doctor out_dir="${out_dir}/runs" | tee "${out_dir}/doctor.txt"
  python scripts/smoke_train.py --device cpu --steps 2 --batch 4 --img 32 --workers 0 \
    --activations relu acon_c --pipelines reference gpu --out "${out_dir}/smoke" --timeout 600 \
    | tee "${out_dir}/smoke.md"
  echo "gpu_check --cpu: done; doctor and smoke outputs in ${out_dir}"
  exit 0
fi

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
out="benchmarks/gpu_${stamp}"
mkdir -p benchmarks
header="date: ${stamp} UTC; GPU: ${gpu}; torch $(python -c 'import torch; print(torch.__version__)'); triton $(python -c 'import triton; print(triton.__version__)')"
echo "$header"

{ echo "$header"; echo; timeout 120 python -m acon.doctor out_dir=/tmp/acon-gpu-check-runs; } \
  | tee "${out}_doctor.txt"

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

{
  echo "$header"
  echo
  timeout 330 python scripts/smoke_train.py --device cuda --steps 200 --batch 64 --img 224 --workers 8 \
    --timeout 60
} | tee "${out}_smoke.md"
