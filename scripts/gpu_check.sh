#!/usr/bin/env bash
# GPU check, within 8 minutes of wall time on one GPU (compiles included). The five checks that matter
# most come first, then the benchmarks:
#   1. resume:        train 3 steps, then resume from last.pt on the GPU (the SLURM requeue path),
#   2. triton:        the Triton kernels serve ACON-C and Meta-ACON on every GPU with no fallback, and the
#                     -m gpu tests (which fail on any recorded fallback; the fused BatchNorm+ACON kernels'
#                     tests run last),
#   3. pipeline:      the gpu input pipeline (nvJPEG) under `ulimit -n 1024`, 8 workers, batch 256,
#   4. deterministic: one model per family trains a step under torch.use_deterministic_algorithms(True),
#   5. doctor:        python -m acon.doctor (versions, kernels, data, NCCL all-reduce),
#   6. activation:    scripts/bench_activation.py, bf16, contiguous and channels_last,
#   7. train_step:    scripts/bench_train_step.py, ShuffleNetV2 1.0x and ResNet-50, bf16, batch 32, 224 px,
#                     eager: ReLU, ACON-C and Meta-ACON (their fused op, the BatchNorm+ACON op, the paper
#                     formula); the CPU-only multi-pass variants left out (on CUDA they time the same op),
#   8. compiled:      the same for ShuffleNetV2 1.0x under torch.compile: ReLU, ACON-C, Meta-ACON (Inductor
#                     compiles each, about 30 s; its own step, so the eager numbers are kept if it times out),
#   9. smoke:         scripts/smoke_train.py, ShuffleNetV2 0.5x through train.py, ReLU and Meta-ACON, gpu pipeline.
# Each step runs under its own timeout (they add up to the budget; a step never runs past the overall
# deadline), one failure or timeout does not stop the others, and each step's output is in its file the
# moment it ends: benchmarks/gpu_<date>_<N>_<step>.md, with a one-line status in benchmarks/gpu_<date>_summary.md.
#
# scripts/gpu_check.sh --cpu runs the same steps at CPU scale (Triton in its interpreter, ulimit -n 128,
# 2-step runs) in under 3 minutes, writing to a temporary folder and printing what it writes; the compiled
# step is skipped there (Inductor's CPU compiles take minutes on a small machine).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp=$(date -u +%Y-%m-%d)
start=$SECONDS

if [[ "${1:-}" == "--cpu" ]]; then
  mode=cpu budget=170 dev=cpu
  out_dir=$(mktemp -d /tmp/acon-gpu-check-cpu.XXXXXX)
  out="${out_dir}/gpu_${stamp}"
  #       resume triton pipeline deterministic doctor activation train_step compiled smoke
  limits=(45 15 15 15 20 15 15 0 30)
else
  mode=gpu budget=470 dev=cuda
  out_dir=benchmarks
  out="benchmarks/gpu_${stamp}"
  limits=(60 70 40 40 35 30 45 100 50)
fi
mkdir -p "$out_dir"
deadline=$((start + budget))
summary="${out}_summary.md"
work=$(mktemp -d /tmp/acon-gpu-check-work.XXXXXX)

header=$(timeout 30 python -c "
import torch, platform
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (' + platform.machine() + ' CPU)'
try:
    import triton; tv = triton.__version__
except Exception:
    tv = 'not installed'
print(f'date: ${stamp} UTC; GPU: {gpu}; torch {torch.__version__}; triton {tv}; mode: ${mode}')
" 2>&1 | tail -1)
echo "gpu_check: ${header}"
echo "gpu_check: results in ${out_dir} (${out}_*.md), ${budget} s budget"
{ echo "# gpu_check ${mode}: ${header}"; echo; echo "| step | status | wall s | file |"; echo "|---|---|---|---|"; } > "$summary"

n=0
# run_step NAME TIMEOUT_S COMMAND...: run under min(TIMEOUT_S, time left), tee to its file, one summary line.
run_step() {
  local name=$1 want=$2
  shift 2
  n=$((n + 1))
  local file="${out}_${n}_${name}.md" left=$((deadline - SECONDS - 5))
  local t=$((want < left ? want : left))
  if ((t < 5)); then
    echo "| ${n} ${name} | skipped: no time left in the ${budget} s budget | 0 | |" >> "$summary"
    echo "gpu_check: step ${n} ${name}: skipped (no time left)"
    return
  fi
  echo "gpu_check: step ${n} ${name} (timeout ${t} s): $*"
  local t0=$SECONDS
  { echo "# ${name}: ${header}"; echo; echo "\`$*\`"; echo; } > "$file"
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$file"
  local rc=${PIPESTATUS[0]} status
  case $rc in
    0) status=ok ;;
    124 | 137) status="TIMED OUT after ${t} s" ;;
    *) status="FAILED (exit ${rc})" ;;
  esac
  echo "| ${n} ${name} | ${status} | $((SECONDS - t0)) | ${file} |" | tee -a "$summary"
}

steps="python scripts/gpu_check_steps.py"
eager_variants="ReLU,ACON-C fused,Meta-ACON fused,ACON-C BN-fused,Meta-ACON BN-fused,ACON-C reference,Meta-ACON reference"
compiled_variants="ReLU,ACON-C fused,Meta-ACON fused"

# skip_step NAME WHY: a numbered summary line for a step this mode does not run.
skip_step() {
  n=$((n + 1))
  echo "| ${n} $1 | skipped: $2 | 0 | |" >> "$summary"
  echo "gpu_check: step ${n} $1: skipped ($2)"
}
if [[ $mode == cpu ]]; then
  run_step resume "${limits[0]}" $steps resume --device cpu --out "$work/resume"
  run_step triton "${limits[1]}" env TRITON_INTERPRET=1 ACON_FUSED_CPU_BACKEND=triton \
    $steps triton --device cpu
  run_step pipeline "${limits[2]}" $steps pipeline --device cpu --open-files 128 --workers 2 --batch 64 \
    --img 32 --out "$work"
  run_step deterministic "${limits[3]}" $steps deterministic --device cpu --batch 2 --img 32
  run_step doctor "${limits[4]}" python -m acon.doctor --no-ddp --samples 2 out_dir="$work/runs"
  run_step activation "${limits[5]}" env ACON_FUSED_NO_COMPILE=1 python scripts/bench_activation.py \
    --device cpu --quick --repeats 2 \
    --shapes "shufflenetv2 s2"
  run_step train_step "${limits[6]}" python scripts/bench_train_step.py --device cpu --batch 2 --img 32 \
    --steps 1 --warmup 1 --models shufflenetv2_x0_5 --variants "ReLU,ACON-C fused,ACON-C BN-fused"
  skip_step compiled "Inductor's CPU compiles take minutes here; train_step runs the same script eager"
  run_step smoke "${limits[8]}" python scripts/smoke_train.py --device cpu --steps 2 --batch 4 --img 32 \
    --workers 0 --activations relu --pipelines gpu --out "$work/smoke" --timeout 25
else
  run_step resume "${limits[0]}" $steps resume --device cuda --out "$work/resume"
  run_step triton "${limits[1]}" bash -c "$steps triton --device cuda; a=\$?; python -m pytest -q -n 0 -m gpu \
    -p no:cacheprovider tests/test_fused.py tests/test_fused_bn_acon.py tests/test_fused_compile.py \
    tests/test_gpu_paths.py tests/test_gpu_data_paths.py tests/test_data_fast.py tests/test_budget_recipes.py \
    tests/test_activations.py tests/test_triton_bn_cuda.py; \
    exit \$((a | \$?))"
  run_step pipeline "${limits[2]}" bash -c "ulimit -n 1024 && $steps pipeline --device cuda --open-files 1024 \
    --workers 8 --batch 256 --out $work"
  run_step deterministic "${limits[3]}" bash -c "$steps deterministic --device cuda; a=\$?; \
    python -m pytest -q -n 0 -m gpu -p no:cacheprovider tests/test_deterministic_models.py \
    tests/test_segmentation_deterministic.py; exit \$((a | \$?))"
  run_step doctor "${limits[4]}" python -m acon.doctor out_dir="$work/runs"
  run_step activation "${limits[5]}" bash -c "python scripts/bench_activation.py --device cuda --dtype bf16 \
    --repeats 20 --quick && python scripts/bench_activation.py --device cuda --dtype bf16 --repeats 20 \
    --channels-last --quick"
  run_step train_step "${limits[6]}" python scripts/bench_train_step.py --device cuda --amp bf16 --batch 32 \
    --img 224 --steps 10 --warmup 3 --channels-last --variants "${eager_variants}"
  run_step compiled "${limits[7]}" python scripts/bench_train_step.py --device cuda --amp bf16 --batch 32 \
    --img 224 --steps 10 --warmup 3 --channels-last --compile --models shufflenetv2_x1_0 \
    --variants "${compiled_variants}"
  run_step smoke "${limits[8]}" python scripts/smoke_train.py --device cuda --steps 100 --batch 64 --img 224 \
    --workers 8 --pipelines gpu --activations relu meta_acon --out "$work/smoke" --timeout 25
fi

rm -rf "$work"
echo "gpu_check: done in $((SECONDS - start)) s (budget ${budget} s); summary ${summary}:"
cat "$summary"
if [[ $mode == cpu ]]; then
  echo "gpu_check --cpu: what it wrote, in ${out_dir}:"
  ls -1 "$out_dir"
fi
