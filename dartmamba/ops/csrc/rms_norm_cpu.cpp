// RMSNorm with a fused residual add for CPU tensors, forward only: the "cpp" backend of the op "rmsnorm"
// (dartmamba/ops/rmsnorm/cpp.py) for calls that need no gradient, built into the same library as the selective scan.
//
//   s = x + residual (or x),   out = s / sqrt(mean(s^2) + eps) * weight (+ bias),   residual_out = s
//
// One pass over a row: s is formed (and stored, when asked) while its squares are summed in vector lanes; a second
// pass over the row, now in L1, scales it. Rows are split over torch's intra-op threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace dartmamba_cpu;

constexpr int64_t kRowsPerTask = 16;

template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* residual, int64_t r_stride, const T* weight,
                   const T* bias, double eps, int64_t rows, int64_t dim, T* out, T* residual_out) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<T> sums(dim);
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * x_stride;
      const T* rr = residual != nullptr ? residual + row * r_stride : nullptr;
      T* s = residual_out != nullptr ? residual_out + row * dim : sums.data();
      Vec squares(T(0));
      int64_t j = 0;
      for (; j + W <= dim; j += W) {
        Vec v = Vec::loadu(xr + j);
        if (rr != nullptr) v = v + Vec::loadu(rr + j);
        v.store(s + j);
        squares = at::vec::fmadd(v, v, squares);
      }
      T tail = T(0);
      for (; j < dim; ++j) {
        const T v = rr != nullptr ? xr[j] + rr[j] : xr[j];
        s[j] = v;
        tail += v * v;
      }
      T lanes[W];
      squares.store(lanes);
      for (int l = 0; l < W; ++l) tail += lanes[l];
      const T mean = tail / static_cast<T>(dim);
      const T rstd = T(1) / std::sqrt(mean + static_cast<T>(eps));
      const Vec rv(rstd);
      T* o = out + row * dim;
      j = 0;
      for (; j + W <= dim; j += W) {
        Vec v = Vec::loadu(s + j) * rv * Vec::loadu(weight + j);
        if (bias != nullptr) v = v + Vec::loadu(bias + j);
        v.store(o + j);
      }
      for (; j < dim; ++j) o[j] = s[j] * rstd * weight[j] + (bias != nullptr ? bias[j] : T(0));
    }
  });
}

// x, residual: (rows, dim) with unit stride along dim (residual may be empty); weight, bias: contiguous (dim,)
// (bias may be empty); all of one floating dtype. -> (out (rows, dim), residual_out (rows, dim), or empty when
// store_residual is false), contiguous.
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& residual, double eps, bool store_residual) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(),
              "x must be a (rows, dim) CPU tensor with unit stride along dim");
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim && weight.is_contiguous(), "weight must be contiguous (dim,)");
  TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 1 && bias.size(0) == dim && bias.is_contiguous()),
              "bias must be empty or contiguous (dim,)");
  TORCH_CHECK(residual.numel() == 0 || (residual.sizes() == x.sizes() && residual.stride(1) == 1),
              "residual must be empty or x's shape with unit stride along dim");
  for (const at::Tensor* t : {&weight, &bias, &residual}) {
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == x.scalar_type(), "all inputs must have x's dtype");
  }
  at::Tensor out = at::empty({rows, dim}, x.options());
  at::Tensor residual_out = at::empty({store_residual ? rows : 0, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_cpu_fwd", [&] {
    using T = scalar_t;
    rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), residual.numel() > 0 ? residual.data_ptr<T>() : nullptr,
                     residual.numel() > 0 ? residual.stride(0) : 0, weight.data_ptr<T>(),
                     bias.numel() > 0 ? bias.data_ptr<T>() : nullptr, eps, rows, dim, out.data_ptr<T>(),
                     store_residual ? residual_out.data_ptr<T>() : nullptr);
  });
  return {out, residual_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor bias, Tensor residual, float eps, bool store_residual) -> "
        "Tensor[]");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
}
