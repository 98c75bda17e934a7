// The exact fast resampling loop of docs/method.md (section 3) in C++, driving an incremental prior
// (lsr/models/incremental.py, scripted) with no Python per step. Used by the Python
// package (`--resampler native`, bound in csrc/lsr_C.cpp) and by the C++ runtime of an
// exported bundle (export/).
#pragma once

#include <ATen/ATen.h>
#include <torch/script.h>

#include <vector>

namespace lsr {

struct ResampleOutput {
  at::Tensor codes;                // (B, H, W) int64, the resampled grid
  at::Tensor resampled;            // (B, H, W) bool, positions whose code was redrawn
  at::Tensor likelihood;           // (B, H, W) float32, p_t of the original codes (first pass)
  at::Tensor prior_passes;         // (B,) int64 (CPU), prior calls (full or partial) that included this image
  at::Tensor positions_evaluated;  // (B,) int64 (CPU), grid positions the passes evaluated
};

// The resampling rule on a likelihood grid p (B, H, W): p_t < tau and at least one of the
// bottom-half neighbours (i, j+1), (i+1, j-1), (i+1, j), (i+1, j+1) below tau too; the
// last position counts alone. Same ops as lsr.ops.resampling.flag_positions.
at::Tensor flag_positions(const at::Tensor& p, double tau);

// p(c_t) per position from logits (B, K, H, W) and codes (B, H, W): float32 (B, H, W).
// Row-wise softmax over K (the same arithmetic for a position in any batch or slice).
at::Tensor code_likelihood(const at::Tensor& logits, const at::Tensor& codes);

// Groups of row requests [r0[i], r1[i]) (one per image) for one step: each group gets one
// partial pass over rows [its smallest r0, its largest r1). Fewer, larger calls amortise
// the per-call overhead; splitting keeps one image's early rows from making every image
// of the batch evaluate them.
std::vector<std::vector<size_t>> split_groups(const std::vector<int64_t>& r0, const std::vector<int64_t>& r1,
                                              int64_t H);

// Resample `codes` (B, H, W) int64 with Gumbel `noise` (B, H*W, K) float32 under
// threshold `tau` and `temperature`. `prior` has methods forward(codes) -> logits,
// new_cache(codes) -> cache and partial(codes up to row r1, rows, r0, cache) -> logits of
// rows r0..r1-1 (see lsr/models/incremental.py, IncrementalPrior).
// Per pass: one small device-to-host copy (the first flagged position of each image).
ResampleOutput resample_incremental(torch::jit::Module& prior, const at::Tensor& codes, const at::Tensor& noise,
                                    double tau, double temperature);

}  // namespace lsr
