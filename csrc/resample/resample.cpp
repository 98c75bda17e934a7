// See resample.h. Semantics: lsr/ops/resampling.py (resample_fast) and docs/method.md (section 3).
//
// Invariant of the loop: for each active image, rows [0, valid) of `logits` and `p` hold
// the exact values of its current grid. A position is *decidable* when its row and the
// row below are valid (the rule reads its bottom-half neighbours), or valid == H. A step:
// each active image whose first flagged position t >= its pointer is decidable redraws
// c[t] = argmax(logits_t / T + G_t), moves its pointer past t and drops its valid rows to
// row(t) (positions <= t keep their values: causality); an image with no flagged
// position among its decidable ones either is finished (valid == H) or needs more rows.
// Then the prior evaluates, from the cache of the rows above, only the next rows each
// image needs: [row(t), row(t) + 3) after a change, then chunks doubling in size. The
// decisions, and their order, are those of the sequential loop: exact. The first pass
// keeps no cache (a normal image costs one plain pass); an image's first call after its
// first change evaluates rows [0, row(t) + 3) and so fills its cache rows.
#include "resample/resample.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace lsr {

at::Tensor flag_positions(const at::Tensor& p, double tau) {
  TORCH_CHECK(p.dim() == 3, "flag_positions expects p (B, H, W), got ", p.sizes());
  const int64_t H = p.size(1), W = p.size(2);
  const at::Tensor low = p.lt(tau);
  const at::Tensor lowf = low.unsqueeze(1).to(at::kFloat);
  const at::Tensor padded = at::constant_pad_nd(lowf, {1, 1, 0, 1});  // (B, 1, H + 1, W + 2)
  using at::indexing::Slice;
  const at::Tensor right = padded.index({Slice(), Slice(), Slice(0, H), Slice(2, at::indexing::None)});
  const at::Tensor below_left = padded.index({Slice(), Slice(), Slice(1, at::indexing::None), Slice(0, W)});
  const at::Tensor below = padded.index({Slice(), Slice(), Slice(1, at::indexing::None), Slice(1, W + 1)});
  const at::Tensor below_right = padded.index({Slice(), Slice(), Slice(1, at::indexing::None), Slice(2, at::indexing::None)});
  at::Tensor neighbour_low = (right + below_left + below + below_right).squeeze(1).gt(0);
  neighbour_low.index_put_({Slice(), H - 1, W - 1}, true);  // the last position counts alone
  return low.logical_and(neighbour_low);
}

at::Tensor code_likelihood(const at::Tensor& logits, const at::Tensor& codes) {
  const at::Tensor lp = logits.to(at::kFloat).movedim(1, -1).softmax(-1);  // (B, H, W, K)
  return lp.gather(-1, codes.unsqueeze(-1)).squeeze(-1);
}

namespace {

// Host index lists -> int64 tensors on `device`, in one transfer. On CUDA through pinned
// memory and a non-blocking copy: a copy from pageable memory would wait for the stream,
// and the loop allows itself one wait per step (the device-to-host copy of its decisions).
std::vector<at::Tensor> to_device(const std::vector<const std::vector<int64_t>*>& parts, const at::Device& device) {
  int64_t n = 0;
  for (const auto* v : parts) n += static_cast<int64_t>(v->size());
  at::TensorOptions opts = at::TensorOptions().dtype(at::kLong);
  if (device.is_cuda()) opts = opts.pinned_memory(true);
  at::Tensor host = at::empty({n}, opts);
  int64_t* h = host.mutable_data_ptr<int64_t>();
  for (const auto* v : parts) h = std::copy(v->begin(), v->end(), h);
  const at::Tensor all = device.is_cpu() ? host : host.to(device, /*non_blocking=*/true);
  std::vector<at::Tensor> out;
  int64_t off = 0;
  for (const auto* v : parts) {
    out.push_back(all.narrow(0, off, static_cast<int64_t>(v->size())));
    off += static_cast<int64_t>(v->size());
  }
  return out;
}

}  // namespace

// The one cost constant of the lazy loop; lsr/contract.py CALL_OVERHEAD_FRACTION holds the
// same number for the Python ports, and tests/test_contract.py checks that they agree.
constexpr double kCallOverheadFraction = 0.15;

std::vector<std::vector<size_t>> split_groups(const std::vector<int64_t>& r0, const std::vector<int64_t>& r1,
                                              int64_t H) {
  // Requests sorted by first row; a group costs (call overhead) + (its images) x (its
  // largest r1 - its smallest r0) image-rows; the overhead of one call is taken as 15% of
  // a full pass of one image (measured on the CPU at batch 1: ~1.4 of ~10 ms). Optimal
  // contiguous partition by dynamic programming, O(n^2) for n requests.
  const size_t n = r0.size();
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return r0[a] < r0[b]; });
  const double overhead = std::max(1.0, kCallOverheadFraction * static_cast<double>(H));
  std::vector<double> best(n + 1, 0.0);
  std::vector<size_t> cut(n + 1, 0);
  for (size_t j = 1; j <= n; ++j) {
    best[j] = std::numeric_limits<double>::infinity();
    int64_t hi = 0;
    for (size_t i = j; i >= 1; --i) {  // group = order[i-1 .. j-1]
      hi = std::max(hi, r1[order[i - 1]]);
      const double cost = best[i - 1] + overhead + static_cast<double>(j - i + 1) * (hi - r0[order[i - 1]]);
      if (cost < best[j]) {
        best[j] = cost;
        cut[j] = i - 1;
      }
    }
  }
  std::vector<std::vector<size_t>> groups;
  for (size_t j = n; j > 0; j = cut[j]) groups.emplace_back(order.begin() + cut[j], order.begin() + j);
  return groups;
}

ResampleOutput resample_incremental(torch::jit::Module& prior, const at::Tensor& codes, const at::Tensor& noise,
                                    double tau, double temperature) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kLong, "resample: codes must be (B, H, W) int64, got ",
              codes.sizes(), " ", codes.scalar_type());
  const int64_t B = codes.size(0), H = codes.size(1), W = codes.size(2), T = H * W;
  TORCH_CHECK(noise.dim() == 3 && noise.size(0) == B && noise.size(1) == T,
              "resample: noise must be (B, H*W, K) = (", B, ", ", T, ", K), got ", noise.sizes());
  TORCH_CHECK(temperature > 0, "resample: temperature must be > 0, got ", temperature);
  constexpr int64_t kRowsAfterChange = 3;  // rows evaluated after a change: row(t) and the two below
  const auto dev = codes.device();
  const at::TensorOptions cpu_long = at::TensorOptions().dtype(at::kLong);
  ResampleOutput out;
  at::Tensor c = codes.clone(at::MemoryFormat::Contiguous);
  at::Tensor flat = c.view({B, T});
  at::Tensor resampled = at::zeros({B, T}, c.options().dtype(at::kBool));
  std::vector<int64_t> passes(B, 1), evaluated(B, T), pointer(B, 0), valid(B, H), chunk(B, kRowsAfterChange),
      active(B);
  for (int64_t b = 0; b < B; ++b) active[b] = b;
  at::Tensor noise_d = noise.to(dev, at::kFloat);

  torch::NoGradGuard no_grad;
  at::Tensor logits = prior.forward({c}).toTensor();  // (B, K, H, W), the first pass: no cache
  c10::IValue cache;                                   // created at the first change
  torch::jit::Method partial = prior.get_method("partial");
  TORCH_CHECK(logits.dim() == 4 && logits.size(0) == B && logits.size(2) == H && logits.size(3) == W,
              "resample: the prior returned logits of shape ", logits.sizes(), " for codes ", c.sizes());
  const int64_t K = logits.size(1);
  TORCH_CHECK(noise.size(2) == K, "resample: noise has K = ", noise.size(2), " but the prior has ", K, " codes");
  at::Tensor L = logits.flatten(2).contiguous();                 // (B, K, T), rows updated per pass
  at::Tensor p = code_likelihood(logits, c).view({B, T}).contiguous();
  out.likelihood = p.clone().view({B, H, W});
  const at::Tensor positions = at::arange(T, c.options()).unsqueeze(0);  // (1, T)

  while (!active.empty()) {
    const int64_t A = static_cast<int64_t>(active.size());
    std::vector<int64_t> lo(A), hi(A);  // decide among positions [pointer, decidable end)
    for (int64_t a = 0; a < A; ++a) {
      const int64_t b = active[a];
      lo[a] = pointer[b];
      hi[a] = valid[b] == H ? T : (valid[b] - 1) * W;
    }
    const auto step = to_device({&active, &lo, &hi}, dev);  // idx, lo, hi
    const at::Tensor flag = flag_positions(p.index_select(0, step[0]).view({A, H, W}), tau).view({A, T});
    const at::Tensor cand = flag.logical_and(positions.ge(step[1].unsqueeze(1)))
                                .logical_and(positions.lt(step[2].unsqueeze(1)));
    const at::Tensor has = cand.any(1);
    const at::Tensor first_t = cand.to(at::kChar).argmax(1);
    // the one device-to-host copy of this step: which images change, and where
    const at::Tensor host = at::stack({has.to(at::kLong), first_t}).to(at::kCPU).contiguous();
    const int64_t* hp = host.const_data_ptr<int64_t>();
    std::vector<int64_t> changed, ts, req_b, req_r0, req_r1;
    for (int64_t a = 0; a < A; ++a) {
      const int64_t b = active[a];
      if (hp[a]) {  // a decision: redraw c[t], then rows from row(t) on are stale
        const int64_t t = hp[A + a];
        changed.push_back(b);
        ts.push_back(t);
        pointer[b] = t + 1;
        valid[b] = t / W;
        chunk[b] = kRowsAfterChange;
      } else if (valid[b] == H) {
        continue;  // finished: nothing flagged from its pointer to the end
      } else {
        pointer[b] = std::max(pointer[b], hi[a]);  // nothing flagged before the decidable end
      }
      req_b.push_back(b);
      req_r0.push_back(passes[b] > 1 ? valid[b] : 0);  // cache rows filled by an earlier partial pass
      req_r1.push_back(std::min(H, valid[b] + chunk[b]));
      chunk[b] *= 2;
    }
    // the requests, grouped so that one call serves images whose rows are close (cost
    // model in split_groups); a group evaluates rows [min r0, max r1) of all its images
    // (rows they already had come out the same)
    std::vector<std::vector<int64_t>> g_rows;
    std::vector<int64_t> g_r0, g_r1;
    for (const auto& group : split_groups(req_r0, req_r1, H)) {
      std::vector<int64_t> rows;
      int64_t r0 = H, r1 = 0;
      for (const size_t i : group) {
        rows.push_back(req_b[i]);
        r0 = std::min(r0, req_r0[i]);
        r1 = std::max(r1, req_r1[i]);
      }
      std::sort(rows.begin(), rows.end());  // partial() wants ascending rows
      g_rows.push_back(std::move(rows));
      g_r0.push_back(r0);
      g_r1.push_back(r1);
    }
    std::vector<const std::vector<int64_t>*> parts{&changed, &ts};
    for (const auto& rows : g_rows) parts.push_back(&rows);
    const auto idx = to_device(parts, dev);  // changed, ts, then each group's images
    if (!changed.empty()) {
      const at::Tensor& rows_t = idx[0];
      const at::Tensor& ts_t = idx[1];
      // draw: Gumbel-max from softmax(logits_t / T) with the noise fixed up front
      const at::Tensor lt = L.index({rows_t, at::indexing::Slice(), ts_t});  // (n, K)
      const at::Tensor g = noise_d.index({rows_t, ts_t});                    // (n, K)
      const at::Tensor drawn = (lt.to(at::kFloat) / temperature + g).argmax(-1);
      flat.index_put_({rows_t, ts_t}, drawn);
      resampled.index_put_({rows_t, ts_t}, true);
    }
    active = req_b;
    std::sort(active.begin(), active.end());
    if (!req_b.empty() && cache.isNone()) cache = prior.get_method("new_cache")({c});
    for (size_t gi = 0; gi < g_rows.size(); ++gi) {
      const int64_t r0 = g_r0[gi], r1 = g_r1[gi], n_rows = r1 - r0;
      const at::Tensor& g_idx = idx[2 + gi];
      const at::Tensor sub_codes = c.narrow(1, 0, r1).index_select(0, g_idx);  // rows [0, r1)
      at::Tensor sub = partial({sub_codes, g_idx, r0, cache}).toTensor();  // (G, K, r1 - r0, W)
      TORCH_CHECK(sub.dim() == 4 && sub.size(2) == n_rows && sub.size(3) == W,
                  "resample: partial pass returned ", sub.sizes(), " for rows ", r0, "..", r1 - 1);
      L.narrow(2, r0 * W, n_rows * W).index_copy_(0, g_idx, sub.flatten(2));
      const at::Tensor p_new = code_likelihood(sub, sub_codes.narrow(1, r0, n_rows));  // (G, r1 - r0, W)
      p.narrow(1, r0 * W, n_rows * W).index_copy_(0, g_idx, p_new.reshape({-1, n_rows * W}));
      for (const int64_t b : g_rows[gi]) {
        passes[b] += 1;
        evaluated[b] += n_rows * W;
        valid[b] = r1;
      }
    }
  }
  out.codes = c;
  out.resampled = resampled.view({B, H, W});
  out.prior_passes = at::tensor(passes, cpu_long);
  out.positions_evaluated = at::tensor(evaluated, cpu_long);
  return out;
}

}  // namespace lsr
