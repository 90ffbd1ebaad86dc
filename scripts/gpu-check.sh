#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu-pack.sh here and .gpu/ carried there: every GPU check in one go.
#   scripts/gpu-check.sh OUTDIR
# Writes OUTDIR/report.md and the logs: the machine, the GPU tests, compute-sanitizer memcheck and
# racecheck on the kernel tests, `bertcuda bench kernels`, PyTorch's ops on the same shapes, and a GPU
# training run. Each part runs even when an earlier one failed; the report says which failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-report}
mkdir -p "$out"
report="$out/report.md"
: > "$report"
part() {  # part NAME LOGFILE COMMAND...
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  "$@" > "$out/$log" 2>&1
  local rc=$?
  echo "- $name: $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s, log $log" >> "$report"
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
kernel_tests=(--skip training_200 --skip whole_model --skip same_seed --skip gpu_loss --skip nccl)
part "GPU tests" gpu-tests.log .gpu/tests/gpu --ignored --test-threads=1
part "memcheck (kernel tests)" memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 .gpu/tests/gpu --ignored --test-threads=1 "${kernel_tests[@]}"
part "racecheck (kernel tests)" racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 .gpu/tests/gpu --ignored --test-threads=1 "${kernel_tests[@]}"
part "bench kernels" bench-kernels.log .gpu/bertcuda bench kernels
part "PyTorch ops on the same shapes" torch-ops.log python3 benches/torch_gpu_ops.py
part "sample shards" prepare.log bash -c ".gpu/bertcuda tokenizer train --input data/sample --vocab-size 8000 --output '$out/tok' --overwrite && .gpu/bertcuda prepare --input data/sample --tokenizer '$out/tok' --output '$out/shards' --overwrite --quiet"
part "bench train tiny (GPU)" bench-train-tiny.log .gpu/bertcuda bench train --data "$out/shards" --preset tiny --device cuda
part "bench train base (GPU, fp32)" bench-train-base.log .gpu/bertcuda bench train --data "$out/shards" --preset base --device cuda --batch-size 32 --steps 10
part "transformers base, fp32 and bf16" torch-train.log bash -c "python3 benches/torch_train_gpu.py --preset base --batch-size 32 --precision fp32 && python3 benches/torch_train_gpu.py --preset base --batch-size 32 --precision bf16 --peak-tflops 989"
part "default training run (no arguments)" default-run.log .gpu/bertcuda train --quiet
{
  echo
  echo "## bench kernels"
  echo '```'
  cat "$out/bench-kernels.log"
  echo '```'
  echo "## PyTorch"
  echo '```'
  cat "$out/torch-ops.log"
  echo '```'
  echo "## bench train (bertcuda, then transformers)"
  echo '```'
  cat "$out/bench-train-tiny.log" "$out/bench-train-base.log" "$out/torch-train.log"
  echo '```'
  echo "## GPU tests (tail)"
  echo '```'
  tail -n 30 "$out/gpu-tests.log"
  echo '```'
} >> "$report"
cat "$report"
