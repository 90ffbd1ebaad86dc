#!/usr/bin/env bash
# Install clang++ (Debian's clang-16), which build.rs uses to compile the CUDA kernels for the CPU
# emulator (`--device emu`) with the checker's instrumentation. Without it build.rs falls back to g++
# (the emulator without the checker) or builds no emulator, with a warning.
set -euo pipefail
if command -v clang++-16 >/dev/null 2>&1; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "clang++-16 is missing and this user cannot install it: apt-get install clang-16 as root"; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends clang-16 >/dev/null
clang++-16 --version | head -n 1
