// CPU kernels of lsr::causal_attention_fwd / _bwd (schema: ops/causal_attention.cpp;
// semantics: lsr/ops/reference.py).
//
// Strictly causal: query t attends to keys s < t, scale 1/sqrt(d); row 0 outputs zeros and
// its lse is -inf. FlashAttention-style: per query block an online softmax over key
// blocks, in float (float32 / float16 / bfloat16 inputs) or double (float64), key blocks
// above the diagonal skipped; the T x T score matrix is never formed, only per-thread
// tiles of kBlockQ x kBlockK. The forward runs over (head, query block) tasks, the
// backward over heads (each head's dQ, dK, dV belong to one thread: no races; with fewer
// heads B*h than threads the backward leaves threads idle).
//
// Operands are first packed in the accumulation type, d padded with zeros to dp (a
// multiple of 64 bytes) so the vector loops need no tails: rows (BH, T, dp) for q, v, dO
// (and k in the backward), transposed (BH, dp, Tp) for k (and v in the backward), Tp = T
// padded likewise. Float32 contiguous inputs with d a multiple of 16 are used in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <tuple>

#include "ops/common.h"
#include "ops/cpu/simd.h"

namespace lsr::cpu {

constexpr int64_t kBlockQ = 64;   // queries per block
constexpr int64_t kBlockK = 128;  // keys per block (a multiple of every vector width)

template <typename T> struct AttnFwd {
  const T* q;   // (BH, T, dp)
  const T* kt;  // (BH, dp, Tp)
  const T* v;   // (BH, T, dp)
  T* out;       // (BH, T, dp)
  T* lse;       // (BH, T)
  int64_t BH, len, Tp, dp;  // heads, queries T (rows of q), padded key count and d
  T scale;
  int64_t q0 = 0;  // absolute position of query row 0 (> 0 in lsr::causal_attention_rows)
  // query blocks: the absolute blocks [b * kBlockQ, (b + 1) * kBlockQ) that meet [q0, q0 + len)
  int64_t first_qblock() const { return q0 / kBlockQ; }
  int64_t n_qblocks() const { return (q0 + len + kBlockQ - 1) / kBlockQ - first_qblock(); }
};

template <typename T> struct AttnBwd {
  const T *q, *k, *dout;  // (BH, T, dp)
  const T *kt, *vt;       // (BH, dp, Tp)
  const T* delta;         // (BH, T): sum_c dO * O
  const T* lse;           // (BH, T)
  T *dq, *dk, *dv;        // (BH, T, dp), zero-initialised
  int64_t BH, len, Tp, dp;  // heads, sequence length T, padded T and d
  T scale;
};

}  // namespace lsr::cpu

#define LSR_ISA_IMPL "ops/cpu/causal_attention_impl.h"
#include "ops/cpu/per_isa.h"
#undef LSR_ISA_IMPL

namespace lsr {
namespace {

using namespace cpu;

template <typename T> void run_fwd(const AttnFwd<T>& a) {
  using Fn = void (*)(const AttnFwd<T>&, std::atomic<int64_t>*);
  Fn fn = &base::attn_fwd_tasks<T>;
#ifdef LSR_X86_DISPATCH
  if (isa() == Isa::kAvx512) fn = &avx512::attn_fwd_tasks<T>;
  else if (isa() == Isa::kAvx2) fn = &avx2::attn_fwd_tasks<T>;
#endif
  const int64_t ntasks = a.BH * a.n_qblocks();
  std::atomic<int64_t> next{0};
  // one call per thread; each takes tasks from `next` (dynamic: blocks differ in length)
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), ntasks), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fn(a, &next);
  });
}

template <typename T> void run_bwd(const AttnBwd<T>& a) {
  using Fn = void (*)(const AttnBwd<T>&, int64_t, int64_t);
  Fn fn = &base::attn_bwd_heads<T>;
#ifdef LSR_X86_DISPATCH
  if (isa() == Isa::kAvx512) fn = &avx512::attn_bwd_heads<T>;
  else if (isa() == Isa::kAvx2) fn = &avx2::attn_bwd_heads<T>;
#endif
  at::parallel_for(0, a.BH, 1, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// x (B, h, T, d) -> (BH, T, dp) in type `acc`, zero padded; x itself when it already is that.
at::Tensor pack_rows(const at::Tensor& x, at::ScalarType acc, int64_t dp) {
  const int64_t T = x.size(2), d = x.size(3);
  if (x.scalar_type() == acc && d == dp && x.is_contiguous()) return x.view({-1, T, d});
  return at::constant_pad_nd(x.reshape({-1, T, d}).to(acc), {0, dp - d}).contiguous();
}

// x (B, h, T, d) -> x^T (BH, dp, Tp) in type `acc`, zero padded.
at::Tensor pack_cols(const at::Tensor& x, at::ScalarType acc, int64_t dp, int64_t Tp) {
  const int64_t T = x.size(2), d = x.size(3);
  return at::constant_pad_nd(x.reshape({-1, T, d}).to(acc).transpose(1, 2), {0, Tp - T, 0, dp - d}).contiguous();
}

// A (BH, T, dp) result of type `acc` -> (B, h, T, d) of like's dtype, laid out as
// at::empty_like(like) (what the fake kernels in lsr/ops/_native.py promise).
at::Tensor unpack(const at::Tensor& buf, const at::Tensor& like) {
  at::Tensor res = at::empty_like(like);
  const int64_t d = like.size(3);
  if (res.is_contiguous() && buf.size(2) == d && buf.scalar_type() == like.scalar_type())
    return buf.view(like.sizes());
  res.copy_(buf.view({like.size(0), like.size(1), like.size(2), buf.size(2)}).narrow(3, 0, d));
  return res;
}

// Runs the forward kernel: out (BH, Tq, dp) and lse (B, h, Tq), both of the accumulation
// type, for queries at absolute positions [q0, q0 + Tq) against keys [0, q0 + Tq).
void fwd_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dp, int64_t Tp, at::Tensor& out,
              at::Tensor& lse, int64_t q0 = 0) {
  const auto acc = out.scalar_type();
  const int64_t BH = q.size(0) * q.size(1), T = q.size(2), d = q.size(3);
  const at::Tensor qp = pack_rows(q, acc, dp), kt = pack_cols(k, acc, dp, Tp), vp = pack_rows(v, acc, dp);
  AT_DISPATCH_FLOATING_TYPES(acc, "causal_attention_fwd_cpu", [&] {
    AttnFwd<scalar_t> a{qp.const_data_ptr<scalar_t>(), kt.const_data_ptr<scalar_t>(), vp.const_data_ptr<scalar_t>(),
                        out.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), BH, T, Tp, dp,
                        static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(d))), q0};
    run_fwd(a);
  });
}

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v) {
  check_attention_inputs(q, k, v);
  const int64_t B = q.size(0), h = q.size(1), T = q.size(2), d = q.size(3);
  at::Tensor lse = at::empty({B, h, T}, q.options().dtype(at::kFloat));
  if (B * h * T == 0) return {at::empty_like(q), lse};
  if (d == 0) {  // empty heads: every score is 0, so lse = log(number of keys) = log(t)
    lse.copy_(at::arange(T, lse.options()).log().expand({B, h, T}));
    return {at::empty_like(q), lse};
  }
  const auto acc = acc_type(q);
  const int64_t pad = acc == at::kDouble ? kPad<double> : kPad<float>;
  const int64_t dp = round_up(d, pad), Tp = round_up(T, pad);
  at::Tensor out = at::empty({B * h, T, dp}, q.options().dtype(acc));
  // float64: lse computed in double, stored as the float32 the schema asks for
  at::Tensor lse_acc = acc == at::kFloat ? lse : at::empty({B, h, T}, q.options().dtype(acc));
  fwd_into(q, k, v, dp, Tp, out, lse_acc);
  if (!lse_acc.is_same(lse)) lse.copy_(lse_acc);
  return {unpack(out, q), lse};
}

// Queries [q0, q0 + Tq) of a strictly causal attention over keys [0, q0 + Tq): q (B, h, Tq, d),
// k, v (B, h, q0 + Tq, d) -> out (B, h, Tq, d); row i is bit for bit row q0 + i of
// causal_attention_fwd on the full sequence (the incremental prior passes rely on it).
at::Tensor causal_attention_rows_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q0) {
  check_attention_rows_inputs(q, k, v, q0);
  const int64_t B = q.size(0), h = q.size(1), T = q.size(2), d = q.size(3), Tk = k.size(2);
  if (B * h * T == 0 || d == 0) return at::zeros_like(q);
  const auto acc = acc_type(q);
  const int64_t pad = acc == at::kDouble ? kPad<double> : kPad<float>;
  const int64_t dp = round_up(d, pad), Tp = round_up(Tk, pad);
  at::Tensor out = at::empty({B * h, T, dp}, q.options().dtype(acc));
  at::Tensor lse = at::empty({B, h, T}, q.options().dtype(acc));
  fwd_into(q, k, v, dp, Tp, out, lse, q0);
  return unpack(out, q);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd_cpu(const at::Tensor& grad_out,
                                                                        const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, const at::Tensor& out,
                                                                        const at::Tensor& lse) {
  check_attention_bwd_inputs(grad_out, q, k, v, out, lse);
  const int64_t B = q.size(0), h = q.size(1), T = q.size(2), d = q.size(3);
  if (B * h * T * d == 0)
    return {at::zeros_like(q), at::zeros_like(k), at::zeros_like(v)};
  const auto acc = acc_type(q);
  const int64_t pad = acc == at::kDouble ? kPad<double> : kPad<float>;
  const int64_t dp = round_up(d, pad), Tp = round_up(T, pad);
  const at::Tensor qp = pack_rows(q, acc, dp), kp = pack_rows(k, acc, dp), dop = pack_rows(grad_out, acc, dp);
  const at::Tensor kt = pack_cols(k, acc, dp, Tp), vt = pack_cols(v, acc, dp, Tp);
  // D_t = sum_c dO_tc O_tc (in the accumulation type)
  const at::Tensor delta = (grad_out.to(acc) * out.to(acc)).sum(-1).reshape({B * h, T}).contiguous();
  // float64: the float32 lse of the forward would limit the gradients to ~1e-7 relative
  // error, so it is recomputed in double (one more forward; float64 is the test dtype)
  at::Tensor lse_c = lse.contiguous();
  if (acc == at::kDouble) {
    at::Tensor scratch = at::empty({B * h, T, dp}, q.options().dtype(acc));
    lse_c = at::empty({B, h, T}, q.options().dtype(acc));
    fwd_into(q, k, v, dp, Tp, scratch, lse_c);
  }
  at::Tensor dq = at::zeros({B * h, T, dp}, q.options().dtype(acc));
  at::Tensor dk = at::zeros_like(dq), dv = at::zeros_like(dq);
  AT_DISPATCH_FLOATING_TYPES(acc, "causal_attention_bwd_cpu", [&] {
    AttnBwd<scalar_t> a{qp.const_data_ptr<scalar_t>(), kp.const_data_ptr<scalar_t>(), dop.const_data_ptr<scalar_t>(),
                        kt.const_data_ptr<scalar_t>(), vt.const_data_ptr<scalar_t>(), delta.const_data_ptr<scalar_t>(),
                        lse_c.const_data_ptr<scalar_t>(), dq.mutable_data_ptr<scalar_t>(),
                        dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), B * h, T, Tp, dp,
                        static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(d)))};
    run_bwd(a);
  });
  return {unpack(dq, q), unpack(dk, k), unpack(dv, v)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsr, CPU, m) {
  m.impl("causal_attention_fwd", &causal_attention_fwd_cpu);
  m.impl("causal_attention_bwd", &causal_attention_bwd_cpu);
  m.impl("causal_attention_rows", &causal_attention_rows_cpu);
}

}  // namespace lsr
