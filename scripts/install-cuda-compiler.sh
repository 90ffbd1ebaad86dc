#!/usr/bin/env bash
# Install the CUDA compiler (nvcc 13.0) from pinned PyPI wheels into .toolchain/cuda (git-ignored), so
# build.rs compiles the kernels on any machine, GPU or not. All five pins matter: an unpinned
# nvidia-cuda-crt / nvidia-nvvm pulls a newer PTX ISA than the 13.0 ptxas and driver accept.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.toolchain/cuda
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [ -x "$nvcc" ] && "$nvcc" --version >/dev/null 2>&1; then
  exit 0
fi
rm -rf "$dest.tmp"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$dest.tmp" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
rm -rf "$dest" && mv "$dest.tmp" "$dest"
chmod +x "$dest"/nvidia/cu13/bin/* 2>/dev/null || true
"$nvcc" --version | tail -n 2
echo "installed nvcc into $dest (build.rs finds it there)"
