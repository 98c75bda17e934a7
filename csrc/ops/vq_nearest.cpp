// Schema of lsr::vq_nearest. Kernels: ops/cpu/vq_nearest_kernel.cpp, ops/cuda/vq_nearest_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lsr, m) {
  // z (N, D), codebook (K, D) -> indices (N,) int64: argmin_k ||e_k||^2 - 2 z.e_k,
  // float32 accumulation, ties to the lower index.
  m.def("vq_nearest(Tensor z, Tensor codebook) -> Tensor");
}
