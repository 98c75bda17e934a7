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
}
