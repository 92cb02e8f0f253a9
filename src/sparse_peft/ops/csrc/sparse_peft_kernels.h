// Plain C ABI between the CUDA kernels (*.cu, no torch headers) and the torch binding (binding.cpp).
//
// Every function launches on `stream` (a cudaStream_t passed as void*) and returns a cudaError_t as int
// (0 = success); sp_error_string turns it into a message. Sizes and flat offsets are int64 throughout.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Scalar type codes shared by all entry points.
enum { SP_FLOAT32 = 0, SP_FLOAT16 = 1, SP_BFLOAT16 = 2 };
enum { SP_INT32 = 0, SP_INT64 = 1 };

const char* sp_error_string(int err);

// weight[idx[n]] += alpha * vals[n] for n < k on a contiguous weight of `numel` elements.
// unique == 0: fp32 only, duplicates accumulate through atomicAdd.
// unique == 1: any dtype; idx must hold distinct entries (read-modify-write, rounded once).
// Entries outside [0, numel) are skipped.
int sp_scatter_add(int dtype, void* weight, int64_t numel, int index_type, const void* idx, const float* vals,
                   int64_t k, float alpha, int unique, void* stream);

// out[n] = sum_t gT[r, t] * xT[c, t] with r = idx[n] / d_in, c = idx[n] % d_in, accumulated in fp32.
// gT is (d_out, ld) and xT is (d_in, ld), both contiguous with ld % (16 / sizeof(dtype)) == 0 and 16-byte aligned
// rows (pad the token axis with zeros). Entries outside [0, d_out * d_in) give 0.
int sp_sddmm(int dtype, const void* gT, const void* xT, int64_t ld, int64_t d_out, int64_t d_in, int index_type,
             const void* idx, int64_t k, float* out, void* stream);

#ifdef __cplusplus
}
#endif
