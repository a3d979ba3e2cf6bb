// Exact selective scan (Mamba-1 recurrence) for CPU tensors, forward and backward.
//
// Built at first use by dartmamba/ops/_jit.py (torch.utils.cpp_extension.load, with the vector ISA torch itself
// dispatches to on this CPU) and registered as the "cpp" backend of the op "scan" (dartmamba/ops/scan/cpp.py). For
// every batch b, channel d and state index n:
//
//   dt_t = softplus(delta_t + delta_bias)              (bias and softplus optional)
//   h_t  = exp(dt_t A[d, n]) h_{t-1} + dt_t u_t B[b, g(d), n, t],        h_{-1} = 0
//   y_t  = sum_n C[b, g(d), n, t] h_t[n] + D[d] u_t,   out_t = y_t silu(z_t)      (D and z optional)
//
// with g(d) = d / (dim / G) for G groups of B and C. The forward also takes delta as a low-rank factor (batch, R, L)
// with delta_proj (dim, R): each block's delta rows are then delta_proj @ factor, formed in the scratch (R vector
// multiply-adds per step) instead of read from a (batch, dim, L) tensor. With `reverse` the recurrence runs right to left (t = L - 1
// first, h_L = 0): the same as flipping u, delta, B, C and z along L, scanning and flipping the output back; the last
// state is then the one after t = 0. (Rows are gathered and scattered in memory order and reversed in cache.) The recurrence is evaluated as written (no cumulative
// log-decays, no division by decays), so it is as stable as the sequential reference for any length and any decay
// in [0, 1]; exp, softplus and sigmoid are inline at::vec code within about an ulp (cpu_kernels.h).
//
// Layout of the work: the vector lanes run over W = Vectorized<T>::size() adjacent channels of one group, so B_t[n]
// and C_t[n] are broadcast scalars and the state update, the output and the adjoint are vertical vector
// arithmetic (no horizontal sums in the time loop). A task is one (batch, group, block of W channels); its rows of
// u, delta, z, dout are gathered into a time-major (L, W) scratch through the tensors' strides (any layout), the
// recurrence runs with the N state vectors in registers, and the results are scattered back. The backward
// recomputes the block's decays and states, (L, N, W) each (dC's lanes are summed on the way, while the states are
// in registers), and runs the adjoint g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1} backwards, 8 states at a time; dB
// and dC (sums over channels) collect in (L, N, W) lane accumulators and are reduced over the lanes once per task; dA, dD and delta_bias's gradient (sums over the batch) go to partial sums per batch element. The
// tasks are handed out dynamically (for_each_task), and every partial sum has one writer and is reduced in a fixed
// order, so the results do not depend on the number of threads or on which thread ran what.
//
// bimamba_scan_fwd (op "bimamba_scan", inference): Vim's two directions of one layer, out = 0.5 (y_fwd + y_bwd)
// silu(z), per task both directions' scans of the same channel block (the second right to left), summed and gated
// in cache and written once.
//
// Dtypes: the forward reads u, delta, B, C, z stored as S (bfloat16, half, float or double) and writes the output
// as S; everything in between (the scratch rows, the state, the sums) is T = compute_t<S> (float for the 16-bit
// types), and the parameters A, D, delta_bias, delta_proj come in T. The backward takes float and double only.
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


// B or C: (batch, G, N, L) through strides.
template <typename S>
struct Proj {
  const S* data;
  int64_t sb, sg, sn, st;
  explicit Proj(const at::Tensor& t)
      : data(t.data_ptr<S>()), sb(t.stride(0)), sg(t.stride(1)), sn(t.stride(2)), st(t.stride(3)) {}
  const S* at(int64_t b, int64_t g, int64_t t) const { return data + b * sb + g * sg + t * st; }  // [n * sn]
};

struct Shape {
  int64_t batch, dim, length, dstate, groups, per_group, blocks;  // blocks: channel blocks of W per group
  int width;                                                      // W, lanes per vector
};

// The inputs, shared by the forward and the backward: the sequences (u, delta, z, B, C) stored as S, the
// parameters (A, D, bias, delta_proj) in the compute type T.
template <typename T, typename S = T>
struct Inputs {
  Rows<S> u, delta, z;
  const T* A;        // (dim, N) contiguous
  const T* D;        // (dim,) or nullptr
  const T* bias;     // (dim,) or nullptr
  Proj<S> B, C;
  bool softplus;
  bool reverse;      // run right to left
  const T* delta_proj = nullptr;   // (dim, R) contiguous: `delta` is then the (batch, R, L) factor of delta_proj @ delta
  int64_t rank = 0;                // R
};

// One block of W channels d0 .. d0 + valid - 1 of batch b, group g, as time-major (L, W) rows.
template <typename T>
struct Block {
  int64_t b = 0, g = 0, d0 = 0;
  int valid = 0;
  std::vector<T> pre, dt, u, z, sig, a_cols, a2_cols;   // pre = delta + bias, dt = softplus(pre) or pre,
                                               // sig = sigmoid(z), a_cols: (N, W), A of the block's channels,
                                               // a2_cols: A log2(e) (the decays are 2^(dt A log2(e)))
  std::vector<T> bc;                           // (L, 2, N): B_t and C_t of (b, g), contiguous per step
  int64_t bc_of = -1;                          // the b * G + g they belong to
  std::vector<T> factor;                       // (L, R): the low-rank delta factor of batch element factor_of
  int64_t factor_of = -1;
  std::vector<T> proj_cols;                    // (R, W): delta_proj of the block's channels
  const T* A_col(int64_t n, int W) const { return a_cols.data() + n * W; }
  // exp(dt A[n]) on the lanes
  Vectorized<T> decay(const Vectorized<T>& step, int64_t n, int W) const {
    return exp2_inline(step * Vectorized<T>::loadu(a2_cols.data() + n * W));
  }

  Vectorized<T> lanes(const T* values) const {  // values[d0 + l] on the valid lanes, else 0
    T buf[64] = {};
    if (values != nullptr) {
      for (int l = 0; l < valid; ++l) buf[l] = values[d0 + l];
    }
    return Vectorized<T>::loadu(buf);
  }

  // pre[t] = delta_proj[d0 .. d0 + W) @ factor[:, t], in memory order (the rows of the full delta, built in
  // registers: the (batch, dim, L) tensor is never written); terms added in order r = 0 .. R - 1.
  template <typename S>
  void low_rank_delta(const Inputs<T, S>& in, const Shape& sh) {
    using Vec = Vectorized<T>;
    const int W = sh.width;
    const int64_t L = sh.length, R = in.rank;
    if (factor_of != b) {   // the factor is shared by all channels of b: copy it once, contiguous per step
      factor.resize(L * R);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t r = 0; r < R; ++r) {
          factor[t * R + r] = static_cast<T>(in.delta.data[b * in.delta.sb + r * in.delta.sd + t * in.delta.st]);
        }
      }
      factor_of = b;
    }
    std::vector<T>& cols = proj_cols;
    cols.assign(R * W, T(0));
    for (int l = 0; l < valid; ++l) {
      for (int64_t r = 0; r < R; ++r) cols[r * W + l] = in.delta_proj[(d0 + l) * R + r];
    }
    // kSteps steps at a time: each step's sum is one chain of R dependent multiply-adds, so independent steps side
    // by side keep the FMA pipes busy (the same terms in the same order per step: the same bits)
    constexpr int kSteps = 8;
    int64_t t = 0;
    for (; t + kSteps <= L; t += kSteps) {
      const T* f = factor.data() + t * R;
      Vec acc[kSteps];
      for (int k = 0; k < kSteps; ++k) acc[k] = Vec(T(0));
      for (int64_t r = 0; r < R; ++r) {
        const Vec c = Vec::loadu(cols.data() + r * W);
#pragma GCC unroll 8
        for (int k = 0; k < kSteps; ++k) acc[k] = at::vec::fmadd(c, Vec(f[k * R + r]), acc[k]);
      }
      for (int k = 0; k < kSteps; ++k) acc[k].store(pre.data() + (t + k) * W);
    }
    for (; t < L; ++t) {
      const T* f = factor.data() + t * R;
      Vec acc(T(0));
      for (int64_t r = 0; r < R; ++r) acc = at::vec::fmadd(Vec::loadu(cols.data() + r * W), Vec(f[r]), acc);
      acc.store(pre.data() + t * W);
    }
  }

  template <typename S>
  void load(const Inputs<T, S>& in, const Shape& sh, int64_t b_, int64_t g_, int64_t j) {
    using Vec = Vectorized<T>;
    const int W = sh.width;
    const int64_t L = sh.length, N = sh.dstate;
    b = b_, g = g_, d0 = g * sh.per_group + j * W;
    if (bc_of != b * sh.groups + g) {
      bc.resize(L * 2 * N);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t src = in.reverse ? L - 1 - t : t;
        const S* Bp = in.B.at(b, g, src);
        const S* Cp = in.C.at(b, g, src);
        for (int64_t n = 0; n < N; ++n) {
          bc[t * 2 * N + n] = static_cast<T>(Bp[n * in.B.sn]);
          bc[t * 2 * N + N + n] = static_cast<T>(Cp[n * in.C.sn]);
        }
      }
      bc_of = b * sh.groups + g;
    }
    valid = static_cast<int>(std::min<int64_t>(W, sh.per_group - j * W));
    pre.resize(L * W), dt.resize(L * W), u.resize(L * W);
    if (in.delta_proj != nullptr) {
      low_rank_delta(in, sh);
    } else {
      gather(in.delta, b, d0, valid, sh.width, sh.length, pre.data());
    }
    gather(in.u, b, d0, valid, sh.width, sh.length, u.data());
    if (in.reverse) reverse_rows(pre.data(), W, L), reverse_rows(u.data(), W, L);
    if (in.z.data != nullptr) {
      z.resize(L * W), sig.resize(L * W);
      gather(in.z, b, d0, valid, sh.width, sh.length, z.data());
      if (in.reverse) reverse_rows(z.data(), W, L);
      for (int64_t t = 0; t < L; ++t) {
        const Vec zv = Vec::loadu(z.data() + t * W);
        sigmoid(zv).store(sig.data() + t * W);
      }
    }
    a_cols.assign(N * W, T(0));
    a2_cols.assign(N * W, T(0));
    for (int l = 0; l < valid; ++l) {
      for (int64_t n = 0; n < N; ++n) {
        a_cols[n * W + l] = in.A[(d0 + l) * N + n];
        a2_cols[n * W + l] = in.A[(d0 + l) * N + n] * kLog2e<T>;
      }
    }
    const Vec bias = lanes(in.bias);
    for (int64_t t = 0; t < L; ++t) {
      const Vec p = Vec::loadu(pre.data() + t * W) + bias;
      p.store(pre.data() + t * W);
      (in.softplus ? softplus(p) : p).store(dt.data() + t * W);
    }
  }
};

// The blocks of a task: blocks [j0, j1) of (batch b, group g). tasks = batch * G * splits.
struct Task {
  int64_t b, g, j0, j1;
};

inline Task task_of(const Shape& sh, int64_t splits, int64_t index) {
  const int64_t bg = index / splits, part = index % splits;
  const int64_t per = (sh.blocks + splits - 1) / splits;
  return Task{bg / sh.groups, bg % sh.groups, std::min(sh.blocks, part * per), std::min(sh.blocks, (part + 1) * per)};
}

// ---------------------------------------------------------------------------------------------------------------
// Forward. NS: the state size at compile time (0: sh.dstate at run time), so that the N state vectors live in
// registers for the common sizes.
// ---------------------------------------------------------------------------------------------------------------
// The block's output rows, time-major (L, W) in memory order (right to left runs reversed back), left in blk.pre;
// the last state to `last` unless it is nullptr.
template <typename T, typename S, int NS>
T* forward_rows(const Inputs<T, S>& in, const Shape& sh, Block<T>& blk, T* last, Prefetcher<T>& pf) {
  using Vec = Vectorized<T>;
  constexpr int kMaxN = NS > 0 ? NS : 256;
  const int W = sh.width;
  const int64_t L = sh.length, N = NS > 0 ? NS : sh.dstate;
  const Vec Dv = blk.lanes(in.D);
  const bool gated = in.z.data != nullptr;
  Vec h[kMaxN];
  for (int64_t n = 0; n < N; ++n) h[n] = Vec(T(0));
  T* y_rows = blk.pre.data();  // pre is not read again in the forward: it takes the output rows
  for (int64_t t = 0; t < L; ++t) {
    const Vec step = Vec::loadu(blk.dt.data() + t * W);
    const Vec uv = Vec::loadu(blk.u.data() + t * W);
    const Vec drive = step * uv;
    const T* Bt = blk.bc.data() + t * 2 * N;
    const T* Ct = Bt + N;
    Vec y[2] = {Dv * uv, Vec(T(0))};     // two partial sums over the states: half the dependency chain
#pragma GCC unroll 16
    for (int64_t n = 0; n < N; ++n) {
      const Vec a = blk.decay(step, n, W);
      h[n] = at::vec::fmadd(a, h[n], drive * Vec(Bt[n]));
      y[n & 1] = at::vec::fmadd(Vec(Ct[n]), h[n], y[n & 1]);
    }
    Vec out_t = y[0] + y[1];
    if (gated) out_t = out_t * Vec::loadu(blk.z.data() + t * W) * Vec::loadu(blk.sig.data() + t * W);   // silu(z)
    out_t.store(y_rows + t * W);
    pf.step();
  }
  if (in.reverse) reverse_rows(y_rows, W, L);
  if (last != nullptr) {
    T lanes[64];
    for (int64_t n = 0; n < N; ++n) {
      h[n].store(lanes);
      for (int l = 0; l < blk.valid; ++l) last[(blk.b * sh.dim + blk.d0 + l) * N + n] = lanes[l];
    }
  }
  return y_rows;
}

template <typename T, typename S, int NS>
void forward_block(const Inputs<T, S>& in, const Shape& sh, Block<T>& blk, const Rows<S>& out, T* last,
                   Prefetcher<T>& pf) {
  const T* y_rows = forward_rows<T, S, NS>(in, sh, blk, last, pf);
  scatter(y_rows, out, blk.b, blk.d0, blk.valid, sh.width, sh.length);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
struct Grads {
  Rows<T> du, ddelta, dz;  // (batch, dim, L)
  T* dB;                   // (batch, G, N, L) contiguous: the task's slot of the partial sums
  T* dC;
  T* dA;                   // (dim, N): the task's batch element's slot
  T* dD;                   // (dim,) or nullptr: likewise
  T* dbias;                // (dim,) or nullptr: likewise
};

// Per-thread scratch of the backward.
template <typename T>
struct BackwardScratch {
  Block<T> blk;
  std::vector<T> decays, states;  // (L, N, W): exp(dt_t A) and h_t of the block
  std::vector<T> acc_B, acc_C;    // (L, N, W): dB, dC summed over the task's blocks, per lane
  std::vector<T> rows;            // (4, L, W): dy, dz, dstep, du
};

constexpr int64_t kStateGroup = 8;  // states whose adjoints run together in the backward

// The adjoint of states n0 .. n0 + K - 1 of the block in the scratch, backwards in time (K at compile time, so that
// the carries and dA sums live in registers). Adds d(drive) = sum_n g_t B_t to du_rows and the decays' part of
// dL/d(dt) to dstep_rows, the lanes of dB, dC to the scratch's accumulators and dA to the thread's partial sums.
template <typename T, int K>
void adjoint_group(const Shape& sh, BackwardScratch<T>& s, int64_t n0, int64_t, int64_t N, const T* dlast,
                   const Grads<T>& gr, const T* dy_rows, T* dstep_rows, T* du_rows) {
  using Vec = Vectorized<T>;
  const int W = sh.width;
  const int64_t L = sh.length;
  const Block<T>& blk = s.blk;
  const Vec zero(T(0));
  Vec carry[K], dA_acc[K];
  for (int k = 0; k < K; ++k) {
    T lanes[64] = {};
    if (dlast != nullptr) {
      for (int l = 0; l < blk.valid; ++l) lanes[l] = dlast[(blk.b * sh.dim + blk.d0 + l) * N + n0 + k];
    }
    carry[k] = Vec::loadu(lanes);
    dA_acc[k] = zero;
  }
  for (int64_t t = L - 1; t >= 0; --t) {
    const Vec dy = Vec::loadu(dy_rows + t * W);
    const Vec step = Vec::loadu(blk.dt.data() + t * W);
    const Vec drive = step * Vec::loadu(blk.u.data() + t * W);
    const T* Bt = blk.bc.data() + t * 2 * N + n0;
    const T* Ct = Bt + N;
    const int64_t at = (t * N + n0) * W;
    const T* a_t = s.decays.data() + at;
    const T* h_t = s.states.data() + at;
    T* accB_t = s.acc_B.data() + at;
    Vec ddrive = zero, dstep = zero;
    if (t > 0) {
      const T* h_prev = h_t - N * W;
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) {
        const Vec g = at::vec::fmadd(Vec(Ct[k]), dy, carry[k]);       // dL/dh_t
        const Vec a = Vec::loadu(a_t + k * W);
        at::vec::fmadd(g, drive, Vec::loadu(accB_t + k * W)).store(accB_t + k * W);
        ddrive = at::vec::fmadd(g, Vec(Bt[k]), ddrive);
        const Vec q = g * a * Vec::loadu(h_prev + k * W);            // dL/d(dt_t A) = g_t exp(dt_t A) h_{t-1}
        dstep = at::vec::fmadd(q, Vec::loadu(blk.A_col(n0 + k, W)), dstep);
        dA_acc[k] = at::vec::fmadd(q, step, dA_acc[k]);
        carry[k] = a * g;
      }
    } else {
#pragma GCC unroll 16
      for (int k = 0; k < K; ++k) {
        const Vec g = at::vec::fmadd(Vec(Ct[k]), dy, carry[k]);
        at::vec::fmadd(g, drive, Vec::loadu(accB_t + k * W)).store(accB_t + k * W);
        ddrive = at::vec::fmadd(g, Vec(Bt[k]), ddrive);
      }
    }
    (Vec::loadu(du_rows + t * W) + ddrive).store(du_rows + t * W);
    (Vec::loadu(dstep_rows + t * W) + dstep).store(dstep_rows + t * W);
  }
  T lanes[64];
  for (int k = 0; k < K; ++k) {
    dA_acc[k].store(lanes);
    for (int l = 0; l < blk.valid; ++l) gr.dA[(blk.d0 + l) * N + n0 + k] += lanes[l];
  }
}

template <typename T, int NS>
void backward_block(const Inputs<T>& in, const Shape& sh, BackwardScratch<T>& s, const Rows<T>& dout,
                    const T* dlast, const Grads<T>& gr, Prefetcher<T>& pf) {
  using Vec = Vectorized<T>;
  constexpr int kMaxN = NS > 0 ? NS : 256;
  const int W = sh.width;
  const int64_t L = sh.length, N = NS > 0 ? NS : sh.dstate;
  const bool gated = in.z.data != nullptr;
  Block<T>& blk = s.blk;
  const Vec Dv = blk.lanes(in.D);
  T* dy_rows = s.rows.data();
  T* dz_rows = dy_rows + L * W;       // dout silu'(z) first, then dz = that times the ungated output
  T* dstep_rows = dz_rows + L * W;
  T* du_rows = dstep_rows + L * W;
  gather(dout, blk.b, blk.d0, blk.valid, sh.width, sh.length, dy_rows);
  if (in.reverse) reverse_rows(dy_rows, W, L);

  // dL/dy through the gate: out = y_pre silu(z), so dy = dout silu(z), dz = dout y_pre silu'(z) with
  // silu'(z) = sig (1 + z (1 - sig)), sig = sigmoid(z)
  const Vec one(T(1)), zero(T(0));
  for (int64_t t = 0; t < L; ++t) {
    if (gated) {
      const Vec dout_t = Vec::loadu(dy_rows + t * W);
      const Vec zv = Vec::loadu(blk.z.data() + t * W), sig = Vec::loadu(blk.sig.data() + t * W);
      (dout_t * sig * at::vec::fmadd(zv, one - sig, one)).store(dz_rows + t * W);
      (dout_t * zv * sig).store(dy_rows + t * W);
    }
    zero.store(dstep_rows + t * W);
    zero.store(du_rows + t * W);    // collects d(drive) = sum_n g_t B_t first
  }

  // recompute decays and states; with them the ungated output (for dz) and dC's lanes, dy_t h_t (so that the
  // adjoint pass, which is bound by memory traffic, reads fewer rows)
  {
    Vec h[kMaxN];
    for (int64_t n = 0; n < N; ++n) h[n] = Vec(T(0));
    for (int64_t t = 0; t < L; ++t) {
      const Vec step = Vec::loadu(blk.dt.data() + t * W);
      const Vec uv = Vec::loadu(blk.u.data() + t * W);
      const Vec drive = step * uv;
      const Vec dy = Vec::loadu(dy_rows + t * W);
      const T* Bt = blk.bc.data() + t * 2 * N;
      const T* Ct = Bt + N;
      T* a_t = s.decays.data() + t * N * W;
      T* h_t = s.states.data() + t * N * W;
      T* accC_t = s.acc_C.data() + t * N * W;
      Vec y[2] = {Dv * uv, Vec(T(0))};
#pragma GCC unroll 16
      for (int64_t n = 0; n < N; ++n) {
        const Vec a = blk.decay(step, n, W);
        h[n] = at::vec::fmadd(a, h[n], drive * Vec(Bt[n]));
        a.store(a_t + n * W);
        h[n].store(h_t + n * W);
        at::vec::fmadd(dy, h[n], Vec::loadu(accC_t + n * W)).store(accC_t + n * W);
        if (gated) y[n & 1] = at::vec::fmadd(Vec(Ct[n]), h[n], y[n & 1]);
      }
      if (gated) ((y[0] + y[1]) * Vec::loadu(dz_rows + t * W)).store(dz_rows + t * W);
      pf.step();
    }
  }

  // the adjoint g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}, backwards in time, kStateGroup states at a time (their
  // recurrences are independent; the carries and dA sums stay in registers); the sums over the states, d(drive)
  // and dL/d(dt) through the decays, collect in du_rows and dstep_rows
  int64_t n0 = 0;
  for (; n0 + kStateGroup <= N; n0 += kStateGroup) {
    adjoint_group<T, kStateGroup>(sh, s, n0, kStateGroup, N, dlast, gr, dy_rows, dstep_rows, du_rows);
  }
  for (; n0 < N; ++n0) adjoint_group<T, 1>(sh, s, n0, 1, N, dlast, gr, dy_rows, dstep_rows, du_rows);

  // through the drive dt u: du = d(drive) dt + D dy, dL/d(dt) += d(drive) u; then softplus' (sigmoid(pre), 1 above
  // the threshold, as softplus_backward)
  Vec dD_acc = zero, dbias_acc = zero;
  const Vec threshold(static_cast<T>(kSoftplusThreshold));
  for (int64_t t = 0; t < L; ++t) {
    const Vec dy = Vec::loadu(dy_rows + t * W);
    const Vec step = Vec::loadu(blk.dt.data() + t * W);
    const Vec uv = Vec::loadu(blk.u.data() + t * W);
    const Vec ddrive = Vec::loadu(du_rows + t * W);
    Vec dstep = at::vec::fmadd(ddrive, uv, Vec::loadu(dstep_rows + t * W));
    at::vec::fmadd(ddrive, step, Dv * dy).store(du_rows + t * W);
    dD_acc = at::vec::fmadd(dy, uv, dD_acc);
    if (in.softplus) {
      const Vec p = Vec::loadu(blk.pre.data() + t * W);
      dstep = Vec::blendv(dstep * sigmoid(p), dstep, p > threshold);
    }
    dstep.store(dstep_rows + t * W);
    dbias_acc = dbias_acc + dstep;
  }
  if (in.reverse) {
    reverse_rows(du_rows, W, L), reverse_rows(dstep_rows, W, L);
    if (gated) reverse_rows(dz_rows, W, L);
  }
  scatter(du_rows, gr.du, blk.b, blk.d0, blk.valid, sh.width, sh.length);
  scatter(dstep_rows, gr.ddelta, blk.b, blk.d0, blk.valid, sh.width, sh.length);
  if (gated) scatter(dz_rows, gr.dz, blk.b, blk.d0, blk.valid, sh.width, sh.length);
  T lanes[64];
  if (gr.dD != nullptr) {
    dD_acc.store(lanes);
    for (int l = 0; l < blk.valid; ++l) gr.dD[blk.d0 + l] += lanes[l];
  }
  if (gr.dbias != nullptr) {
    dbias_acc.store(lanes);
    for (int l = 0; l < blk.valid; ++l) gr.dbias[blk.d0 + l] += lanes[l];
  }
}

// dB, dC of a task: the lane accumulators summed over the lanes (pad lanes hold zeros) into this thread's partials.
template <typename T>
void reduce_lanes(const Shape& sh, const Task& task, const BackwardScratch<T>& s, const Grads<T>& gr, bool reverse) {
  const int W = sh.width;
  const int64_t L = sh.length, N = sh.dstate;
  T* dB = gr.dB + (task.b * sh.groups + task.g) * N * L;
  T* dC = gr.dC + (task.b * sh.groups + task.g) * N * L;
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      const T* lb = s.acc_B.data() + (t * N + n) * W;
      const T* lc = s.acc_C.data() + (t * N + n) * W;
      T sb = T(0), sc = T(0);
      for (int l = 0; l < W; ++l) sb += lb[l], sc += lc[l];
      const int64_t at = n * L + (reverse ? L - 1 - t : t);   // the accumulators are in scan order
      dB[at] += sb;
      dC[at] += sc;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------------------
Shape shape_of(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B, int width) {
  Shape sh{};
  sh.batch = u.size(0), sh.dim = u.size(1), sh.length = u.size(2), sh.dstate = A.size(1), sh.groups = B.size(1);
  sh.per_group = sh.dim / sh.groups;
  sh.width = width;
  sh.blocks = (sh.per_group + width - 1) / width;
  return sh;
}

// delta_proj: empty (delta is (batch, dim, L)) or (dim, R) contiguous (delta is the (batch, R, L) factor).
void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias,
                  const at::Tensor& delta_proj = at::Tensor()) {
  TORCH_CHECK(u.dim() == 3 && delta.dim() == 3, "u and delta must be (batch, dim, L) tensors");
  if (delta_proj.defined() && delta_proj.numel() > 0) {
    TORCH_CHECK(delta_proj.dim() == 2 && delta_proj.size(0) == u.size(1) && delta_proj.is_contiguous(),
                "delta_proj must be a contiguous (dim, R) tensor");
    TORCH_CHECK(delta.size(0) == u.size(0) && delta.size(1) == delta_proj.size(1) && delta.size(2) == u.size(2),
                "with delta_proj, delta must be the (batch, R, L) factor");
  } else {
    TORCH_CHECK(delta.sizes() == u.sizes(), "u and delta must be (batch, dim, L) tensors");
  }
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.is_contiguous(), "A must be a contiguous (dim, N) tensor");
  // the sequences share u's dtype; the parameters are in its compute dtype (float for bfloat16 / half)
  const at::ScalarType io = u.scalar_type();
  const at::ScalarType compute = (io == at::kBFloat16 || io == at::kHalf) ? at::kFloat : io;
  TORCH_CHECK(A.size(1) <= 256, "the state size N must be at most 256");
  for (const at::Tensor* t : {&B, &C}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == u.size(0) && t->size(2) == A.size(1) && t->size(3) == u.size(2) &&
                    t->size(1) == B.size(1),
                "B and C must be (batch, G, N, L) tensors");
  }
  TORCH_CHECK(B.size(1) >= 1 && u.size(1) % B.size(1) == 0, "dim must be a multiple of the number of groups");
  TORCH_CHECK(z.numel() == 0 || z.sizes() == u.sizes(), "z must be empty or have u's shape");
  for (const at::Tensor* t : {&D, &bias}) {
    TORCH_CHECK(t->numel() == 0 || (t->dim() == 1 && t->size(0) == u.size(1) && t->is_contiguous()),
                "D and delta_bias must be empty or contiguous (dim,) tensors");
  }
  for (const at::Tensor* t : {&u, &delta, &B, &C, &z}) {
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == io && t->device().is_cpu()),
                "u, delta, B, C and z must be CPU tensors of one floating dtype");
  }
  for (const at::Tensor* t : {&A, &D, &bias, &delta_proj}) {
    TORCH_CHECK(!t->defined() || t->numel() == 0 || (t->scalar_type() == compute && t->device().is_cpu()),
                "A, D, delta_bias and delta_proj must be CPU tensors of u's compute dtype (float32 for bfloat16 and "
                "float16 u)");
  }
}

template <typename T, typename S = T>
Inputs<T, S> inputs_of(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& C, const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias,
                       bool softplus, bool reverse, const at::Tensor& delta_proj = at::Tensor()) {
  const bool low_rank = delta_proj.defined() && delta_proj.numel() > 0;
  return Inputs<T, S>{Rows<S>(u), Rows<S>(delta), Rows<S>(z), A.data_ptr<T>(),
                      D.numel() > 0 ? D.data_ptr<T>() : nullptr, bias.numel() > 0 ? bias.data_ptr<T>() : nullptr,
                      Proj<S>(B), Proj<S>(C), softplus, reverse, low_rank ? delta_proj.data_ptr<T>() : nullptr,
                      low_rank ? delta_proj.size(1) : 0};
}

// The state sizes compiled in (Mamba's 16, and 8); others run with N known at run time only.
#define WITH_STATE_SIZE(dstate, CALL)                 \
  switch (dstate) {                                   \
    case 8: { constexpr int NS = 8; CALL; break; }    \
    case 16: { constexpr int NS = 16; CALL; break; }  \
    default: { constexpr int NS = 0; CALL; break; }   \
  }

// Tasks: batch * G * splits, each a range of channel blocks of one (batch, group); at least about `min_tasks` of
// them (from the shape alone, so that the partial sums, and the results, do not depend on the thread count), and
// few enough that the backward's lane accumulators are reduced rarely.
inline int64_t splits_of(const Shape& sh, int64_t min_tasks) {
  const int64_t groups = sh.batch * sh.groups;
  return std::max<int64_t>(1, std::min(sh.blocks, (min_tasks + groups - 1) / groups));
}
constexpr int64_t kForwardTasks = 16, kBackwardTasks = 8;

template <typename T>
struct ForwardScratch {
  Block<T> blk;
  Prefetcher<T> pf;
};

template <typename T, typename S, int NS>
void run_forward(const Inputs<T, S>& in, const Shape& sh, const Rows<S>& out, T* last) {
  const int64_t splits = splits_of(sh, kForwardTasks);
  for_each_task(sh.batch * sh.groups * splits, [] { return ForwardScratch<T>(); },
                [&](int64_t index, ForwardScratch<T>& scratch) {
      Block<T>& blk = scratch.blk;
      Prefetcher<T>& pf = scratch.pf;
      const Task task = task_of(sh, splits, index);
      for (int64_t j = task.j0; j < task.j1; ++j) {
        blk.load(in, sh, task.b, task.g, j);
        pf.reset();
        if (j + 1 < task.j1) {
          const int64_t d1 = task.g * sh.per_group + (j + 1) * sh.width;
          const int valid = static_cast<int>(std::min<int64_t>(sh.width, sh.per_group - (j + 1) * sh.width));
          for (const Rows<S>* r : {&in.delta, &in.u, &in.z}) {
            if (r != &in.delta || in.delta_proj == nullptr) pf.add(*r, task.b, d1, valid, sh.length);
          }
          pf.add(out, task.b, d1, valid, sh.length, true);
        }
        pf.start(sh.length);
        forward_block<T, S, NS>(in, sh, blk, out, last, pf);
      }
  });
}

// Vim's two scan directions of one layer for inference, in one pass over the channel blocks: per block, the
// left-to-right scan of `fwd` and the right-to-left scan of `bwd` (both ungated: their z is unset), their rows
// summed in cache, gated once, out = 0.5 (y_fwd + y_bwd) silu(z), and written once. (Two scan_fwd calls would each
// gather z and take its sigmoid, write their own output, and leave the sum and the halving to two more passes.)
template <typename T>
struct BidirectionalScratch {
  Block<T> fwd, bwd;        // one per direction: each keeps its own (batch, group)'s B, C and delta factor
  std::vector<T> z;         // (L, W): the block's z, then its gate
  Prefetcher<T> pf;
};

template <typename T, typename S, int NS>
void run_bidirectional(const Inputs<T, S>& fwd, const Inputs<T, S>& bwd, const Rows<S>& z, const Shape& sh,
                       const Rows<S>& out) {
  using Vec = Vectorized<T>;
  const int64_t splits = splits_of(sh, kForwardTasks);
  for_each_task(sh.batch * sh.groups * splits, [] { return BidirectionalScratch<T>(); },
                [&](int64_t index, BidirectionalScratch<T>& s) {
      const Task task = task_of(sh, splits, index);
      const int W = sh.width;
      const int64_t L = sh.length;
      for (int64_t j = task.j0; j < task.j1; ++j) {
        const bool next = j + 1 < task.j1;
        const int64_t d1 = task.g * sh.per_group + (j + 1) * W;
        const int valid1 = static_cast<int>(std::min<int64_t>(W, sh.per_group - (j + 1) * W));
        // the first pass prefetches what the second reads, the second what the next block's first reads
        s.fwd.load(fwd, sh, task.b, task.g, j);
        s.pf.reset();
        if (bwd.delta_proj == nullptr) s.pf.add(bwd.delta, task.b, s.fwd.d0, s.fwd.valid, L);
        s.pf.add(bwd.u, task.b, s.fwd.d0, s.fwd.valid, L);
        s.pf.add(z, task.b, s.fwd.d0, s.fwd.valid, L);
        s.pf.start(L);
        const T* rows_f = forward_rows<T, S, NS>(fwd, sh, s.fwd, nullptr, s.pf);
        s.bwd.load(bwd, sh, task.b, task.g, j);
        s.pf.reset();
        if (next) {
          if (fwd.delta_proj == nullptr) s.pf.add(fwd.delta, task.b, d1, valid1, L);
          s.pf.add(fwd.u, task.b, d1, valid1, L);
          s.pf.add(out, task.b, d1, valid1, L, true);
        }
        s.pf.start(L);
        T* rows = forward_rows<T, S, NS>(bwd, sh, s.bwd, nullptr, s.pf);
        s.z.resize(L * W);
        gather(z, task.b, s.bwd.d0, s.bwd.valid, W, L, s.z.data());
        const Vec half(T(0.5));
        for (int64_t t = 0; t < L; ++t) {
          const Vec zv = Vec::loadu(s.z.data() + t * W);
          const Vec sum = Vec::loadu(rows_f + t * W) + Vec::loadu(rows + t * W);
          (sum * half * zv * sigmoid(zv)).store(rows + t * W);
        }
        scatter(rows, out, task.b, s.bwd.d0, s.bwd.valid, W, L);
      }
  });
}

template <typename T, int NS>
void run_backward(const Inputs<T>& in, const Shape& sh, const Rows<T>& dout, const T* dlast, Grads<T> gr,
                  int64_t splits) {
  const int64_t sBC = sh.batch * sh.groups * sh.dstate * sh.length, sA = sh.dim * sh.dstate;
  const int64_t cells = sh.length * sh.dstate * sh.width;
  auto make_scratch = [&] {
    BackwardScratch<T> s;
    s.decays.resize(cells), s.states.resize(cells), s.rows.resize(4 * sh.length * sh.width);
    return s;
  };
  for_each_task(sh.batch * sh.groups * splits, make_scratch, [&](int64_t index, BackwardScratch<T>& s) {
    const Task task = task_of(sh, splits, index);
    if (task.j0 >= task.j1) return;
    // this task's partial sums: dB, dC of its (batch, group) in its split's slot, dA, dD, dbias of its batch
    // element (its channels only, so no other task writes them)
    Grads<T> mine = gr;
    const int64_t split = index % splits;
    mine.dB += split * sBC, mine.dC += split * sBC, mine.dA += task.b * sA;
    if (mine.dD != nullptr) mine.dD += task.b * sh.dim;
    if (mine.dbias != nullptr) mine.dbias += task.b * sh.dim;
    Prefetcher<T> pf;
    s.acc_B.assign(cells, T(0));
    s.acc_C.assign(cells, T(0));
    for (int64_t j = task.j0; j < task.j1; ++j) {
      s.blk.load(in, sh, task.b, task.g, j);
      pf.reset();
      if (j + 1 < task.j1) {
        const int64_t d1 = task.g * sh.per_group + (j + 1) * sh.width;
        const int valid = static_cast<int>(std::min<int64_t>(sh.width, sh.per_group - (j + 1) * sh.width));
        for (const Rows<T>* r : {&in.delta, &in.u, &in.z, &dout}) pf.add(*r, task.b, d1, valid, sh.length);
        for (const Rows<T>* r : {&mine.du, &mine.ddelta, &mine.dz}) pf.add(*r, task.b, d1, valid, sh.length, true);
      }
      pf.start(sh.length);
      backward_block<T, NS>(in, sh, s, dout, dlast, mine, pf);
    }
    reduce_lanes(sh, task, s, mine, in.reverse);
  });
}

}  // namespace

// u, delta, z: (batch, dim, L), any strides; A: (dim, N); B, C: (batch, G, N, L), any strides; D, delta_bias:
// (dim,) or empty; delta_proj: empty, or (dim, R) with delta the (batch, R, L) factor of delta_proj @ delta (any
// strides). u, delta, B, C, z in one dtype (bfloat16, half, float or double), the others in its compute dtype.
// -> (out (batch, dim, L) laid out as u, in u's dtype; last_state (batch, dim, N) contiguous, compute dtype).
std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const at::Tensor& D, const at::Tensor& z,
                                 const at::Tensor& delta_bias, bool softplus, bool reverse,
                                 const at::Tensor& delta_proj) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_proj);
  at::Tensor out = at::empty_like(u, at::MemoryFormat::Preserve);   // laid out as u (when u is dense)
  at::Tensor last = at::empty({u.size(0), u.size(1), A.size(1)}, A.options());   // in the compute dtype
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "selective_scan_cpu_fwd", [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const Shape sh = shape_of(u, A, B, Vectorized<T>::size());
    const Inputs<T, S> in = inputs_of<T, S>(u, delta, A, B, C, D, z, delta_bias, softplus, reverse, delta_proj);
    WITH_STATE_SIZE(sh.dstate, (run_forward<T, S, NS>(in, sh, Rows<S>(out), last.data_ptr<T>())));
  });
  return {out, last};
}

// Both directions of Vim's mixer (see run_bidirectional): (u, delta, A, B, C, D, delta_bias, delta_proj) of the
// left-to-right scan, then the same of the right-to-left one, each as scan_fwd takes them (without z); z: the
// shared gate. The two directions' tensors share shapes and dtypes. -> out (batch, dim, L) laid out as u, in u's
// dtype: 0.5 (scan(forward) + scan_reversed(backward)) silu(z). Inference only: no autograd formula.
at::Tensor bimamba_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& C, const at::Tensor& D, const at::Tensor& delta_bias,
                            const at::Tensor& delta_proj, const at::Tensor& u_b, const at::Tensor& delta_b,
                            const at::Tensor& A_b, const at::Tensor& B_b, const at::Tensor& C_b,
                            const at::Tensor& D_b, const at::Tensor& delta_bias_b, const at::Tensor& delta_proj_b,
                            const at::Tensor& z, bool softplus) {
  TORCH_CHECK(z.numel() > 0, "bimamba_scan_fwd: z (the gate) is required");
  check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_proj);
  check_inputs(u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_bias_b, delta_proj_b);
  const std::vector<std::pair<const at::Tensor*, const at::Tensor*>> pairs = {
      {&u, &u_b}, {&delta, &delta_b}, {&A, &A_b}, {&B, &B_b}, {&C, &C_b}, {&D, &D_b}, {&delta_bias, &delta_bias_b},
      {&delta_proj, &delta_proj_b}};
  for (const auto& [a, b] : pairs) {
    TORCH_CHECK(a->sizes() == b->sizes() && a->scalar_type() == b->scalar_type(),
                "bimamba_scan_fwd: the two directions' tensors must match in shape and dtype, got ", a->sizes(),
                " ", a->scalar_type(), " and ", b->sizes(), " ", b->scalar_type());
  }
  at::Tensor out = at::empty_like(u, at::MemoryFormat::Preserve);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "bimamba_scan_cpu_fwd", [&] {
    using S = scalar_t;
    using T = compute_t<S>;
    const Shape sh = shape_of(u, A, B, Vectorized<T>::size());
    const at::Tensor none;
    const Inputs<T, S> fwd = inputs_of<T, S>(u, delta, A, B, C, D, none, delta_bias, softplus, false, delta_proj);
    const Inputs<T, S> bwd = inputs_of<T, S>(u_b, delta_b, A_b, B_b, C_b, D_b, none, delta_bias_b, softplus, true,
                                             delta_proj_b);
    WITH_STATE_SIZE(sh.dstate, (run_bidirectional<T, S, NS>(fwd, bwd, Rows<S>(z), sh, Rows<S>(out))));
  });
  return out;
}

// dout: (batch, dim, L); dlast: (batch, dim, N) contiguous or empty (the gradient of the last state).
// -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), contiguous; dD, dz, ddelta_bias empty when D, z, delta_bias are.
std::vector<at::Tensor> scan_bwd(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta,
                                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                                 const at::Tensor& z, const at::Tensor& delta_bias, const at::Tensor& dlast,
                                 bool softplus, bool reverse) {
  check_inputs(u, delta, A, B, C, D, z, delta_bias);
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "scan_bwd computes float32 and float64 inputs (cast bfloat16 / float16 ones to float32 first)");
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(), "dout must match u");
  TORCH_CHECK(dlast.numel() == 0 || (dlast.is_contiguous() && dlast.numel() == u.size(0) * u.size(1) * A.size(1) &&
                                     dlast.scalar_type() == u.scalar_type()),
              "dlast must be empty or a contiguous (batch, dim, N) tensor");
  auto opts = u.options();
  const int64_t batch = u.size(0), dim = u.size(1), L = u.size(2), N = A.size(1), G = B.size(1);
  at::Tensor du = at::empty(u.sizes(), opts), ddelta = at::empty(u.sizes(), opts);
  at::Tensor dz = z.numel() > 0 ? at::empty(u.sizes(), opts) : at::empty({0}, opts);
  at::Tensor dA = at::empty({dim, N}, opts), dB = at::empty({batch, G, N, L}, opts), dC = at::empty_like(dB);
  at::Tensor dD = at::empty({D.numel() > 0 ? dim : 0}, opts), dbias = at::empty({delta_bias.numel() > 0 ? dim : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_bwd", [&] {
    using T = scalar_t;
    const Shape sh = shape_of(u, A, B, Vectorized<T>::size());
    const int64_t splits = splits_of(sh, kBackwardTasks);
    // partial sums, one slot per writer (see run_backward), reduced in order: the same result on any thread count
    at::Tensor pB = at::zeros({splits, batch, G, N, L}, opts), pC = at::zeros({splits, batch, G, N, L}, opts);
    at::Tensor pA = at::zeros({batch, dim, N}, opts);
    at::Tensor pD = at::zeros({batch, dD.numel()}, opts), pbias = at::zeros({batch, dbias.numel()}, opts);
    const Inputs<T> in = inputs_of<T>(u, delta, A, B, C, D, z, delta_bias, softplus, reverse);
    Grads<T> gr{Rows<T>(du), Rows<T>(ddelta), Rows<T>(dz), pB.data_ptr<T>(), pC.data_ptr<T>(), pA.data_ptr<T>(),
                D.numel() > 0 ? pD.data_ptr<T>() : nullptr, delta_bias.numel() > 0 ? pbias.data_ptr<T>() : nullptr};
    const T* dl = dlast.numel() > 0 ? dlast.data_ptr<T>() : nullptr;
    WITH_STATE_SIZE(sh.dstate, (run_backward<T, NS>(in, sh, Rows<T>(dout), dl, gr, splits)));
    sum_leading(pB.data_ptr<T>(), splits, dB.numel(), dB.data_ptr<T>());
    sum_leading(pC.data_ptr<T>(), splits, dC.numel(), dC.data_ptr<T>());
    sum_leading(pA.data_ptr<T>(), batch, dA.numel(), dA.data_ptr<T>());
    if (dD.numel() > 0) sum_leading(pD.data_ptr<T>(), batch, dD.numel(), dD.data_ptr<T>());
    if (dbias.numel() > 0) sum_leading(pbias.data_ptr<T>(), batch, dbias.numel(), dbias.data_ptr<T>());
  });
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

// The schemas, and the CPU kernels under the CPU dispatch key (not catch-all: dartmamba/ops/_jit.py registers their
// fake implementations, autograd and FLOP formulas from Python once the library loads).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor z, Tensor delta_bias, "
        "bool softplus, bool reverse, Tensor delta_proj) -> Tensor[]");
  m.def("bimamba_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor delta_bias, "
        "Tensor delta_proj, Tensor u_b, Tensor delta_b, Tensor A_b, Tensor B_b, Tensor C_b, Tensor D_b, "
        "Tensor delta_bias_b, Tensor delta_proj_b, Tensor z, bool softplus) -> Tensor");
  m.def("scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor z, "
        "Tensor delta_bias, Tensor dlast, bool softplus, bool reverse) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("scan_fwd", &scan_fwd);
  m.impl("bimamba_scan_fwd", &bimamba_scan_fwd);
  m.impl("scan_bwd", &scan_bwd);
}
