// RMSNorm with a fused residual add for CPU tensors, forward only: the "cpp" backend of the op "rmsnorm"
// (dartmamba/ops/rmsnorm/cpp.py) for calls that need no gradient, built into the same library as the selective scan.
//
//   s = x + residual (or x),   out = s / sqrt(mean(s^2) + eps) * weight (+ bias),   residual_out = s
//
// One pass over a row: s is formed (and stored, when asked) while its squares are summed in vector lanes; a second
// pass over the row, now in L1, scales it. Rows are split over torch's intra-op threads. The math is in T (float, or
// double when the weight is double); x, residual, out and residual_out may each be stored as bfloat16, half, float
// or double: when one of them is not T, each row is converted into a T scratch row first and rounded on the way out
// (rms_norm_rows_converted), else the rows are read and written in place (rms_norm_rows).
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

// 1 / sqrt(mean square + eps) of a row of `dim` values: the vector lanes' partial sums plus the scalar tail's.
template <typename T>
T row_rstd(const Vectorized<T>& squares, T tail, int64_t dim, double eps) {
  constexpr int W = Vectorized<T>::size();
  T lanes[W];
  squares.store(lanes);
  for (int l = 0; l < W; ++l) tail += lanes[l];
  const T mean = tail / static_cast<T>(dim);
  return T(1) / std::sqrt(mean + static_cast<T>(eps));
}

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
      const T rstd = row_rstd(squares, tail, dim, eps);
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

// n values of type `type` at p -> T, and back (rounded to nearest even).
template <typename T, typename S>
void convert_in(const S* src, int64_t n, T* dst) {
  using Vec = Vectorized<T>;
  int64_t j = 0;
  if constexpr (std::is_same_v<S, T> || (std::is_same_v<T, float> && at::vec::is_reduced_floating_point_v<S>)) {
    for (; j + Vec::size() <= n; j += Vec::size()) load_as<T>(src + j).store(dst + j);
  }
  for (; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

template <typename T, typename S>
void convert_out(const T* src, int64_t n, S* dst) {
  using Vec = Vectorized<T>;
  int64_t j = 0;
  if constexpr (std::is_same_v<S, T> || (std::is_same_v<T, float> && at::vec::is_reduced_floating_point_v<S>)) {
    for (; j + Vec::size() <= n; j += Vec::size()) store_as(Vec::loadu(src + j), dst + j);
  }
  for (; j < n; ++j) dst[j] = static_cast<S>(src[j]);
}

template <typename T>
void load_row(const char* p, at::ScalarType type, int64_t n, T* dst) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "rms_norm_load_row",
                                  [&] { convert_in(reinterpret_cast<const scalar_t*>(p), n, dst); });
}

template <typename T>
void store_row(const T* src, at::ScalarType type, int64_t n, char* p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, type, "rms_norm_store_row",
                                  [&] { convert_out(src, n, reinterpret_cast<scalar_t*>(p)); });
}

// The same as rms_norm_rows (the same terms in the same order), for rows stored in other types than T: x, residual
// (absent: nullptr), out, residual_out (not stored: nullptr) with their row strides in elements and their types.
template <typename T>
void rms_norm_rows_converted(const at::Tensor& x, const at::Tensor& residual, const T* weight, const T* bias,
                             double eps, at::Tensor& out, at::Tensor& residual_out) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  const int64_t rows = x.size(0), dim = x.size(1);
  const char* xp = static_cast<const char*>(x.data_ptr());
  const int64_t x_step = x.stride(0) * x.element_size();
  const bool has_residual = residual.numel() > 0, store_residual = residual_out.numel() > 0;
  const char* rp = has_residual ? static_cast<const char*>(residual.data_ptr()) : nullptr;
  const int64_t r_step = has_residual ? residual.stride(0) * residual.element_size() : 0;
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t o_step = dim * out.element_size();
  char* rop = store_residual ? static_cast<char*>(residual_out.data_ptr()) : nullptr;
  const int64_t ro_step = store_residual ? dim * residual_out.element_size() : 0;
  const at::ScalarType xt = x.scalar_type(), ot = out.scalar_type();
  const at::ScalarType rt = has_residual ? residual.scalar_type() : xt;
  const at::ScalarType rot = store_residual ? residual_out.scalar_type() : xt;
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<T> s(dim), r(has_residual ? dim : 0);
    for (int64_t row = begin; row < end; ++row) {
      load_row(xp + row * x_step, xt, dim, s.data());
      if (has_residual) load_row(rp + row * r_step, rt, dim, r.data());
      Vec squares(T(0));
      int64_t j = 0;
      for (; j + W <= dim; j += W) {
        Vec v = Vec::loadu(s.data() + j);
        if (has_residual) v = v + Vec::loadu(r.data() + j);
        v.store(s.data() + j);
        squares = at::vec::fmadd(v, v, squares);
      }
      T tail = T(0);
      for (; j < dim; ++j) {
        const T v = has_residual ? s[j] + r[j] : s[j];
        s[j] = v;
        tail += v * v;
      }
      if (store_residual) store_row(s.data(), rot, dim, rop + row * ro_step);
      const T rstd = row_rstd(squares, tail, dim, eps);
      const Vec rv(rstd);
      j = 0;
      for (; j + W <= dim; j += W) {
        Vec v = Vec::loadu(s.data() + j) * rv * Vec::loadu(weight + j);
        if (bias != nullptr) v = v + Vec::loadu(bias + j);
        v.store(s.data() + j);
      }
      for (; j < dim; ++j) s[j] = s[j] * rstd * weight[j] + (bias != nullptr ? bias[j] : T(0));
      store_row(s.data(), ot, dim, op + row * o_step);
    }
  });
}

// x, residual: (rows, dim) with unit stride along dim (residual may be empty), each of any floating dtype; weight,
// bias: contiguous (dim,) (bias may be empty) in the compute dtype (float32, or float64). -> (out (rows, dim) in x's
// dtype, residual_out (rows, dim) in residual_dtype, or empty when store_residual is false), contiguous.
std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& residual, double eps, bool store_residual,
                                     at::ScalarType residual_dtype) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(),
              "x must be a (rows, dim) CPU tensor with unit stride along dim");
  const int64_t rows = x.size(0), dim = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == dim && weight.is_contiguous(), "weight must be contiguous (dim,)");
  TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 1 && bias.size(0) == dim && bias.is_contiguous()),
              "bias must be empty or contiguous (dim,)");
  TORCH_CHECK(residual.numel() == 0 || (residual.sizes() == x.sizes() && residual.stride(1) == 1),
              "residual must be empty or x's shape with unit stride along dim");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "weight must be float32 or float64 (the compute dtype)");
  TORCH_CHECK(bias.numel() == 0 || bias.scalar_type() == weight.scalar_type(), "bias must have weight's dtype");
  at::Tensor out = at::empty({rows, dim}, x.options());
  at::Tensor residual_out = at::empty({store_residual ? rows : 0, dim}, x.options().dtype(residual_dtype));
  const at::ScalarType ct = weight.scalar_type();
  const bool in_place = x.scalar_type() == ct && (residual.numel() == 0 || residual.scalar_type() == ct) &&
                        (!store_residual || residual_dtype == ct);
  AT_DISPATCH_FLOATING_TYPES(ct, "rms_norm_cpu_fwd", [&] {
    using T = scalar_t;
    if (!in_place) {
      rms_norm_rows_converted<T>(x, residual, weight.data_ptr<T>(), bias.numel() > 0 ? bias.data_ptr<T>() : nullptr,
                                 eps, out, residual_out);
      return;
    }
    rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), residual.numel() > 0 ? residual.data_ptr<T>() : nullptr,
                     residual.numel() > 0 ? residual.stride(0) : 0, weight.data_ptr<T>(),
                     bias.numel() > 0 ? bias.data_ptr<T>() : nullptr, eps, rows, dim, out.data_ptr<T>(),
                     store_residual ? residual_out.data_ptr<T>() : nullptr);
  });
  return {out, residual_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor weight, Tensor bias, Tensor residual, float eps, bool store_residual, "
        "ScalarType residual_dtype) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
}
