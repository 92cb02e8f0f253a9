// scatter_add_delta_ kernels: weight[idx] += alpha * vals, fp32 atomics or a distinct-index read-modify-write.
// Plain CUDA (no torch headers); see sparse_peft_kernels.h for the ABI.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sparse_peft_kernels.h"

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename I>
__global__ void scatter_atomic_kernel(float* __restrict__ w, int64_t numel, const I* __restrict__ idx,
                                      const float* __restrict__ vals, int64_t k, float alpha) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; n < k; n += stride) {
    const int64_t j = (int64_t)idx[n];
    if (j >= 0 && j < numel) atomicAdd(w + j, alpha * vals[n]);
  }
}

template <typename T, typename I>
__global__ void scatter_unique_kernel(T* __restrict__ w, int64_t numel, const I* __restrict__ idx,
                                      const float* __restrict__ vals, int64_t k, float alpha) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; n < k; n += stride) {
    const int64_t j = (int64_t)idx[n];
    if (j >= 0 && j < numel) w[j] = from_f<T>(to_f(w[j]) + alpha * vals[n]);  // one rounding per element
  }
}

int grid_for(int64_t k, int threads) {
  int64_t blocks = (k + threads - 1) / threads;
  const int64_t cap = 65535LL * 8;  // grid-stride beyond this
  return (int)(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

template <typename T, typename I>
int launch(void* weight, int64_t numel, const void* idx, const float* vals, int64_t k, float alpha, int unique,
           cudaStream_t s) {
  const int threads = 256;
  if (unique) {
    scatter_unique_kernel<T, I><<<grid_for(k, threads), threads, 0, s>>>((T*)weight, numel, (const I*)idx, vals, k, alpha);
  } else {
    scatter_atomic_kernel<I><<<grid_for(k, threads), threads, 0, s>>>((float*)weight, numel, (const I*)idx, vals, k, alpha);
  }
  return (int)cudaGetLastError();
}

template <typename T>
int launch_idx(int index_type, void* weight, int64_t numel, const void* idx, const float* vals, int64_t k,
               float alpha, int unique, cudaStream_t s) {
  if (index_type == SP_INT32) return launch<T, int32_t>(weight, numel, idx, vals, k, alpha, unique, s);
  if (index_type == SP_INT64) return launch<T, int64_t>(weight, numel, idx, vals, k, alpha, unique, s);
  return (int)cudaErrorInvalidValue;
}

}  // namespace

extern "C" const char* sp_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

extern "C" int sp_scatter_add(int dtype, void* weight, int64_t numel, int index_type, const void* idx,
                              const float* vals, int64_t k, float alpha, int unique, void* stream) {
  if (k <= 0) return 0;
  cudaStream_t s = (cudaStream_t)stream;
  if (!unique && dtype != SP_FLOAT32) return (int)cudaErrorInvalidValue;  // 16-bit atomics would round per add
  switch (dtype) {
    case SP_FLOAT32: return launch_idx<float>(index_type, weight, numel, idx, vals, k, alpha, unique, s);
    case SP_FLOAT16: return launch_idx<__half>(index_type, weight, numel, idx, vals, k, alpha, unique, s);
    case SP_BFLOAT16: return launch_idx<__nv_bfloat16>(index_type, weight, numel, idx, vals, k, alpha, unique, s);
    default: return (int)cudaErrorInvalidValue;
  }
}
