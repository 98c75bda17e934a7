// Per-ISA part of the CPU kernel of lsr::vq_nearest (see vq_nearest_kernel.cpp).
// No include guard: compiled once per instruction set by per_isa.h.

// a is a better (smaller) distance than b: strict, so that earlier codes win ties; NaN wins.
template <typename T> LSR_INLINE bool better(T a, T b) { return a < b || (a != a && b == b); }

// Codes [k, k + NV*W) (NV vectors of a panel, leading dimension kPanel) against rows [0, R)
// of z: R x NV register block of dot products, turned into distances and folded into the
// per-lane running minima bv / bi (within a lane the codes come in ascending order).
template <typename T, int R, int NV>
LSR_INLINE void codes_step(const T* z, int64_t D, const T* panel, const T* e2, int64_t K, int64_t k,
                           vec<T> (&bv)[R], ivec<T> (&bi)[R]) {
  using V = vec<T>;
  using VI = ivec<T>;
  using I = lane_int<T>;
  constexpr int W = kLanes<T>;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t c = 0; c < D; ++c) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load<V>(panel + c * kPanel<T> + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = z[r * D + c];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  VI idx = iota<T>() + static_cast<I>(k);
  for (int v = 0; v < NV; ++v) {
    const V e = load<V>(e2 + k + v * W);
    for (int r = 0; r < R; ++r) {
      const V dist = e - (acc[r][v] + acc[r][v]);  // ||e||^2 - 2 z.e
      // strict: the earlier code keeps a tie; a NaN replaces a number (as torch.argmin);
      // padding codes (k >= K) never (with inf in z their distance can be NaN)
      const VI take = ((dist < bv[r]) | ((dist != dist) & (bv[r] == bv[r]))) & (idx < static_cast<I>(K));
      bv[r] = select(take, dist, bv[r]);
      bi[r] = select(take, idx, bi[r]);
    }
    idx += static_cast<I>(W);
  }
}

// Rows [0, R) of z (R x D, row-major) against one panel of the codebook, starting at code
// k0; the running per-lane minima of the rows are in st_v / st_i (R x W each).
template <typename T, int R>
LSR_INLINE void rows_vs_panel(const T* z, int64_t D, const T* panel, const T* e2, int64_t K, int64_t k0,
                              T* st_v, lane_int<T>* st_i) {
  using V = vec<T>;
  using VI = ivec<T>;
  constexpr int W = kLanes<T>, NV = 2;
  static_assert(kPanel<T> % (NV * W) == 0, "a panel is a whole number of steps");
  V bv[R];
  VI bi[R];
  for (int r = 0; r < R; ++r) {
    bv[r] = load<V>(st_v + r * W);
    bi[r] = load<VI>(st_i + r * W);
  }
  for (int64_t j = 0; j < kPanel<T>; j += NV * W)
    codes_step<T, R, NV>(z, D, panel + j, e2, K, k0 + j, bv, bi);
  for (int r = 0; r < R; ++r) {
    store(st_v + r * W, bv[r]);
    store(st_i + r * W, bi[r]);
  }
}

// Entry point: a block of `rows` (<= kRowBlock) rows of z (row-major, accumulation type)
// against the whole codebook, stored as panels (Kp / kPanel, D, kPanel); one panel
// (D x 128 bytes) stays in L1 while every row of the block passes over it.
template <typename T>
void vq_block(const T* z, int64_t rows, int64_t D, const T* panels, int64_t K, int64_t Kp, const T* e2,
              int64_t* out) {
  using I = lane_int<T>;
  constexpr int W = kLanes<T>, R = 4;
  alignas(64) T st_v[kRowBlock * W];
  alignas(64) I st_i[kRowBlock * W];
  for (int64_t i = 0; i < rows * W; ++i) {
    st_v[i] = std::numeric_limits<T>::infinity();
    st_i[i] = 0;
  }
  for (int64_t k0 = 0; k0 < Kp; k0 += kPanel<T>) {
    const T* panel = panels + k0 * D;
    int64_t r = 0;
    for (; r + R <= rows; r += R)
      rows_vs_panel<T, R>(z + r * D, D, panel, e2, K, k0, st_v + r * W, st_i + r * W);
    for (; r < rows; ++r) rows_vs_panel<T, 1>(z + r * D, D, panel, e2, K, k0, st_v + r * W, st_i + r * W);
  }
  // across lanes: the smallest value (NaN first), then the smallest index among equals
  // (a lane that never took a code holds +inf and index 0, as argmin of an all-inf row)
  for (int64_t r = 0; r < rows; ++r) {
    T v = st_v[r * W];
    int64_t i = st_i[r * W];
    for (int l = 1; l < W; ++l) {
      const T vl = st_v[r * W + l];
      const int64_t il = st_i[r * W + l];
      if (better(vl, v) || ((vl == v || (vl != vl && v != v)) && il < i)) {
        v = vl;
        i = il;
      }
    }
    out[r] = i;
  }
}
