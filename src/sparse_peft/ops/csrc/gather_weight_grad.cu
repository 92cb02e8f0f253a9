// gather_weight_grad: sampled dense-dense matmul (SDDMM) out[n] = <gT[r_n, :], xT[c_n, :]> over the token axis.
//
// Layout: gT (d_out, ld) and xT (d_in, ld) are token-contiguous, so every index is a dot product of two contiguous
// rows. A group of L lanes (L = 1..32, sized to the row length) owns one index: lanes stride over the row with 16-byte
// vector loads (coalesced), multiply-accumulate in fp32, then reduce with warp shuffles. Rows shared by several indices
// are served from L1/L2. Plain CUDA (no torch headers); see sparse_peft_kernels.h for the ABI.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "sparse_peft_kernels.h"

namespace {

// Dot product of one 16-byte vector pair, in fp32.
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b, float) {
  const float* fa = reinterpret_cast<const float*>(&a);
  const float* fb = reinterpret_cast<const float*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) acc = fmaf(fa[i], fb[i], acc);
  return acc;
}
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b, __half) {
  const __half2* ha = reinterpret_cast<const __half2*>(&a);
  const __half2* hb = reinterpret_cast<const __half2*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = __half22float2(ha[i]), fb = __half22float2(hb[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}
__device__ __forceinline__ float dot16(const uint4& a, const uint4& b, __nv_bfloat16) {
  const __nv_bfloat162* ha = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* hb = reinterpret_cast<const __nv_bfloat162*>(&b);
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 fa = __bfloat1622float2(ha[i]), fb = __bfloat1622float2(hb[i]);
    acc = fmaf(fa.x, fb.x, acc);
    acc = fmaf(fa.y, fb.y, acc);
  }
  return acc;
}

// Threads of a warp are split into 32 / L groups; every lane runs the same number of loop trips so the shuffles
// below always see the full warp.
template <typename T, typename I>
__global__ void sddmm_kernel(const T* __restrict__ gT, const T* __restrict__ xT, int64_t ld, int64_t d_out,
                             int64_t d_in, const I* __restrict__ idx, int64_t k, float* __restrict__ out,
                             int lanes_log2) {
  constexpr int VEC = 16 / sizeof(T);
  const int L = 1 << lanes_log2;
  const int lane = threadIdx.x & 31;
  const int sub = lane & (L - 1);                   // lane inside the group
  const int groups_per_warp = 32 >> lanes_log2;
  const int64_t warps_total = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t warp_id = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t nvec = ld / VEC;
  const int64_t numel = d_out * d_in;
  for (int64_t base = warp_id * groups_per_warp; base < k; base += warps_total * groups_per_warp) {
    const int64_t n = base + (lane >> lanes_log2);
    float acc = 0.f;
    if (n < k) {
      const int64_t flat = (int64_t)idx[n];
      if (flat >= 0 && flat < numel) {
        const int64_t r = flat / d_in, c = flat - r * d_in;
        const uint4* gp = reinterpret_cast<const uint4*>(gT + r * ld);
        const uint4* xp = reinterpret_cast<const uint4*>(xT + c * ld);
        int64_t v = sub;
        for (; v + L < nvec; v += 2 * L) {  // two independent 16-byte loads in flight per operand
          const uint4 a0 = __ldg(gp + v), b0 = __ldg(xp + v);
          const uint4 a1 = __ldg(gp + v + L), b1 = __ldg(xp + v + L);
          acc += dot16(a0, b0, T()) + dot16(a1, b1, T());
        }
        for (; v < nvec; v += L) acc += dot16(__ldg(gp + v), __ldg(xp + v), T());
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, acc, off);
      if (off < L) acc += other;  // only reduce inside the group
    }
    if (n < k && sub == 0) out[n] = acc;
  }
}

template <typename T, typename I>
int launch(const void* gT, const void* xT, int64_t ld, int64_t d_out, int64_t d_in, const void* idx, int64_t k,
           float* out, cudaStream_t s) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t nvec = ld / VEC;
  int lanes_log2 = 0;
  while (lanes_log2 < 5 && (1LL << lanes_log2) * 2 <= nvec) ++lanes_log2;  // ~1-2 vectors per lane minimum
  const int threads = 256;
  const int64_t per_block = (threads / 32) * (32 >> lanes_log2);
  int64_t blocks = (k + per_block - 1) / per_block;
  const int64_t cap = 65535LL * 16;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  sddmm_kernel<T, I><<<(unsigned)blocks, threads, 0, s>>>((const T*)gT, (const T*)xT, ld, d_out, d_in,
                                                           (const I*)idx, k, out, lanes_log2);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_idx(int index_type, const void* gT, const void* xT, int64_t ld, int64_t d_out, int64_t d_in,
               const void* idx, int64_t k, float* out, cudaStream_t s) {
  if (index_type == SP_INT32) return launch<T, int32_t>(gT, xT, ld, d_out, d_in, idx, k, out, s);
  if (index_type == SP_INT64) return launch<T, int64_t>(gT, xT, ld, d_out, d_in, idx, k, out, s);
  return (int)cudaErrorInvalidValue;
}

}  // namespace

extern "C" int sp_sddmm(int dtype, const void* gT, const void* xT, int64_t ld, int64_t d_out, int64_t d_in,
                        int index_type, const void* idx, int64_t k, float* out, void* stream) {
  if (k <= 0) return 0;
  cudaStream_t s = (cudaStream_t)stream;
  switch (dtype) {
    case SP_FLOAT32: return launch_idx<float>(index_type, gT, xT, ld, d_out, d_in, idx, k, out, s);
    case SP_FLOAT16: return launch_idx<__half>(index_type, gT, xT, ld, d_out, d_in, idx, k, out, s);
    case SP_BFLOAT16: return launch_idx<__nv_bfloat16>(index_type, gT, xT, ld, d_out, d_in, idx, k, out, s);
    default: return (int)cudaErrorInvalidValue;
  }
}
