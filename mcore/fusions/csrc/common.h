// Helpers shared by the kernel sources of mcore/fusions (cpu_kernels.cc, norm_kernels.cc).
#pragma once
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

inline int64_t leading(int nd, const int64_t *shape) {  // product of all dims but the last
  int64_t n = 1;
  for (int i = 0; i < nd - 1; ++i) n *= shape[i];
  return n;
}

inline int threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace
