// Schema of lsr::causal_attention_fwd / _bwd. Kernels: ops/cpu/causal_attention_kernel.cpp,
// ops/cuda/causal_attention_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lsr, m) {
  // Strictly causal attention: query t attends to keys s < t; row 0 outputs zeros.
  // q, k, v (B, h, T, d) -> out (B, h, T, d) in the input dtype, lse (B, h, T) float32:
  // the log-sum-exp of each row's scaled scores (-inf for row 0), kept for the backward.
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v) -> (Tensor, Tensor)");
  // grad_out, q, k, v, out (B, h, T, d), lse (B, h, T) -> (grad_q, grad_k, grad_v)
  m.def("causal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse)"
        " -> (Tensor, Tensor, Tensor)");
  // Inference only: queries at positions [q0, q0 + Tq) of the same attention, q (B, h, Tq, d),
  // k, v (B, h, q0 + Tq, d) -> out (B, h, Tq, d). Used by the incremental prior passes.
  m.def("causal_attention_rows(Tensor q, Tensor k, Tensor v, int q0) -> Tensor");
}

#include <ATen/ATen.h>

#include <limits>

#include "ops/common.h"

namespace lsr {
namespace {

// lsr::causal_attention_rows for every device without its own kernel (CUDA): plain ATen,
// scores of up to 256 queries at a time against all keys, masked from index comparisons.
at::Tensor causal_attention_rows_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           int64_t q0) {
  check_attention_rows_inputs(q, k, v, q0);
  const int64_t Tq = q.size(2), Tk = k.size(2), d = q.size(3);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros(q.sizes(), q.options().dtype(acc));
  if (q.numel() == 0 || d == 0) return out.to(q.scalar_type());
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor kt = k.to(acc).transpose(-1, -2), va = v.to(acc);
  const at::Tensor keys = at::arange(Tk, q.options().dtype(at::kLong)).view({1, -1});
  constexpr int64_t kChunk = 256;
  for (int64_t c0 = 0; c0 < Tq; c0 += kChunk) {
    const int64_t c1 = std::min(Tq, c0 + kChunk);
    const at::Tensor rows = at::arange(q0 + c0, q0 + c1, keys.options()).view({-1, 1});
    const at::Tensor unseen = keys >= rows;                                   // (m, Tk): s >= t
    at::Tensor s = at::matmul(q.narrow(2, c0, c1 - c0).to(acc), kt) * scale;  // (B, h, m, Tk)
    s = s.masked_fill(unseen, -std::numeric_limits<double>::infinity());
    at::Tensor p = at::softmax(s, -1).masked_fill(unseen, 0.0);               // row 0: NaN -> 0
    out.narrow(2, c0, c1 - c0).copy_(at::matmul(p, va));
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lsr, CompositeExplicitAutograd, m) {
  m.impl("causal_attention_rows", &causal_attention_rows_composite);
}

}  // namespace lsr
