// Vector helpers and the register-blocked matrix product of the CPU kernels.
//
// No include guard: per_isa.h includes this file once per instruction set, inside a
// `target` region and the namespace lsr::cpu::<isa>, where kVecBytes is the vector width
// in bytes (64 AVX-512, 32 AVX2, 16 baseline). Standard headers come from simd.h.

// Lanes of T in one vector of this ISA (float: 16, 8, 4; double: 8, 4, 2).
template <typename T> constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));

// One vector of T, and the integer vector of the same lane width (what comparisons give).
template <typename T> struct VecT;
template <> struct VecT<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef int32_t itype __attribute__((vector_size(kVecBytes)));
};
template <> struct VecT<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef int64_t itype __attribute__((vector_size(kVecBytes)));
};
template <typename T> using vec = typename VecT<T>::type;
template <typename T> using ivec = typename VecT<T>::itype;
template <typename T> using lane_int = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;

template <typename V, typename T> LSR_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> LSR_INLINE void store(T* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
template <typename To, typename From> LSR_INLINE To bitcast(const From& x) {
  static_assert(sizeof(To) == sizeof(From), "bitcast between types of different size");
  To y;
  std::memcpy(&y, &x, sizeof(To));
  return y;
}
template <typename T> LSR_INLINE vec<T> splat(T x) { return vec<T>{} + x; }

// 0, 1, ..., kLanes<T> - 1.
template <typename T> LSR_INLINE ivec<T> iota() {
  alignas(64) static constexpr lane_int<T> i[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return load<ivec<T>>(i);
}

// mask ? a : b, lane by lane (mask lanes all ones or all zeros, as comparisons give).
template <typename V, typename M> LSR_INLINE V select(M mask, V a, V b) { return mask ? a : b; }
template <typename V> LSR_INLINE V vmax(V a, V b) { return a > b ? a : b; }

template <typename T> LSR_INLINE T hmax(vec<T> v) {
  T m = v[0];
  for (int i = 1; i < kLanes<T>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
template <typename T> LSR_INLINE T hsum(vec<T> v) {
  T s = v[0];
  for (int i = 1; i < kLanes<T>; ++i) s += v[i];
  return s;
}

// exp(x) lane by lane. float: Cephes expf (range reduction to [-ln2/2, ln2/2], degree-6
// polynomial, about 1 ulp), exactly 0 below -87.3 (so exp(-inf) = 0), NaN stays NaN.
LSR_INLINE vec<float> vexp(vec<float> x) {
  using V = vec<float>;
  using M = ivec<float>;
  const M under = x < -87.3365447505531f;
  x = x > 88.3762626647949f ? splat<float>(88.3762626647949f) : x;
  x = under ? splat<float>(-87.3365447505531f) : x;
  // n = round(x / ln2): adding and removing 1.5 * 2^23 rounds to nearest
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat<float>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  V y = p * (r * r) + r + 1.0f;
  y = y * bitcast<V>((__builtin_convertvector(n, M) + 127) << 23);  // * 2^n
  return under ? V{} : y;
}
// double (the test and gradcheck dtype, not a speed path): the library exp per lane.
LSR_INLINE vec<double> vexp(vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

// C (R x NV vectors) (+)= A (R x inner) . B (inner x NV vectors), row-major with leading
// dimensions: one register block, its R x NV accumulators in registers over the inner loop.
template <typename T, int R, int NV>
LSR_INLINE void gemm_block(int64_t inner, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                           int64_t ldc, bool accumulate) {
  using V = vec<T>;
  constexpr int W = kLanes<T>;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load<V>(C + r * ldc + v * W) : V{};
  for (int64_t p = 0; p < inner; ++p) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load<V>(B + p * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const T a = A[r * lda + p];
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * W, acc[r][v]);
}

// C (m x cols) (+)= A (m x inner) . B (inner x cols), all row-major; cols a multiple of
// the vector width (callers pad B and C). Register blocks of 4 rows x 2 vectors.
template <typename T>
LSR_INLINE void gemm(int64_t m, int64_t cols, int64_t inner, const T* A, int64_t lda, const T* B,
                     int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = kLanes<T>, R = 4, NV = 2;
  int64_t c = 0;
  for (; c + NV * W <= cols; c += NV * W) {
    int64_t r = 0;
    for (; r + R <= m; r += R)
      gemm_block<T, R, NV>(inner, A + r * lda, lda, B + c, ldb, C + r * ldc + c, ldc, accumulate);
    for (; r < m; ++r) gemm_block<T, 1, NV>(inner, A + r * lda, lda, B + c, ldb, C + r * ldc + c, ldc, accumulate);
  }
  for (; c < cols; c += W) {
    int64_t r = 0;
    for (; r + R <= m; r += R)
      gemm_block<T, R, 1>(inner, A + r * lda, lda, B + c, ldb, C + r * ldc + c, ldc, accumulate);
    for (; r < m; ++r) gemm_block<T, 1, 1>(inner, A + r * lda, lda, B + c, ldb, C + r * ldc + c, ldc, accumulate);
  }
}
