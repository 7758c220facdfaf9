// The backward of y = x w^T through the sgemm of the OpenBLAS that the pip package
// scipy-openblas32 ships (its symbols carry the prefix "scipy_"), called through MindSpore
// ops.Custom(func_type="aot"); the forward stays MindSpore's MatMul (mcore/fusions/cpu_ops.py).
//
// Entry points (aot signature: params holds the inputs then the outputs, contiguous float32,
// row-major; returns 0 on success, 1 on a shape it does not handle):
//   MatmulNTBwd(dy [m, n], x [m, k], w [n, k]) -> dx [m, k], dw [n, k]
//                                                                  dx = dy w, dw = dy^T x
//   BlasSetThreads(n) / BlasGetThreads(): the threads of the backward (plain C calls).
//
// Threads: OpenBLAS always runs on one thread here. With BlasSetThreads(n >= 2) the backward
// of a product of at least kBlasParallelMacs multiply-adds computes dx and dw at the same time on
// two threads (the calling one and one it starts): the two products have the same m n k
// multiply-adds, so they balance, and they meet once, at the end. OpenBLAS's own threads
// split every product and wait for each other inside it: on a busy machine a descheduled one
// stalls the call (measured: the backward's matmuls took ~4x as long as with one thread at
// load ~11, docs/performance.md). Each product runs exactly as on one thread, so the
// results do not depend on the setting. Smaller products run one after the other (starting a
// thread costs more than it saves there).
#include <atomic>
#include <cstdint>

#include "blas_gemm.h"

namespace {

bool is_matrix(int nd, const int64_t *shape) { return nd == 2 && shape[0] >= 0 && shape[1] >= 0; }

std::atomic<int> g_threads{1};  // set by BlasSetThreads (this library's one piece of state)

}  // namespace

extern "C" {

void BlasSetThreads(int n) {
  g_threads.store(n < 1 ? 1 : n);
  scipy_openblas_set_num_threads(1);
}

int BlasGetThreads() { return g_threads.load(); }

int MatmulNTBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  for (int i = 0; i < 3; ++i)
    if (!is_matrix(ndims[i], shapes[i])) return 1;
  const int64_t m = shapes[1][0], k = shapes[1][1], n = shapes[2][0];
  if (shapes[0][0] != m || shapes[0][1] != n || shapes[2][1] != k) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]), *dw = static_cast<float *>(params[4]);
  auto grad_x = [=] { gemm(false, false, m, k, n, dy, n, w, k, dx); };  // [m, n] [n, k]
  auto grad_w = [=] { gemm(true, false, n, k, m, dy, n, x, k, dw); };   // [n, m] [m, k]
  side_by_side(g_threads.load() >= 2 && m * n * k >= kBlasParallelMacs, grad_x, grad_w);
  return 0;
}

}  // extern "C"
