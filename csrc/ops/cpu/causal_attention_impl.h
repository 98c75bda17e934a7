// Per-ISA part of the CPU kernels of lsr::causal_attention_fwd / _bwd (see
// causal_attention_kernel.cpp for the layout of the packed operands).
// No include guard: compiled once per instruction set by per_isa.h.

// Forward of one block of queries, absolute positions [i0, i1) (query i sits at row
// i - a.q0 of q/out), of head bh: FlashAttention's online softmax over key blocks
// [j0, j0 + kBlockK), only those with a key s < t for some row t of the block. Blocks are
// aligned to absolute positions, so a row computed in a partial call (q0 > 0) goes through
// exactly the same arithmetic as in a full one. Per-thread tiles: S (kBlockQ x kBlockK
// scores, then probabilities), acc (kBlockQ x dp unnormalised output), row_max / row_sum.
template <typename T>
LSR_INLINE void fwd_block(const AttnFwd<T>& a, int64_t bh, int64_t i0, int64_t i1, T* S, T* acc, T* row_max,
                          T* row_sum) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t n_t = a.len, dp = a.dp, m = i1 - i0;
  const T* Q = a.q + (bh * n_t + i0 - a.q0) * dp;
  const T* Kt = a.kt + bh * dp * a.Tp;
  const T* Vr = a.v + bh * (a.q0 + n_t) * dp;
  std::fill(acc, acc + m * dp, T(0));
  std::fill(row_max, row_max + m, ninf);
  std::fill(row_sum, row_sum + m, T(0));
  // the last row, t = i1 - 1, sees keys [0, i1 - 1); blocks past the diagonal are skipped
  for (int64_t j0 = 0; j0 < i1 - 1; j0 += kBlockK) {
    const int64_t n = std::min(kBlockK, i1 - 1 - j0), np = round_up(n, W);
    gemm<T>(m, np, dp, Q, dp, Kt + j0, a.Tp, S, kBlockK, false);  // raw scores q.k
    for (int64_t r = 0; r < m; ++r) {
      T* s = S + r * kBlockK;
      const int64_t lim = std::min(n, i0 + r - j0);  // row t = i0 + r sees keys j0 .. j0 + lim - 1
      if (lim <= 0) {
        std::fill(s, s + n, T(0));
        continue;
      }
      std::fill(s + lim, s + np, ninf);
      V mx = splat<T>(ninf);
      for (int64_t c = 0; c < np; c += W) mx = vmax(mx, load<V>(s + c));
      const T m_new = std::max(row_max[r], hmax<T>(mx) * a.scale);
      if (m_new == ninf) {  // only -inf scores (infinite inputs): nothing to add
        std::fill(s, s + n, T(0));
        continue;
      }
      const T alpha = std::exp(row_max[r] - m_new);  // 0 on the first block (-inf)
      V sum = V{};
      for (int64_t c = 0; c < np; c += W) {
        const V p = vexp(load<V>(s + c) * a.scale - m_new);
        store(s + c, p);
        sum += p;
      }
      row_sum[r] = row_sum[r] * alpha + hsum<T>(sum);
      row_max[r] = m_new;
      if (alpha != T(1)) {
        T* o = acc + r * dp;
        for (int64_t c = 0; c < dp; c += W) store(o + c, load<V>(o + c) * alpha);
      }
    }
    gemm<T>(m, dp, n, S, kBlockK, Vr + j0 * dp, dp, acc, dp, true);  // acc += P v
  }
  for (int64_t r = 0; r < m; ++r) {
    T* o = a.out + (bh * n_t + i0 - a.q0 + r) * dp;
    const T* in = acc + r * dp;
    if (row_sum[r] > T(0)) {
      const T inv = T(1) / row_sum[r];
      for (int64_t c = 0; c < dp; c += W) store(o + c, load<V>(in + c) * inv);
      a.lse[bh * n_t + i0 - a.q0 + r] = row_max[r] + std::log(row_sum[r]);
    } else {  // row 0: no keys, zeros (never NaN)
      std::fill(o, o + dp, T(0));
      a.lse[bh * n_t + i0 - a.q0 + r] = ninf;
    }
  }
}

// Entry point of the forward: runs tasks (head, query block) taken from `next` until none
// are left; task t is query block nqb - 1 - t / BH of head t % BH (the longest rows first).
// Query blocks are the absolute blocks [b * kBlockQ, (b + 1) * kBlockQ) cut to [q0, q0 + len).
template <typename T> void attn_fwd_tasks(const AttnFwd<T>& a, std::atomic<int64_t>* next) {
  const int64_t b0 = a.first_qblock(), nqb = a.n_qblocks(), ntasks = a.BH * nqb;
  std::unique_ptr<T[]> buf(new T[kBlockQ * kBlockK + kBlockQ * a.dp + 2 * kBlockQ]);
  T* S = buf.get();
  T* acc = S + kBlockQ * kBlockK;
  T* row_max = acc + kBlockQ * a.dp;
  T* row_sum = row_max + kBlockQ;
  for (int64_t t = next->fetch_add(1); t < ntasks; t = next->fetch_add(1)) {
    const int64_t blk = b0 + nqb - 1 - t / a.BH;
    const int64_t i0 = std::max(a.q0, blk * kBlockQ), i1 = std::min(a.q0 + a.len, (blk + 1) * kBlockQ);
    fwd_block<T>(a, t % a.BH, i0, i1, S, acc, row_max, row_sum);
  }
}

// Backward of head bh: for each key block, every query block below it recomputes
// P = exp(S * scale - lse) and dP = dO v^T, then dS = P * (dP - D) * scale and
// dV += P^T dO, dK += dS^T q, dQ += dS k. The head is this thread's alone: no races.
// Per-thread tiles: S, dP (kBlockQ x kBlockK), Pt, dSt (kBlockK x kBlockQ).
template <typename T>
LSR_INLINE void bwd_head(const AttnBwd<T>& a, int64_t bh, T* S, T* dP, T* Pt, T* dSt) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t n_t = a.len, dp = a.dp;
  const int64_t rows = bh * n_t * dp;
  const T *Q = a.q + rows, *Kr = a.k + rows, *dO = a.dout + rows;
  const T *Kt = a.kt + bh * dp * a.Tp, *Vt = a.vt + bh * dp * a.Tp;
  const T* delta = a.delta + bh * n_t;
  const T* lse = a.lse + bh * n_t;
  T *dQ = a.dq + rows, *dK = a.dk + rows, *dV = a.dv + rows;
  // key s is seen by the queries t > s: keys [0, T - 1)
  for (int64_t j0 = 0; j0 < n_t - 1; j0 += kBlockK) {
    const int64_t n = std::min(kBlockK, n_t - 1 - j0), np = round_up(n, W);
    for (int64_t i0 = j0 + 1; i0 < n_t; i0 += kBlockQ) {
      const int64_t m = std::min(kBlockQ, n_t - i0);
      gemm<T>(m, np, dp, Q + i0 * dp, dp, Kt + j0, a.Tp, S, kBlockK, false);   // q.k
      gemm<T>(m, np, dp, dO + i0 * dp, dp, Vt + j0, a.Tp, dP, kBlockK, false); // dO.v
      for (int64_t r = 0; r < m; ++r) {
        const int64_t t = i0 + r, lim = std::min(n, t - j0);  // >= 1: t > j0
        T* s = S + r * kBlockK;
        T* g = dP + r * kBlockK;
        std::fill(s + lim, s + np, ninf);
        const T L = lse[t], D = delta[t];
        for (int64_t c = 0; c < np; c += W) {
          const V p = vexp(load<V>(s + c) * a.scale - L);
          store(s + c, p);
          store(g + c, p * (load<V>(g + c) - D) * a.scale);  // dS, with the scale of S folded in
        }
      }
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < n; ++c) {
          Pt[c * kBlockQ + r] = S[r * kBlockK + c];
          dSt[c * kBlockQ + r] = dP[r * kBlockK + c];
        }
      gemm<T>(n, dp, m, Pt, kBlockQ, dO + i0 * dp, dp, dV + j0 * dp, dp, true);   // dV += P^T dO
      gemm<T>(n, dp, m, dSt, kBlockQ, Q + i0 * dp, dp, dK + j0 * dp, dp, true);   // dK += dS^T q
      gemm<T>(m, dp, n, dP, kBlockK, Kr + j0 * dp, dp, dQ + i0 * dp, dp, true);   // dQ += dS k
    }
  }
}

// Entry point of the backward: heads [bh0, bh1).
template <typename T> void attn_bwd_heads(const AttnBwd<T>& a, int64_t bh0, int64_t bh1) {
  std::unique_ptr<T[]> buf(new T[4 * kBlockQ * kBlockK]);
  T* S = buf.get();
  for (int64_t bh = bh0; bh < bh1; ++bh)
    bwd_head<T>(a, bh, S, S + kBlockQ * kBlockK, S + 2 * kBlockQ * kBlockK, S + 3 * kBlockQ * kBlockK);
}
