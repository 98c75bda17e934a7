// CUDA kernels of lsr::causal_attention_fwd / _bwd (schemas: ops/causal_attention.cpp;
// exact semantics: lsr/ops/reference.py::causal_attention).
//
// Strictly causal attention: query t attends to keys s < t, scores scaled by 1/sqrt(d);
// row 0 sees no key and outputs zeros (its lse is -inf). FlashAttention-style: the T x T
// score matrix is never written to memory.
//
// Layout shared by the three kernels. A thread block of 256 threads owns 64 rows of one
// (batch, head) matrix: each row belongs to a "quad" of 4 consecutive lanes, and lane c of
// the quad holds the row's dims c, c + 4, c + 8, ... (d / 4 of them) in registers. The
// rows of the other side (keys for the forward and dQ, queries for dK/dV) are streamed
// through shared memory in tiles of 32 rows (16 for float64), converted to the
// accumulation type. A dot product of a row with a tile row is 4 partial sums joined by
// two shuffles inside the quad, so all 4 lanes hold the same, bitwise equal, score.
//
//   forward   one block per (bh, query block): online softmax over key tiles (running
//             max m, sum l, output o), out = o / l, lse = m + log(l).
//   dQ        one block per (bh, query block): dq_t = scale * sum_s dS_ts k_s.
//   dK, dV    one block per (bh, key block), looping over query tiles t > s:
//             dv_s = sum_t P_ts dO_t, dk_s = scale * sum_t dS_ts q_t.
//   with P_ts = exp(S_ts - lse_t), dS_ts = P_ts (dO_t . v_s - D_t), D_t = dO_t . O_t
//   (FlashAttention-2's backward, with dQ in its own kernel instead of atomics: simpler,
//   deterministic, at the price of computing S and dP twice).
//
// Accumulation in float32 (float64 for float64 inputs); outputs in the input dtype, lse
// float32 (B, h, T). The kernels take head dims 16, 32, 64, 128 (a template parameter);
// the host pads any other d <= 128 with zero dims to the next of these (zeros add
// exactly nothing to a dot product; the scale stays 1/sqrt(d)); any T.
//
// lsr::causal_attention_rows (the incremental prior's later passes) is the forward kernel
// on query rows [q0, q0 + Tq) with keys [0, q0 + Tq): each row streams the same key tiles
// from key 0 in the same order as in the full forward, and a tile fully masked for a row
// leaves its m, l and o exactly as they were, so the rows equal the full kernel's bit for
// bit (as the CPU kernels do).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops/common.h"

namespace lsr {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 4;                               // a quad of lanes per row
constexpr int kRowsPerBlock = kThreads / kLanesPerRow;        // 64 rows per block
static_assert(32 % kLanesPerRow == 0, "a quad must not straddle two warps");

// Rows of the other side per shared-memory tile: two tiles of kTile x 128 values fit
// the 48 KB of static shared memory for float32 (32 rows) and float64 (16 rows).
template <typename acc_t>
constexpr int tile_rows() {
  return sizeof(acc_t) == 8 ? 16 : 32;
}

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

// Sum over the 4 lanes of a quad; every lane gets the same bits (addition is
// commutative, so lane pairs add the same two numbers). All 32 lanes must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t quad_sum(acc_t x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

// Copies rows [row0, row0 + kTile) of a row-major (T, D) matrix into dst (kTile x D,
// acc_t); rows at or past T are filled with 0. Called by all threads of the block.
template <int D, int kTile, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_tile(acc_t* dst, const scalar_t* __restrict__ src, int64_t row0,
                                          int64_t T) {
  for (int l = threadIdx.x; l < kTile * D; l += kThreads) {
    const int r = l / D, c = l % D;
    const int64_t row = row0 + r;
    dst[l] = row < T ? static_cast<acc_t>(src[row * D + c]) : acc_t(0);
  }
}

// Loads this lane's dims (lane, lane + 4, ...) of row `row` of a (T, D) matrix; zeros
// when the row is out of range.
template <int D, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_row_slice(acc_t (&dst)[D / kLanesPerRow], const scalar_t* __restrict__ src,
                                               int64_t row, bool row_ok, int lane) {
#pragma unroll
  for (int j = 0; j < D / kLanesPerRow; ++j)
    dst[j] = row_ok ? static_cast<acc_t>(src[row * D + j * kLanesPerRow + lane]) : acc_t(0);
}

// ------------------------------------------------------------------------ forward
// grid (B*h, ceil(Tq / 64)); q, out (B*h, Tq, D) and k, v (B*h, Tk, D) contiguous, lse
// (B*h, Tq) or null. Query row r is position q_start + r (Tk = q_start + Tq); the full
// forward has q_start = 0, Tq = Tk = T.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
causal_attention_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                            float* __restrict__ lse, int64_t Tq, int64_t Tk, int64_t q_start, double scale_f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTile = tile_rows<acc_t>();
  constexpr int kSlice = D / kLanesPerRow;
  __shared__ acc_t k_tile[kTile * D];
  __shared__ acc_t v_tile[kTile * D];

  const acc_t scale = static_cast<acc_t>(scale_f);
  const int64_t q_base = static_cast<int64_t>(blockIdx.x) * Tq * D;   // this (batch, head)
  const int64_t k_base = static_cast<int64_t>(blockIdx.x) * Tk * D;
  q += q_base;
  k += k_base;
  v += k_base;
  out += q_base;
  if (lse != nullptr) lse += static_cast<int64_t>(blockIdx.x) * Tq;
  // query blocks in reverse order: the last ones have the most keys, start them first
  const int64_t r0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * kRowsPerBlock;
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t r = r0 + threadIdx.x / kLanesPerRow;              // this quad's query row
  const bool row_ok = r < Tq;
  const int64_t t = q_start + r;                                  // its position: keys s < t

  acc_t qs[kSlice], o[kSlice];
  load_row_slice<D>(qs, q, r, row_ok, lane);
#pragma unroll
  for (int j = 0; j < kSlice; ++j) o[j] = acc_t(0);
  const acc_t neg_inf = static_cast<acc_t>(-INFINITY);
  acc_t m = neg_inf;                                              // running max of the scores
  acc_t l = acc_t(0);                                             // running sum of exp(score - m)

  // the block's last row sees keys s < last_row: only tiles starting below it matter
  const int64_t last_row = q_start + (r0 + kRowsPerBlock < Tq ? r0 + kRowsPerBlock : Tq) - 1;
  for (int64_t k0 = 0; k0 < last_row; k0 += kTile) {
    load_tile<D, kTile>(k_tile, k, k0, Tk);
    load_tile<D, kTile>(v_tile, v, k0, Tk);
    __syncthreads();

    acc_t s[kTile];                                               // scores, -inf where masked
    acc_t tile_max = neg_inf;
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      acc_t part = acc_t(0);
#pragma unroll
      for (int j = 0; j < kSlice; ++j) part += qs[j] * k_tile[i * D + j * kLanesPerRow + lane];
      const acc_t score = quad_sum(part) * scale;
      s[i] = (row_ok && k0 + i < t) ? score : neg_inf;
      tile_max = s[i] > tile_max ? s[i] : tile_max;
    }
    const acc_t m_new = tile_max > m ? tile_max : m;
    if (m_new != neg_inf) {                                       // else: no key visible yet
      const acc_t alpha = acc_exp(m - m_new);                     // 0 while m is -inf
      l *= alpha;
#pragma unroll
      for (int j = 0; j < kSlice; ++j) o[j] *= alpha;
#pragma unroll
      for (int i = 0; i < kTile; ++i) {
        const acc_t p = s[i] == neg_inf ? acc_t(0) : acc_exp(s[i] - m_new);
        l += p;
#pragma unroll
        for (int j = 0; j < kSlice; ++j) o[j] += p * v_tile[i * D + j * kLanesPerRow + lane];
      }
      m = m_new;
    }
    __syncthreads();                                              // before the next tile is loaded
  }

  if (row_ok) {
#pragma unroll
    for (int j = 0; j < kSlice; ++j)
      out[r * D + j * kLanesPerRow + lane] = static_cast<scalar_t>(l > acc_t(0) ? o[j] / l : acc_t(0));
    if (lane == 0 && lse != nullptr) lse[r] = l > acc_t(0) ? static_cast<float>(m + acc_log(l)) : -INFINITY;
  }
}

// ------------------------------------------------------------------------ backward, dQ
// grid (B*h, ceil(T / 64)); delta (B*h, T) = rowsum(dO * O) in acc_t.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
causal_attention_bwd_dq_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                               const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                               const float* __restrict__ lse, const at::opmath_type<scalar_t>* __restrict__ delta,
                               scalar_t* __restrict__ grad_q, int64_t T, double scale_f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTile = tile_rows<acc_t>();
  constexpr int kSlice = D / kLanesPerRow;
  __shared__ acc_t k_tile[kTile * D];
  __shared__ acc_t v_tile[kTile * D];

  const acc_t scale = static_cast<acc_t>(scale_f);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T * D;
  grad_out += base;
  q += base;
  k += base;
  v += base;
  grad_q += base;
  lse += static_cast<int64_t>(blockIdx.x) * T;
  delta += static_cast<int64_t>(blockIdx.x) * T;
  const int64_t q0 = static_cast<int64_t>(gridDim.y - 1 - blockIdx.y) * kRowsPerBlock;
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t t = q0 + threadIdx.x / kLanesPerRow;
  const bool row_ok = t < T;

  acc_t qs[kSlice], dos[kSlice], dq[kSlice];
  load_row_slice<D>(qs, q, t, row_ok, lane);
  load_row_slice<D>(dos, grad_out, t, row_ok, lane);
#pragma unroll
  for (int j = 0; j < kSlice; ++j) dq[j] = acc_t(0);
  const acc_t lse_t = row_ok ? static_cast<acc_t>(lse[t]) : acc_t(0);
  const acc_t delta_t = row_ok ? delta[t] : acc_t(0);

  const int64_t last_row = (q0 + kRowsPerBlock < T ? q0 + kRowsPerBlock : T) - 1;
  for (int64_t k0 = 0; k0 < last_row; k0 += kTile) {
    load_tile<D, kTile>(k_tile, k, k0, T);
    load_tile<D, kTile>(v_tile, v, k0, T);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      acc_t qk = acc_t(0), dov = acc_t(0);
#pragma unroll
      for (int j = 0; j < kSlice; ++j) {
        qk += qs[j] * k_tile[i * D + j * kLanesPerRow + lane];
        dov += dos[j] * v_tile[i * D + j * kLanesPerRow + lane];
      }
      const acc_t score = quad_sum(qk) * scale;                   // S_ts, as in the forward
      const acc_t dp = quad_sum(dov);                             // dP_ts = dO_t . v_s
      if (row_ok && k0 + i < t) {
        const acc_t p = acc_exp(score - lse_t);
        const acc_t ds = p * (dp - delta_t);
#pragma unroll
        for (int j = 0; j < kSlice; ++j) dq[j] += ds * k_tile[i * D + j * kLanesPerRow + lane];
      }
    }
    __syncthreads();
  }

  if (row_ok) {
#pragma unroll
    for (int j = 0; j < kSlice; ++j) grad_q[t * D + j * kLanesPerRow + lane] = static_cast<scalar_t>(dq[j] * scale);
  }
}

// ------------------------------------------------------------------------ backward, dK and dV
// grid (B*h, ceil(T / 64)); each block owns 64 key rows and loops over the queries after them.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
causal_attention_bwd_dkv_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                const float* __restrict__ lse, const at::opmath_type<scalar_t>* __restrict__ delta,
                                scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v, int64_t T,
                                double scale_f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTile = tile_rows<acc_t>();
  constexpr int kSlice = D / kLanesPerRow;
  __shared__ acc_t q_tile[kTile * D];
  __shared__ acc_t do_tile[kTile * D];
  __shared__ acc_t lse_tile[kTile];
  __shared__ acc_t delta_tile[kTile];

  const acc_t scale = static_cast<acc_t>(scale_f);
  const int64_t base = static_cast<int64_t>(blockIdx.x) * T * D;
  grad_out += base;
  q += base;
  k += base;
  v += base;
  grad_k += base;
  grad_v += base;
  lse += static_cast<int64_t>(blockIdx.x) * T;
  delta += static_cast<int64_t>(blockIdx.x) * T;
  // key blocks in order: the first ones have the most queries, start them first
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock;
  const int lane = threadIdx.x % kLanesPerRow;
  const int64_t s = s0 + threadIdx.x / kLanesPerRow;              // this quad's key row
  const bool row_ok = s < T;

  acc_t ks[kSlice], vs[kSlice], dk[kSlice], dv[kSlice];
  load_row_slice<D>(ks, k, s, row_ok, lane);
  load_row_slice<D>(vs, v, s, row_ok, lane);
#pragma unroll
  for (int j = 0; j < kSlice; ++j) {
    dk[j] = acc_t(0);
    dv[j] = acc_t(0);
  }

  // the block's first key s0 is seen by queries t > s0 only
  for (int64_t t0 = s0 + 1; t0 < T; t0 += kTile) {
    load_tile<D, kTile>(q_tile, q, t0, T);
    load_tile<D, kTile>(do_tile, grad_out, t0, T);
    if (threadIdx.x < kTile) {
      const int64_t row = t0 + threadIdx.x;
      lse_tile[threadIdx.x] = row < T ? static_cast<acc_t>(lse[row]) : acc_t(0);
      delta_tile[threadIdx.x] = row < T ? delta[row] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kTile; ++i) {
      const int64_t t = t0 + i;
      acc_t qk = acc_t(0), dov = acc_t(0);
#pragma unroll
      for (int j = 0; j < kSlice; ++j) {
        qk += q_tile[i * D + j * kLanesPerRow + lane] * ks[j];
        dov += do_tile[i * D + j * kLanesPerRow + lane] * vs[j];
      }
      const acc_t score = quad_sum(qk) * scale;                   // S_ts
      const acc_t dp = quad_sum(dov);                             // dP_ts
      if (row_ok && s < t && t < T) {
        const acc_t p = acc_exp(score - lse_tile[i]);
        const acc_t ds = p * (dp - delta_tile[i]);
#pragma unroll
        for (int j = 0; j < kSlice; ++j) {
          dv[j] += p * do_tile[i * D + j * kLanesPerRow + lane];
          dk[j] += ds * q_tile[i * D + j * kLanesPerRow + lane];
        }
      }
    }
    __syncthreads();
  }

  if (row_ok) {
#pragma unroll
    for (int j = 0; j < kSlice; ++j) {
      grad_k[s * D + j * kLanesPerRow + lane] = static_cast<scalar_t>(dk[j] * scale);
      grad_v[s * D + j * kLanesPerRow + lane] = static_cast<scalar_t>(dv[j]);
    }
  }
}

// ------------------------------------------------------------------------ host side

// The kernels' head dim for a tensor's d: the next of 16, 32, 64, 128 (inputs with
// another d are padded with zero dims to it, see pad_head).
int64_t head_capacity(const at::Tensor& q) {
  const int64_t d = q.size(3);
  const int64_t cap = d <= 16 ? 16 : d <= 32 ? 32 : d <= 64 ? 64 : d <= 128 ? 128 : -1;
  TORCH_CHECK(cap > 0, "lsr::causal_attention (CUDA) supports head dims d <= 128; got q ", shape_str(q),
              " (use the reference path, lsr.ops.backend('fast'), for larger d)");
  return cap;
}

// x (B, h, T, d) -> contiguous (B, h, T, cap), the extra dims zero.
at::Tensor pad_head(const at::Tensor& x, int64_t cap) {
  return x.size(3) == cap ? x.contiguous() : at::constant_pad_nd(x, {0, cap - x.size(3)}).contiguous();
}

// Calls f(std::integral_constant<int, D>) for a head capacity (see head_capacity).
template <typename F>
void dispatch_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "lsr::causal_attention (CUDA): unsupported head dim ", d);
  }
}

// grid (B*h, ceil(T / 64)) for T query rows, checked against CUDA's limits.
dim3 attention_grid(const at::Tensor& q) {
  const int64_t bh = q.size(0) * q.size(1);
  const int64_t blocks = (q.size(2) + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(bh <= INT_MAX && blocks <= 65535,
              "lsr::causal_attention (CUDA): B*h must be below 2^31 and T at most 64 * 65535; got q ",
              shape_str(q));
  return dim3(static_cast<unsigned>(bh), static_cast<unsigned>(blocks));
}

// The outputs have the layout of torch.empty_like(input), as the fake kernels in
// lsr/ops/_native.py promise: the kernels write into it directly when it is contiguous and
// needs no head padding, else into a contiguous (B, h, T, cap) buffer whose first d dims are
// copied over afterwards (a permuted input, or a padded head dim).
struct OutputLike {
  at::Tensor result, buffer;
  OutputLike(const at::Tensor& like, int64_t cap) : result(at::empty_like(like)) {
    if (cap == like.size(3) && result.is_contiguous()) {
      buffer = result;
    } else {
      std::vector<int64_t> sizes = like.sizes().vec();
      sizes[3] = cap;
      buffer = at::empty(sizes, like.options());
    }
  }
  at::Tensor finish() {
    if (!buffer.is_same(result)) result.copy_(buffer.narrow(3, 0, result.size(3)));
    return result;
  }
};

// Launches the forward kernel on q (B, h, Tq, cap) and k, v (B, h, q_start + Tq, cap), padded
// and contiguous, scale 1/sqrt(d) of the unpadded d; lse may be undefined (not written).
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, int64_t q_start, int64_t d) {
  const dim3 grid = attention_grid(q);
  const int64_t Tq = q.size(2), Tk = k.size(2), cap = q.size(3);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* lse_ptr = lse.defined() ? lse.mutable_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lsr::causal_attention_fwd (CUDA)", [&] {
    dispatch_head_dim(cap, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      causal_attention_fwd_kernel<D, scalar_t><<<grid, kThreads, 0, stream>>>(
          q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), lse_ptr, Tq, Tk, q_start, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                             const at::Tensor& v_in) {
  check_attention_inputs(q_in, k_in, v_in);
  TORCH_CHECK(q_in.is_cuda(), "lsr::causal_attention_fwd (CUDA): expects CUDA tensors; got q on ", q_in.device());
  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), d = q_in.size(3);
  at::Tensor lse = at::empty({B, H, T}, q_in.options().dtype(at::kFloat));
  if (q_in.numel() == 0) return {at::empty_like(q_in), lse};
  const int64_t cap = head_capacity(q_in);
  OutputLike out(q_in, cap);
  launch_forward(pad_head(q_in, cap), pad_head(k_in, cap), pad_head(v_in, cap), out.buffer, lse, 0, d);
  return {out.finish(), lse};
}

at::Tensor causal_attention_rows_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                      int64_t q0) {
  check_attention_rows_inputs(q_in, k_in, v_in, q0);
  TORCH_CHECK(q_in.is_cuda(), "lsr::causal_attention_rows (CUDA): expects CUDA tensors; got q on ", q_in.device());
  c10::cuda::CUDAGuard guard(q_in.device());
  if (q_in.numel() == 0) return at::zeros_like(q_in);
  const int64_t cap = head_capacity(q_in);
  OutputLike out(q_in, cap);
  launch_forward(pad_head(q_in, cap), pad_head(k_in, cap), pad_head(v_in, cap), out.buffer, at::Tensor(), q0,
                 q_in.size(3));
  return out.finish();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cuda(const at::Tensor& grad_out_in,
                                                                         const at::Tensor& q_in, const at::Tensor& k_in,
                                                                         const at::Tensor& v_in, const at::Tensor& out_in,
                                                                         const at::Tensor& lse_in) {
  check_attention_inputs(q_in, k_in, v_in);
  TORCH_CHECK(q_in.is_cuda(), "lsr::causal_attention_bwd (CUDA): expects CUDA tensors; got q on ", q_in.device());
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "lsr::causal_attention_bwd: grad_out and out must have the shape of q; got grad_out ",
              shape_str(grad_out_in), ", out ", shape_str(out_in), ", q ", shape_str(q_in));
  TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type(), "lsr::causal_attention_bwd: out must have q's dtype; got out ",
              shape_str(out_in), ", q ", shape_str(q_in));
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.sizes() == q_in.sizes().slice(0, 3) && lse_in.scalar_type() == at::kFloat,
              "lsr::causal_attention_bwd: lse must be float32 (B, h, T); got lse ", shape_str(lse_in), " for q ",
              shape_str(q_in));
  TORCH_CHECK(grad_out_in.device() == q_in.device() && out_in.device() == q_in.device() &&
                  lse_in.device() == q_in.device(),
              "lsr::causal_attention_bwd: all tensors must be on one device");
  c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t T = q_in.size(2), d = q_in.size(3);
  if (q_in.numel() == 0) return {at::empty_like(q_in), at::empty_like(k_in), at::empty_like(v_in)};
  const int64_t cap = head_capacity(q_in);
  OutputLike grad_q(q_in, cap), grad_k(k_in, cap), grad_v(v_in, cap);
  const dim3 grid = attention_grid(q_in);
  const at::Tensor q = pad_head(q_in, cap), k = pad_head(k_in, cap), v = pad_head(v_in, cap);
  const at::Tensor grad_out_q = grad_out_in.to(q.scalar_type());    // dO as the kernels read it
  const at::Tensor grad_out = pad_head(grad_out_q, cap);
  const at::Tensor lse = lse_in.contiguous();
  // D_t = dO_t . O_t in the accumulation type, (B, h, T) (ATen ops on the current stream;
  // over the unpadded dims; dO rounded to q's dtype, as the kernels read it)
  const auto acc_type = at::toOpMathType(q.scalar_type());
  const at::Tensor delta = (grad_out_q.to(acc_type) * out_in.to(acc_type)).sum(-1).contiguous();
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "lsr::causal_attention_bwd (CUDA)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_head_dim(cap, [&](auto head_dim) {
      constexpr int D = decltype(head_dim)::value;
      causal_attention_bwd_dq_kernel<D, scalar_t><<<grid, kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(), delta.const_data_ptr<acc_t>(),
          grad_q.buffer.mutable_data_ptr<scalar_t>(), T, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      causal_attention_bwd_dkv_kernel<D, scalar_t><<<grid, kThreads, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(), lse.const_data_ptr<float>(), delta.const_data_ptr<acc_t>(),
          grad_k.buffer.mutable_data_ptr<scalar_t>(), grad_v.buffer.mutable_data_ptr<scalar_t>(), T, scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_q.finish(), grad_k.finish(), grad_v.finish()};
}

}  // namespace
}  // namespace lsr

TORCH_LIBRARY_IMPL(lsr, CUDA, m) {
  m.impl("causal_attention_fwd", &lsr::causal_attention_fwd_cuda);
  m.impl("causal_attention_bwd", &lsr::causal_attention_bwd_cuda);
  m.impl("causal_attention_rows", &lsr::causal_attention_rows_cuda);
}
