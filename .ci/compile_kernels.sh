#!/usr/bin/env bash
# Compile-check the plain-CUDA kernels in src/sparse_peft/ops/csrc (no torch headers, so this takes seconds).
# Exits 0 with a message when nvcc is absent. Override the targets with SPARSE_PEFT_CUDA_ARCHS="80 90".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
csrc="$here/src/sparse_peft/ops/csrc"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "compile_kernels: nvcc not found; skipping the CUDA compile check."
  exit 0
fi
archs="${SPARSE_PEFT_CUDA_ARCHS:-80 90}"
gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_${a},code=sm_${a}"); done
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "compile_kernels: $("$NVCC" --version | tail -1) for sm_${archs// /, sm_}"
start=$SECONDS
pids=()
for cu in "$csrc"/*.cu; do
  "$NVCC" -c -O3 -std=c++17 -Xcompiler -Wall -Werror all-warnings "${gencode[@]}" \
    -o "$tmp/$(basename "$cu" .cu).o" "$cu" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
if [[ $status -ne 0 ]]; then echo "compile_kernels: FAILED"; exit 1; fi
echo "compile_kernels: OK ($(ls "$csrc"/*.cu | wc -l) files in $((SECONDS - start)) s)"
