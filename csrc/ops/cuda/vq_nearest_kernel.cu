// CUDA kernel of lsr::vq_nearest (schema: ops/vq_nearest.cpp; exact semantics:
// lsr/ops/reference.py::vq_nearest).
//
// One fused kernel, faiss/RAFT style: each thread block takes a tile of 64 rows of z and
// walks the codebook in tiles of 64 codes. Both tiles are staged in shared memory, D in
// chunks of 32, and every thread computes a 4 x 4 block of dot products in the
// accumulation type (float32 for half, bfloat16 and float32 inputs; float64 for float64),
// then updates a running argmin of ||e_k||^2 - 2 z.e_k for its 4 rows. The 16 threads of
// a row then combine their partial results. The N x K distance matrix never exists.
//
// Ties go to the lower index, NaN counts as the smallest distance (torch.argmin): each
// thread visits its codes in ascending order and the combination compares
// (distance, index) pairs, so the result does not depend on the order of the threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>

#include "ops/common.h"

namespace lsr {
namespace {

constexpr int kThreadsX = 16;                                // threads along the codes
constexpr int kThreadsY = 16;                                // threads along the rows
constexpr int kThreads = kThreadsX * kThreadsY;              // 256
constexpr int kRowsPerThread = 4;
constexpr int kCodesPerThread = 4;
constexpr int kTileRows = kThreadsY * kRowsPerThread;        // 64 rows of z per block
constexpr int kTileCodes = kThreadsX * kCodesPerThread;      // 64 codes per codebook tile
constexpr int kTileDim = 32;                                 // D is staged 32 at a time

// The final combination uses shuffles inside a half-warp: with blockDim (16, 16) the
// 16 threads of one threadIdx.y are lanes 0-15 or 16-31 of one warp.
static_assert(kThreadsX == 16 && kThreads % 32 == 0, "row combination assumes 16 lanes per row");

// Is (d, i) before (best_d, best_i) in torch.argmin's order? NaN is the smallest value;
// equal values (and two NaNs) go to the lower index.
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t d, int i, acc_t best_d, int best_i) {
  const bool d_nan = d != d;
  const bool best_nan = best_d != best_d;
  if (d_nan || best_nan) return d_nan && (!best_nan || i < best_i);
  return d < best_d || (d == best_d && i < best_i);
}

// z (N, D), codebook (K, D) contiguous; e2 (K,) = ||e_k||^2 in acc_t; out (N,) int64.
// (kThreads, 2): without the minimum of 2 blocks per multiprocessor ptxas caps sm_80 at 64
// registers and spills; with it, 80 registers (112 for float64) and no spills.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2)
vq_nearest_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ codebook,
                  const acc_t* __restrict__ e2, int64_t* __restrict__ out, int64_t N, int K, int D) {
  __shared__ acc_t z_tile[kTileRows][kTileDim + 1];          // +1: no bank conflicts on columns
  __shared__ acc_t e_tile[kTileCodes][kTileDim + 1];

  const int tx = threadIdx.x;                                // codes tx + 16 j, j < 4
  const int ty = threadIdx.y;                                // rows  ty + 16 i, i < 4
  const int tid = ty * kThreadsX + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;

  acc_t best[kRowsPerThread];
  int best_i[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    best[i] = static_cast<acc_t>(INFINITY);
    best_i[i] = K;                                           // placeholder: every real code beats it
  }

  for (int k0 = 0; k0 < K; k0 += kTileCodes) {
    acc_t dot[kRowsPerThread][kCodesPerThread];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kCodesPerThread; ++j) dot[i][j] = acc_t(0);

    for (int d0 = 0; d0 < D; d0 += kTileDim) {
      // stage z[row0 : row0+64, d0 : d0+32] and codebook[k0 : k0+64, d0 : d0+32];
      // entries outside z or the codebook are 0 and add nothing to the dot products
      for (int l = tid; l < kTileRows * kTileDim; l += kThreads) {
        const int r = l / kTileDim, c = l % kTileDim;
        const int64_t n = row0 + r;
        const int dim = d0 + c;
        z_tile[r][c] = (n < N && dim < D) ? static_cast<acc_t>(z[n * D + dim]) : acc_t(0);
      }
      for (int l = tid; l < kTileCodes * kTileDim; l += kThreads) {
        const int r = l / kTileDim, c = l % kTileDim;
        const int code = k0 + r;
        const int dim = d0 + c;
        e_tile[r][c] = (code < K && dim < D)
                           ? static_cast<acc_t>(codebook[static_cast<int64_t>(code) * D + dim])
                           : acc_t(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < kTileDim; ++c) {
        acc_t a[kRowsPerThread], b[kCodesPerThread];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) a[i] = z_tile[ty + i * kThreadsY][c];
#pragma unroll
        for (int j = 0; j < kCodesPerThread; ++j) b[j] = e_tile[tx + j * kThreadsX][c];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i)
#pragma unroll
          for (int j = 0; j < kCodesPerThread; ++j) dot[i][j] += a[i] * b[j];
      }
      __syncthreads();                                       // before the next chunk overwrites the tiles
    }

    // this thread's codes of the tile, in ascending order
#pragma unroll
    for (int j = 0; j < kCodesPerThread; ++j) {
      const int code = k0 + tx + j * kThreadsX;
      if (code < K) {
        const acc_t norm = e2[code];
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          const acc_t dist = norm - acc_t(2) * dot[i][j];
          if (better(dist, code, best[i], best_i[i])) {
            best[i] = dist;
            best_i[i] = code;
          }
        }
      }
    }
  }

  // combine the 16 partial results of each row (lanes tx = 0..15 of a half-warp)
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int offset = kThreadsX / 2; offset > 0; offset /= 2) {
      const acc_t other = __shfl_xor_sync(0xffffffffu, best[i], offset);
      const int other_i = __shfl_xor_sync(0xffffffffu, best_i[i], offset);
      if (better(other, other_i, best[i], best_i[i])) {
        best[i] = other;
        best_i[i] = other_i;
      }
    }
    const int64_t n = row0 + ty + i * kThreadsY;
    if (tx == 0 && n < N) out[n] = best_i[i];
  }
}

at::Tensor vq_nearest_cuda(const at::Tensor& z_in, const at::Tensor& codebook_in) {
  check_vq_inputs(z_in, codebook_in);
  TORCH_CHECK(z_in.is_cuda(), "lsr::vq_nearest (CUDA): expects CUDA tensors; got z on ", z_in.device());
  // int code and dim indices, with room for the last tile's overshoot
  TORCH_CHECK(codebook_in.size(0) < (int64_t{1} << 30) && z_in.size(1) < (int64_t{1} << 30),
              "lsr::vq_nearest (CUDA): K and D must be below 2^30; got codebook ", shape_str(codebook_in));
  const int64_t N = z_in.size(0);
  const int64_t blocks = (N + kTileRows - 1) / kTileRows;
  TORCH_CHECK(blocks <= INT_MAX, "lsr::vq_nearest (CUDA): too many rows, got z ", shape_str(z_in));

  c10::cuda::CUDAGuard guard(z_in.device());
  at::Tensor out = at::empty({N}, z_in.options().dtype(at::kLong));
  if (N == 0) return out;
  const at::Tensor z = z_in.contiguous();
  const at::Tensor codebook = codebook_in.contiguous();
  const int K = static_cast<int>(codebook.size(0));
  const int D = static_cast<int>(z.size(1));
  // ||e_k||^2 in the accumulation type, once (an ATen op on the current stream)
  const at::Tensor e = codebook.to(at::toOpMathType(codebook.scalar_type()));
  const at::Tensor e2 = (e * e).sum(1).contiguous();        // (K,)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lsr::vq_nearest (CUDA)", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    vq_nearest_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), dim3(kThreadsX, kThreadsY), 0, stream>>>(
        z.const_data_ptr<scalar_t>(), codebook.const_data_ptr<scalar_t>(), e2.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<int64_t>(), N, K, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace lsr

TORCH_LIBRARY_IMPL(lsr, CUDA, m) {
  m.impl("vq_nearest", &lsr::vq_nearest_cuda);
}
