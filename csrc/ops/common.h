// Shared input checks for lsr's native ops (one place, not copied into every kernel).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace lsr {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes() << " " << t.scalar_type();
  return s.str();
}

// z (N, D) and codebook (K, D), floating, same dtype and device, K >= 1.
inline void check_vq_inputs(const at::Tensor& z, const at::Tensor& codebook) {
  TORCH_CHECK(z.dim() == 2 && codebook.dim() == 2,
              "lsr::vq_nearest expects z (N, D) and codebook (K, D); got z ", shape_str(z),
              " and codebook ", shape_str(codebook));
  TORCH_CHECK(z.size(1) == codebook.size(1), "lsr::vq_nearest: z has D=", z.size(1),
              " but codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) >= 1, "lsr::vq_nearest: codebook must have K >= 1 vectors, got ",
              shape_str(codebook));
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(),
              "lsr::vq_nearest: z and codebook must have the same dtype; got ", shape_str(z), " and ",
              shape_str(codebook));
  TORCH_CHECK(at::isFloatingType(z.scalar_type()),
              "lsr::vq_nearest: expects floating inputs (float32, float16, bfloat16, float64); got ",
              shape_str(z));
  TORCH_CHECK(z.device() == codebook.device(), "lsr::vq_nearest: z on ", z.device(),
              " but codebook on ", codebook.device());
}

// q, k, v (B, h, T, d), same shape, dtype and device.
inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "lsr::causal_attention expects q, k, v of shape (B, h, T, d); got q ",
              shape_str(q));
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "lsr::causal_attention: q, k, v must have the same shape; got ", shape_str(q), ", ",
              shape_str(k), ", ", shape_str(v));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "lsr::causal_attention: q, k, v must have the same dtype; got ", shape_str(q), ", ",
              shape_str(k), ", ", shape_str(v));
  TORCH_CHECK(at::isFloatingType(q.scalar_type()),
              "lsr::causal_attention: expects floating inputs; got ", shape_str(q));
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "lsr::causal_attention: q, k, v must be on one device");
}

// lsr::causal_attention_rows: q (B, h, Tq, d) for positions [q0, q0 + Tq), k and v
// (B, h, q0 + Tq, d), same dtype and device.
inline void check_attention_rows_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q0) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4,
              "lsr::causal_attention_rows expects q (B, h, Tq, d) and k, v (B, h, q0 + Tq, d); got q ", shape_str(q),
              ", k ", shape_str(k));
  TORCH_CHECK(q0 >= 0 && k.size(2) == q0 + q.size(2) && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
                  k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "lsr::causal_attention_rows: with q0 = ", q0, " and q ", shape_str(q), ", k and v must be (B, h, ",
              q0 + q.size(2), ", d); got k ", shape_str(k), ", v ", shape_str(v));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "lsr::causal_attention_rows: q, k, v must have the same dtype; got ", shape_str(q), ", ",
              shape_str(k), ", ", shape_str(v));
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "lsr::causal_attention_rows: expects floating inputs; got ",
              shape_str(q));
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "lsr::causal_attention_rows: q, k, v must be on one device");
}

// The backward's extra inputs: grad_out and out shaped and typed like q, lse (B, h, T)
// float32, all on q's device (q, k, v checked by check_attention_inputs).
inline void check_attention_bwd_inputs(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse) {
  check_attention_inputs(q, k, v);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "lsr::causal_attention_bwd: grad_out and out must have q's shape; got grad_out ",
              shape_str(grad_out), ", out ", shape_str(out), ", q ", shape_str(q));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "lsr::causal_attention_bwd: grad_out and out must have q's dtype; got grad_out ",
              shape_str(grad_out), ", out ", shape_str(out), ", q ", shape_str(q));
  TORCH_CHECK(lse.dim() == 3 && lse.sizes() == q.sizes().slice(0, 3) && lse.scalar_type() == at::kFloat,
              "lsr::causal_attention_bwd: lse must be (B, h, T) float32 for q ", shape_str(q), "; got ",
              shape_str(lse));
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
              "lsr::causal_attention_bwd: all inputs must be on one device");
}

}  // namespace lsr
