// Torch binding for the sparse_peft CUDA kernels. Built lazily by sparse_peft/ops/_extension.py, or ahead of time
// as sparse_peft.ops._C by setup.py (SPARSE_PEFT_BUILD_EXT=1).
//
// The kernels live in *.cu files behind the plain C ABI of sparse_peft_kernels.h; this file only checks arguments,
// arranges layouts (contiguous copies, token-major transposes, fp32 values) and launches on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "sparse_peft_kernels.h"

// setup.py passes -DSPARSE_PEFT_SOURCES_HASH=<16 hex digits> (a hash of csrc/) to an ahead-of-time build, so the
// loader can tell a stale prebuilt module from a matching one. Just-in-time builds leave it empty.
#define SP_STR_(x) #x
#define SP_STR(x) SP_STR_(x)
#ifdef SPARSE_PEFT_SOURCES_HASH
#define SP_SOURCES_HASH SP_STR(SPARSE_PEFT_SOURCES_HASH)
#else
#define SP_SOURCES_HASH ""
#endif

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return SP_FLOAT32;
    case at::kHalf: return SP_FLOAT16;
    case at::kBFloat16: return SP_BFLOAT16;
    default: TORCH_CHECK(false, "sparse_peft: unsupported dtype ", t.scalar_type(), " (use float32, float16 or bfloat16)");
  }
  return -1;
}

int index_code(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "sparse_peft: indices must be int32 or int64, got ", t.scalar_type());
  return t.scalar_type() == at::kInt ? SP_INT32 : SP_INT64;
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "sparse_peft: ", what, " kernel failed: ", sp_error_string(err));
}

void* stream() { return (void*)c10::cuda::getCurrentCUDAStream().stream(); }

// weight (contiguous) += alpha * scatter(values); fp32 by atomics, 16-bit by a unique-index fp32 accumulation.
void scatter_into(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  TORCH_CHECK(weight.is_cuda() && weight.is_contiguous(), "sparse_peft: weight must be a contiguous CUDA tensor");
  TORCH_CHECK(indices.device() == weight.device() && values.device() == weight.device(),
              "sparse_peft: weight, indices and values must be on the same device");
  TORCH_CHECK(indices.numel() == values.numel(), "sparse_peft: indices and values differ in length (",
              indices.numel(), " vs ", values.numel(), ")");
  const int dt = dtype_code(weight);
  dtype_code(values);  // fp32/fp16/bf16 only: the sum is formed in fp32 (fp64 takes the reference, which sums in fp64)
  index_code(indices);
  if (indices.numel() == 0) return;
  auto idx = indices.reshape({-1}).contiguous();
  auto vals = values.reshape({-1}).to(at::kFloat).contiguous();  // (k,), exact for every accepted dtype
  int unique = 0;
  if (dt != SP_FLOAT32) {  // sum duplicates in fp32, round once per element (matches the reference)
    auto res = at::_unique2(idx, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
    auto uniq = std::get<0>(res);                                                   // (u,)
    auto acc = at::zeros({uniq.numel()}, vals.options()).index_add_(0, std::get<1>(res), vals);  // (u,)
    idx = uniq;
    vals = acc;
    unique = 1;
  }
  check(sp_scatter_add(dt, weight.data_ptr(), weight.numel(), index_code(idx), idx.data_ptr(), vals.data_ptr<float>(),
                       idx.numel(), (float)alpha, unique, stream()),
        "scatter_add_delta_");
}

void scatter_add_delta_(at::Tensor weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  c10::cuda::CUDAGuard guard(weight.device());
  if (weight.is_contiguous()) {
    scatter_into(weight, indices, values, alpha);
  } else {
    auto tmp = weight.contiguous();
    scatter_into(tmp, indices, values, alpha);
    weight.copy_(tmp);
  }
}

// (T, d) -> (d, ld) token-contiguous, ld = T rounded up to a 16-byte vector, zero padded.
at::Tensor token_major(const at::Tensor& a, int64_t ld) {
  const int64_t T = a.size(0), d = a.size(1);
  auto out = at::empty({d, ld}, a.options());
  if (ld != T) out.narrow(1, T, ld - T).zero_();
  if (T > 0) out.narrow(1, 0, T).copy_(a.t());
  return out;
}

at::Tensor gather_weight_grad(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices) {
  c10::cuda::CUDAGuard guard(grad_output.device());
  TORCH_CHECK(grad_output.is_cuda() && input.device() == grad_output.device() &&
                  indices.device() == grad_output.device(),
              "sparse_peft: grad_output, input and indices must be on the same CUDA device");
  const int64_t d_out = grad_output.size(-1), d_in = input.size(-1);
  auto g = grad_output.reshape({-1, d_out});  // (T, d_out)
  auto x = input.reshape({-1, d_in});         // (T, d_in)
  TORCH_CHECK(g.size(0) == x.size(0), "sparse_peft: grad_output and input have different token counts (",
              g.size(0), " vs ", x.size(0), ")");
  dtype_code(grad_output);  // fp32/fp16/bf16 only: the kernel accumulates in fp32 (fp64 takes the reference)
  dtype_code(input);
  if (g.scalar_type() != x.scalar_type()) {  // mixed kernel dtypes: fp32 is their accumulation dtype
    g = g.to(at::kFloat);
    x = x.to(at::kFloat);
  }
  const int dt = dtype_code(g);
  const int it = index_code(indices);
  auto idx = indices.reshape({-1}).contiguous();
  auto out = at::empty({idx.numel()}, g.options().dtype(at::kFloat));  // (k,)
  if (idx.numel() == 0) return out;
  const int64_t vec = 16 / g.element_size();
  const int64_t ld = (g.size(0) + vec - 1) / vec * vec;
  auto gT = token_major(g, ld);  // (d_out, ld)
  auto xT = token_major(x, ld);  // (d_in, ld)
  check(sp_sddmm(dt, gT.data_ptr(), xT.data_ptr(), ld, d_out, d_in, it, idx.data_ptr(), idx.numel(),
                 out.data_ptr<float>(), stream()),
        "gather_weight_grad");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_peft CUDA kernels (use sparse_peft.ops, not this module)";
  // What the loader checks before it uses an ahead-of-time build (sparse_peft/ops/_extension.py).
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
  m.attr("sources_hash") = SP_SOURCES_HASH;
  m.def("scatter_add_delta_", &scatter_add_delta_, "weight += alpha * scatter(values), in place");
  m.def("gather_weight_grad", &gather_weight_grad, "SDDMM: sum_t g[t, i] x[t, j] at flat indices (i, j)");
}
