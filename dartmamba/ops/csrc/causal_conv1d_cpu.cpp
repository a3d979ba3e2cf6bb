// Depthwise causal conv1d (+ optional SiLU) for CPU tensors, forward and backward: the "cpp" backend of the op
// "conv1d" (dartmamba/ops/conv1d/cpp.py), built into the same library as the selective scan.
//
//   out[b, d, t] = act(bias[d] + sum_k w[d, k] x[b, d, t - (K - 1) + k]),   zeros before t = 0
//
// The vector lanes run over W adjacent channels: a task is one (batch, block of W channels); its rows are gathered
// into a time-major scratch behind K - 1 rows of zeros (any input layout), the K taps are vertical multiply-adds,
// the activation is applied in registers and the rows are scattered into an output laid out as the input's
// channels (channel-adjacent inputs give a channel-last output). The backward recomputes the pre-activation, and gets
// dx[t] = sum_k w[k] dpre[t + K - 1 - k], dw[k] = sum_t dpre[t] x[t - (K - 1) + k] and dbias = sum_t dpre[t].
// Inputs whose channels are adjacent (channel-last) skip the scratch in the forward: the lanes run over the
// channels of each time step's row (conv_forward_channels_last). With `reverse` the conv is anti-causal (out[t]
// reads x[t .. t + K - 1], w[K - 1] on x[t], zeros after the end): the causal conv of the flipped sequence, flipped
// back; the rows are reversed in the scratch, in cache.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "cpu_kernels.h"

namespace {

using namespace dartmamba_cpu;

struct ConvShape {
  int64_t batch, dim, length, taps, blocks;
  int width;
  bool reverse;
};

template <typename T>
struct ConvBlock {
  int64_t b = 0, d0 = 0;
  int valid = 0;
  std::vector<T> x;        // (K - 1 + L, W): zeros, then the rows
  std::vector<T> w;        // (K, W): the taps of the block's channels
  Vectorized<T> bias;

  template <typename S>
  void load(const Rows<S>& xr, const T* weight, const T* bias_ptr, const ConvShape& sh, int64_t task) {
    const int W = sh.width;
    const int64_t K = sh.taps;
    b = task / sh.blocks, d0 = (task % sh.blocks) * W;
    valid = static_cast<int>(std::min<int64_t>(W, sh.dim - d0));
    x.assign((K - 1) * W, T(0));
    x.resize((K - 1 + sh.length) * W);
    gather(xr, b, d0, valid, W, sh.length, x.data() + (K - 1) * W);
    if (sh.reverse) reverse_rows(x.data() + (K - 1) * W, W, sh.length);
    w.assign(K * W, T(0));
    T lanes[64] = {};
    for (int l = 0; l < valid; ++l) {
      for (int64_t k = 0; k < K; ++k) w[k * W + l] = weight[(d0 + l) * K + k];
      if (bias_ptr != nullptr) lanes[l] = bias_ptr[d0 + l];
    }
    bias = Vectorized<T>::loadu(lanes);
  }

  Vectorized<T> pre(int64_t t, int64_t K, int W) const {  // bias + sum_k w_k x[t - (K - 1) + k]
    Vectorized<T> acc = bias;
    for (int64_t k = 0; k < K; ++k) {
      acc = at::vec::fmadd(Vectorized<T>::loadu(w.data() + k * W), Vectorized<T>::loadu(x.data() + (t + k) * W), acc);
    }
    return acc;
  }
};

template <typename T, typename S>
void conv_forward(const Rows<S>& x, const T* weight, const T* bias, const ConvShape& sh, bool silu,
                  const Rows<S>& out) {
  using Vec = Vectorized<T>;
  const int W = sh.width;
  struct Scratch {
    ConvBlock<T> blk;
    std::vector<T> rows;
  };
  for_each_task(sh.batch * sh.blocks, [&] { return Scratch{ConvBlock<T>(), std::vector<T>(sh.length * W)}; },
                [&](int64_t task, Scratch& s) {
    s.blk.load(x, weight, bias, sh, task);
    for (int64_t t = 0; t < sh.length; ++t) {
      Vec y = s.blk.pre(t, sh.taps, W);
      if (silu) y = y * sigmoid(y);
      y.store(s.rows.data() + t * W);
    }
    if (sh.reverse) reverse_rows(s.rows.data(), W, sh.length);
    scatter(s.rows.data(), out, s.blk.b, s.blk.d0, s.blk.valid, W, sh.length);
  });
}

// The forward for inputs whose channels are adjacent (a slice of a (B, L, C) projection: x.stride(1) == 1), whose
// output like_input() lays out the same way: the lanes run over channels straight from the rows of time step t
// (no gather into a scratch, no scatter out of one), a task is one (batch, run of kRunSteps steps). Same terms in
// the same order as conv_forward (taps outside the sequence, zeros there, are skipped), so the same results.
constexpr int64_t kRunSteps = 32, kPrefetchSteps = 4;

template <typename T, typename S>
void conv_forward_channels_last(const Rows<S>& x, const T* weight, const T* bias, const ConvShape& sh, bool silu,
                                const Rows<S>& out) {
  using Vec = Vectorized<T>;
  const int W = sh.width;
  const int64_t K = sh.taps, L = sh.length, dim = sh.dim;
  std::vector<T> taps(K * dim), bias_row(dim, T(0));   // (K, dim): tap k of every channel, adjacent
  for (int64_t d = 0; d < dim; ++d) {
    for (int64_t k = 0; k < K; ++k) taps[k * dim + d] = weight[d * K + k];
    if (bias != nullptr) bias_row[d] = bias[d];
  }
  const int64_t runs = (L + kRunSteps - 1) / kRunSteps;
  const T* taps_data = taps.data();
  const T* bias_data = bias_row.data();
  const S* x_data = x.data;
  S* out_data = out.data;
  const int64_t xsb = x.sb, xst = x.st, osb = out.sb, ost = out.st;
  const bool reverse = sh.reverse;
  for_each_task(sh.batch * runs, [] { return 0; }, [=](int64_t task, int&) {
    const int64_t b = task / runs, t0 = (task % runs) * kRunSteps, t1 = std::min(L, t0 + kRunSteps);
    const S* xb = x_data + b * xsb;
    for (int64_t t = t0; t < t1; ++t) {
      S* dst = out_data + b * osb + t * ost;
      // tap k reads x[first + k * step]: causal x[t - (K - 1) + k], reverse (anti-causal) x[t + (K - 1) - k]
      const int64_t first = reverse ? t + (K - 1) : t - (K - 1), step = reverse ? -1 : 1;
      int64_t k0 = 0, k1 = K;   // the taps inside the sequence
      while (k0 < K && (first + k0 * step < 0 || first + k0 * step >= L)) ++k0;
      while (k1 > k0 && (first + (k1 - 1) * step < 0 || first + (k1 - 1) * step >= L)) --k1;
      const S* src = xb + (first + k0 * step) * xst;
      const int64_t src_step = step * xst;
      // the step that first reads a row reads it from memory: fetch the row kPrefetchSteps steps ahead
      const int64_t ahead = (reverse ? t + (K - 1) : t) + kPrefetchSteps;
      const char* next_row = ahead < L ? reinterpret_cast<const char*>(xb + ahead * xst) : nullptr;
      for (int64_t d = 0; d < dim; d += W) {
        if (next_row != nullptr) __builtin_prefetch(next_row + d * sizeof(S), 0, 3);
        const int n = static_cast<int>(std::min<int64_t>(W, dim - d));
        Vec acc = n == W ? Vec::loadu(bias_data + d) : Vec::loadu(bias_data + d, n);
        const S* xs = src + d;
        const T* ws = taps_data + k0 * dim + d;
        if (n == W) {
          for (int64_t k = k0; k < k1; ++k, xs += src_step, ws += dim) {
            acc = at::vec::fmadd(Vec::loadu(ws), load_as<T>(xs), acc);
          }
        } else {
          for (int64_t k = k0; k < k1; ++k, xs += src_step, ws += dim) {
            acc = at::vec::fmadd(Vec::loadu(ws, n), load_as<T>(xs, n), acc);
          }
        }
        if (silu) acc = acc * sigmoid(acc);
        store_as(acc, dst + d, n);
      }
    }
  });
}

// dw_part (batch, dim, K), db_part (batch, dim) or nullptr: partial sums per batch element (each written by the
// one task of its (batch, block)), reduced in order by the caller.
template <typename T>
void conv_backward(const Rows<T>& dout, const Rows<T>& x, const T* weight, const T* bias, const ConvShape& sh,
                   bool silu, const Rows<T>& dx, T* dw_part, T* db_part) {
  using Vec = Vectorized<T>;
  const int W = sh.width;
  const int64_t K = sh.taps, L = sh.length;
  struct Scratch {
    ConvBlock<T> blk;
    std::vector<T> dpre, rows;
  };
  auto make = [&] { return Scratch{ConvBlock<T>(), std::vector<T>((L + K - 1) * W), std::vector<T>(L * W)}; };
  for_each_task(sh.batch * sh.blocks, make, [&](int64_t task, Scratch& s) {
      ConvBlock<T>& blk = s.blk;
      std::vector<T>& dpre = s.dpre;
      std::vector<T>& rows = s.rows;
      blk.load(x, weight, bias, sh, task);
      T* dw = dw_part + blk.b * sh.dim * K;
      T* db = db_part != nullptr ? db_part + blk.b * sh.dim : nullptr;
      gather(dout, blk.b, blk.d0, blk.valid, W, L, dpre.data());
      if (sh.reverse) reverse_rows(dpre.data(), W, L);
      std::fill(dpre.begin() + L * W, dpre.end(), T(0));         // K - 1 zero steps after the end
      const Vec one(T(1));
      Vec db_acc(T(0));
      for (int64_t t = 0; t < L; ++t) {
        Vec g = Vec::loadu(dpre.data() + t * W);
        if (silu) {  // silu'(p) = sig(p) (1 + p (1 - sig(p)))
          const Vec p = blk.pre(t, K, W), sig = sigmoid(p);
          g = g * sig * at::vec::fmadd(p, one - sig, one);
        }
        g.store(dpre.data() + t * W);
        db_acc = db_acc + g;
      }
      T lanes[64];
      for (int64_t k = 0; k < K; ++k) {
        const Vec wk = Vec::loadu(blk.w.data() + k * W);
        Vec dw_acc(T(0));
        for (int64_t t = 0; t < L; ++t) {
          dw_acc = at::vec::fmadd(Vec::loadu(dpre.data() + t * W), Vec::loadu(blk.x.data() + (t + k) * W), dw_acc);
        }
        dw_acc.store(lanes);
        for (int l = 0; l < blk.valid; ++l) dw[(blk.d0 + l) * K + k] += lanes[l];
        // dx[t] gets w_k dpre[t + K - 1 - k]
        for (int64_t t = 0; t < L; ++t) {
          const Vec term = wk * Vec::loadu(dpre.data() + (t + K - 1 - k) * W);
          (k == 0 ? term : Vec::loadu(rows.data() + t * W) + term).store(rows.data() + t * W);
        }
      }
      if (sh.reverse) reverse_rows(rows.data(), W, L);
      scatter(rows.data(), dx, blk.b, blk.d0, blk.valid, W, L);
      if (db != nullptr) {
        db_acc.store(lanes);
        for (int l = 0; l < blk.valid; ++l) db[blk.d0 + l] += lanes[l];
      }
  });
}

void check_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu(), "x must be a (batch, dim, L) CPU tensor");
  // weight and bias in x's compute dtype (float32 for bfloat16 and float16 x)
  const at::ScalarType io = x.scalar_type();
  const at::ScalarType compute = (io == at::kBFloat16 || io == at::kHalf) ? at::kFloat : io;
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) >= 1 && weight.is_contiguous() &&
                  weight.scalar_type() == compute,
              "weight must be a contiguous (dim, K) tensor of x's compute dtype");
  TORCH_CHECK(bias.numel() == 0 || (bias.dim() == 1 && bias.size(0) == x.size(1) && bias.is_contiguous() &&
                                    bias.scalar_type() == compute),
              "bias must be empty or a contiguous (dim,) tensor of x's compute dtype");
}

// The output layout: channel-last when x's channels are adjacent (e.g. a (B, L, 2D) projection's slice), so that a
// GEMM over channels reads it without a copy; else as x (dense) or contiguous. dartmamba/ops/conv1d/cpp.py's fake
// applies the same rule.
at::Tensor like_input(const at::Tensor& x) {
  if (x.size(1) > 1 && x.stride(1) == 1) return at::empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
  return at::empty_like(x, at::MemoryFormat::Preserve);
}

ConvShape conv_shape(const at::Tensor& x, const at::Tensor& weight, int width, bool reverse) {
  return ConvShape{x.size(0), x.size(1), x.size(2), weight.size(1), (x.size(1) + width - 1) / width, width, reverse};
}

// x: (batch, dim, L), any strides, any floating dtype; weight: (dim, K), bias: (dim,) or empty, in x's compute dtype.
// -> out in x's dtype, laid out by like_input(x).
at::Tensor causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, bool silu,
                             bool reverse) {
  check_conv(x, weight, bias);
  at::Tensor out = like_input(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "causal_conv1d_cpu_fwd", [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const ConvShape sh = conv_shape(x, weight, Vectorized<T>::size(), reverse);
    const T* b = bias.numel() > 0 ? bias.data_ptr<T>() : nullptr;
    if (x.stride(1) == 1 && out.stride(1) == 1) {
      conv_forward_channels_last<T, S>(Rows<S>(x), weight.data_ptr<T>(), b, sh, silu, Rows<S>(out));
      return;
    }
    conv_forward<T, S>(Rows<S>(x), weight.data_ptr<T>(), b, sh, silu, Rows<S>(out));
  });
  return out;
}

// -> (dx laid out by like_input(x), dweight (dim, K), dbias (dim,) or empty)
std::vector<at::Tensor> causal_conv1d_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& bias, bool silu, bool reverse) {
  check_conv(x, weight, bias);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "causal_conv1d_bwd computes float32 and float64 inputs (cast bfloat16 / float16 ones to float32 first)");
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(), "dout must match x");
  const int64_t batch = x.size(0), dim = x.size(1), K = weight.size(1);
  at::Tensor dx = like_input(x);
  at::Tensor pw = at::zeros({batch, dim, K}, x.options()), pb = at::zeros({batch, bias.numel() > 0 ? dim : 0}, x.options());
  at::Tensor dw = at::empty({dim, K}, x.options()), db = at::empty({bias.numel() > 0 ? dim : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_cpu_bwd", [&] {
    using T = scalar_t;
    const ConvShape sh = conv_shape(x, weight, Vectorized<T>::size(), reverse);
    conv_backward<T>(Rows<T>(dout), Rows<T>(x), weight.data_ptr<T>(), bias.numel() > 0 ? bias.data_ptr<T>() : nullptr,
                     sh, silu, Rows<T>(dx), pw.data_ptr<T>(), bias.numel() > 0 ? pb.data_ptr<T>() : nullptr);
    sum_leading(pw.data_ptr<T>(), batch, dw.numel(), dw.data_ptr<T>());
    if (db.numel() > 0) sum_leading(pb.data_ptr<T>(), batch, db.numel(), db.data_ptr<T>());
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor bias, bool silu, bool reverse) -> Tensor");
  m.def("causal_conv1d_bwd(Tensor dout, Tensor x, Tensor weight, Tensor bias, bool silu, bool reverse) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd);
}
