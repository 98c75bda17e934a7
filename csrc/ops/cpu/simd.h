// Run-time choice of the instruction set for the hand-vectorised CPU kernels.
//
// The extension is compiled for the baseline ISA (SSE2 on x86-64), so plain loops would
// never use AVX2 or AVX-512. Each kernel is therefore written once, in an `*_impl.h`
// file over GCC/Clang vector types (see vec_ops.h), and compiled three times by
// per_isa.h: for AVX-512 (64-byte vectors), AVX2+FMA (32 bytes) and the baseline
// (16 bytes), each copy in its own namespace (lsr::cpu::avx512 / avx2 / base) under a
// `target` pragma. `isa()` picks one at run time from the CPU; LSR_CPU_ISA=avx512|avx2|base
// lowers the choice (the tests run every path).
//
// Why whole regions and not a target attribute on a few entry points: GCC lowers vector
// code in a function for that function's own target before inlining it, so an
// always-inline helper without the attribute turns AVX-512 comparisons into scalar code.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#define LSR_INLINE inline __attribute__((always_inline))

// 64-byte vectors only live inside code compiled for AVX-512; GCC's note about the ABI of
// passing them in baseline code is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LSR_X86_DISPATCH 1
#endif

namespace lsr::cpu {

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
#ifdef LSR_X86_DISPATCH
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return Isa::kBase;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return Isa::kAvx512;
  return Isa::kAvx2;
#else
  return Isa::kBase;
#endif
}

// The instruction set the kernels run with: the best the CPU has, or lower if
// LSR_CPU_ISA asks for it (read on every call, so tests can switch it).
inline Isa isa() {
  static const Isa hw = detect_isa();
  const char* env = std::getenv("LSR_CPU_ISA");
  if (env == nullptr || *env == '\0') return hw;
  Isa want = Isa::kBase;
  if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else TORCH_CHECK(std::strcmp(env, "base") == 0, "LSR_CPU_ISA must be avx512, avx2 or base; got '", env, "'");
  return want < hw ? want : hw;
}

// Padding unit of packed operands: 64 bytes (16 floats, 8 doubles), a whole number of
// vectors at every ISA.
template <typename T> constexpr int64_t kPad = 64 / sizeof(T);

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace lsr::cpu
