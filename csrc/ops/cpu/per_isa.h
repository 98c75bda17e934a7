// Compiles the kernel implementation named by LSR_ISA_IMPL (a header path) once per
// instruction set, each copy in namespace lsr::cpu::(anonymous)::{avx512, avx2, base} under
// a `target` pragma, together with vec_ops.h. See simd.h. No include guard: a kernel
// file defines LSR_ISA_IMPL and includes this file once, at global scope.
#ifndef LSR_ISA_IMPL
#error "define LSR_ISA_IMPL (the kernel implementation header) before including per_isa.h"
#endif

#ifdef LSR_X86_DISPATCH

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#endif
namespace lsr::cpu {
namespace {  // internal linkage: each kernel file has its own copies
namespace avx512 {
constexpr int kVecBytes = 64;
#include "ops/cpu/vec_ops.h"
#include LSR_ISA_IMPL
}  // namespace avx512
}  // namespace
}  // namespace lsr::cpu
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace lsr::cpu {
namespace {  // internal linkage: each kernel file has its own copies
namespace avx2 {
constexpr int kVecBytes = 32;
#include "ops/cpu/vec_ops.h"
#include LSR_ISA_IMPL
}  // namespace avx2
}  // namespace
}  // namespace lsr::cpu
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // LSR_X86_DISPATCH

namespace lsr::cpu {
namespace {  // internal linkage: each kernel file has its own copies
namespace base {
constexpr int kVecBytes = 16;
#include "ops/cpu/vec_ops.h"
#include LSR_ISA_IMPL
}  // namespace base
}  // namespace
}  // namespace lsr::cpu
