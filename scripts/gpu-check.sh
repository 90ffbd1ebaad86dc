#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu-pack.sh here and .gpu/ carried there: every GPU check in one
# command, bounded to fit one 10-minute command with room to spare.
#   scripts/gpu-check.sh OUTDIR
# The parts run in order of value, each under its own timeout, and each appends its result and the tail
# of its log to OUTDIR/report.md as it ends, so a run killed part-way still says what it saw:
#   0. the op families' GPU tests (src/ops), 1. the whole-model GPU tests in fp32 (held to the CPU
#   reference), 2. the whole-model GPU tests with bf16 activations,
#   3. `bertcuda bench kernels`, then PyTorch's SDPA on its attention shapes, 4. BERT-base training at seq 128 in bf16, bertcuda then transformers on the
#   same shapes, 5. the default training run, 6. compute-sanitizer memcheck and racecheck on the op
#   tests only. A part is skipped when less of the total budget (TOTAL_S, default 460 s) is left than its
#   timeout. Each part runs even when an earlier one failed; the report says which failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-report}
total=${TOTAL_S:-460}
mkdir -p "$out"
report="$out/report.md"
: > "$report"
part() {  # part NAME TIMEOUT_S LOGFILE COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local left=$((total - SECONDS))
  if [ "$left" -lt "$limit" ]; then
    echo "- $name: skipped ($left s of the budget left, it needs $limit)" >> "$report"
    return 0
  fi
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$out/$log" 2>&1
  local rc=$?
  local what="ok"
  [ $rc -eq 124 ] && what="TIMED OUT after $limit s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="FAILED (exit $rc)"
  {
    echo "- $name: $what in $((SECONDS - start)) s, log $log"
    echo '```'
    tail -n 25 "$out/$log"
    echo '```'
  } >> "$report"
  return 0
}
{
  echo "# bertcuda GPU check"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  echo '```'
} >> "$report"
# cuBLAS and the driver for cudarc's dynamic loading.
for pat in 'libcublas.so.*' 'libcublasLt.so.*' 'libcuda.so.1'; do
  for f in $(find /usr/local /opt /usr/lib -name "$pat" 2>/dev/null | sort -V | tail -n 2); do
    case ":${LD_LIBRARY_PATH:-}:" in *":$(dirname "$f"):"*) ;; *) export LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}";; esac
  done
done
# cudarc opens NCCL as libnccl.so; wheels and toolkits ship libnccl.so.2: link it under that name.
libs=/tmp/bertcuda-libs; mkdir -p "$libs"
nccl=$(find /usr/local /opt /usr/lib -name 'libnccl.so.2*' 2>/dev/null | sort -V | tail -n 1)
[ -n "$nccl" ] && ln -sf "$nccl" "$libs/libnccl.so" && export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" > "$out/env.txt"
echo "nccl: ${nccl:-not found}" >> "$out/env.txt"
tests=.gpu/tests/gpu
# The op families' tests (src/ops/<family>.rs, the library's test executable): every op against the CPU.
ops=.gpu/tests/ops
kernel_tests=(ops:: --ignored --test-threads=1)
part "GPU op tests (every op family, fp32 and bf16 activations)" 60 gpu-tests-ops.log $ops "${kernel_tests[@]}"
part "GPU tests, fp32 (whole model, 200 training steps in fp32/bf16/fp16, NCCL world 1)" 120 gpu-tests-fp32.log \
  $tests gpu:: --ignored --test-threads=1 --skip bf16
part "GPU tests, bf16 activations (whole model)" 30 gpu-tests-bf16.log $tests gpu::bf16 --ignored --test-threads=1
part "bench kernels (fp32 and bf16, with the copy and GEMM limits)" 50 bench-kernels.log .gpu/bertcuda bench kernels
part "PyTorch SDPA (flash, bf16) on bench kernels' attention shapes" 25 torch-attention.log python3 benches/torch_attention.py
part "sample shards" 20 prepare.log bash -c ".gpu/bertcuda tokenizer train --input data/sample --vocab-size 8000 --output '$out/tok' --overwrite && .gpu/bertcuda prepare --input data/sample --tokenizer '$out/tok' --output '$out/shards' --overwrite --quiet"
part "bench train: bertcuda BERT-base, seq 128, batch 32, bf16" 45 bench-train-base-bf16.log \
  .gpu/bertcuda bench train --data "$out/shards" --preset base --device cuda --precision bf16 --seq 128 --batch-size 32 --steps 10
part "transformers BERT-base on the same shapes (seq 128, batch 32, bf16 autocast, SDPA)" 60 torch-train-base-bf16.log \
  python3 benches/torch_train_gpu.py --preset base --seq 128 --batch-size 32 --steps 10 --precision bf16
part "default training run (no arguments)" 30 default-run.log .gpu/bertcuda train --quiet
part "compute-sanitizer memcheck (op tests)" 45 memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 $ops "${kernel_tests[@]}"
part "compute-sanitizer racecheck (op tests)" 45 racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 $ops "${kernel_tests[@]}"
echo "- total: $SECONDS s" >> "$report"
cat "$report"
