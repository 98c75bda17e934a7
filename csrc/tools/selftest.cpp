// lsr_ops_selftest: loads liblsr_ops through the dispatcher (no Python) and checks each op
// against a plain loop on a small random case. Exit status 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <limits>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

at::Tensor naive_vq(const at::Tensor& z, const at::Tensor& e) {
  auto zd = z.to(at::kDouble), ed = e.to(at::kDouble);
  auto out = at::empty({z.size(0)}, at::kLong);
  for (int64_t n = 0; n < z.size(0); ++n) {
    double best = std::numeric_limits<double>::infinity();
    int64_t arg = 0;
    for (int64_t k = 0; k < e.size(0); ++k) {
      double d = (ed[k] * ed[k]).sum().item<double>() - 2.0 * (zd[n] * ed[k]).sum().item<double>();
      if (d < best) { best = d; arg = k; }
    }
    out[n] = arg;
  }
  return out;
}

at::Tensor naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  auto qd = q.to(at::kDouble), kd = k.to(at::kDouble), vd = v.to(at::kDouble);
  auto out = at::zeros_like(qd);
  const int64_t T = q.size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  for (int64_t b = 0; b < q.size(0); ++b)
    for (int64_t h = 0; h < q.size(1); ++h)
      for (int64_t t = 1; t < T; ++t) {
        auto s = at::matmul(kd[b][h].narrow(0, 0, t), qd[b][h][t]) * scale;  // (t,)
        auto p = at::softmax(s, 0);
        out[b][h][t] = at::matmul(p, vd[b][h].narrow(0, 0, t));
      }
  return out;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  auto vq = c10::Dispatcher::singleton()
                .findSchemaOrThrow("lsr::vq_nearest", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto z = at::randn({300, 16});
  auto e = at::randn({37, 16});
  expect(at::equal(vq.call(z, e), naive_vq(z, e)), "vq_nearest == naive loop (float32, N=300, K=37)");
  auto dup = at::cat({e.narrow(0, 0, 1), e.narrow(0, 0, 1)});
  expect(vq.call(e.narrow(0, 0, 1), dup).item<int64_t>() == 0, "vq_nearest: ties go to the lower index");

  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("lsr::causal_attention_fwd", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&)>();
  auto q = at::randn({2, 3, 50, 16}), k = at::randn({2, 3, 50, 16}), v = at::randn({2, 3, 50, 16});
  auto out = std::get<0>(fwd.call(q, k, v));
  auto ref = naive_attention(q, k, v);
  double err = (out.to(at::kDouble) - ref).abs().max().item<double>();
  std::printf("     causal_attention max abs error vs naive loop: %.3g\n", err);
  expect(err < 1e-5, "causal_attention_fwd == naive loop (float32, T=50)");
  expect(out.select(2, 0).abs().max().item<float>() == 0.0f, "causal_attention: row 0 is zeros");

  std::printf("%s\n", failures ? "selftest FAILED" : "selftest passed");
  return failures ? 1 : 0;
}
