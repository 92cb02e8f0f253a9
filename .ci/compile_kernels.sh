#!/usr/bin/env bash
# Compile-check src/sparse_peft/ops/csrc with nvcc: the plain-CUDA kernels (no torch headers, seconds) and, when torch
# imports ($PYTHON, default python3), the torch binding binding.cpp as nvcc compiles host C++ (about 30 s; skip it with
# SPARSE_PEFT_CHECK_BINDING=0). A CPU build of torch is enough: nothing is linked.
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
files=$(ls "$csrc"/*.cu | wc -l)
PYTHON="${PYTHON:-python3}"
if [[ "${SPARSE_PEFT_CHECK_BINDING:-1}" == "0" ]]; then
  echo "compile_kernels: SPARSE_PEFT_CHECK_BINDING=0; binding.cpp not checked."
elif ! "$PYTHON" -c "import torch.utils.cpp_extension" 2>/dev/null; then
  echo "compile_kernels: torch does not import with $PYTHON; binding.cpp not checked."
else
  # torch's include paths, Python's headers and torch's C++ ABI, one flag per line
  mapfile -t torch_flags < <("$PYTHON" -c '
import sysconfig, torch, torch.utils.cpp_extension as c
for p in c.include_paths() + [sysconfig.get_paths()["include"]]: print("-I" + p)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")')
  # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU wheels of torch lack the generated c10/cuda/impl/cuda_cmake_macros.h (it only
  # sets Windows export macros). The sources hash is a dummy: it checks that the ahead-of-time define compiles.
  "$NVCC" -x c++ -c -O3 -std=c++20 -Xcompiler -fPIC,-Wall "${torch_flags[@]}" -I"$csrc" \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -DSPARSE_PEFT_SOURCES_HASH=0123456789abcdef -o "$tmp/binding.o" "$csrc/binding.cpp" &
  pids+=($!)
  files=$((files + 1))
fi
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
if [[ $status -ne 0 ]]; then echo "compile_kernels: FAILED"; exit 1; fi
if [[ -f "$tmp/binding.o" ]] && ! grep -q 0123456789abcdef "$tmp/binding.o"; then
  echo "compile_kernels: FAILED: binding.o does not record SPARSE_PEFT_SOURCES_HASH"; exit 1
fi
echo "compile_kernels: OK ($files files in $((SECONDS - start)) s)"
