// The sgemm call shared by the BLAS kernels of mcore/fusions (blas_matmul.cc,
// grouped_matmul.cc), which are built into one library against the OpenBLAS of the pip package
// scipy-openblas32 (its symbols carry the prefix "scipy_"); see blas_build.py.
#pragma once
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>

#include "cblas.h"

extern "C" int BlasGetThreads();  // blas_matmul.cc: the thread count set by BlasSetThreads

namespace {

// From this many multiply-adds a kernel splits its products over two threads (~3 ms on one).
constexpr int64_t kBlasParallelMacs = int64_t{1} << 25;

// C [m, n] = op(A) op(B) with op(A) [m, k], op(B) [k, n]; lda / ldb: row lengths of A and B.
// An empty sum (k = 0) writes zeros.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
                 const float *b, int64_t ldb, float *c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    std::memset(c, 0, sizeof(float) * m * n);
    return;
  }
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), 1.0f,
                    a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), 0.0f, c,
                    static_cast<blasint>(n));
}

// Runs first() on a thread of its own and second() on the calling one when `parallel`, else
// one after the other; returns when both are done. Each runs exactly as it would alone.
template <class First, class Second>
void side_by_side(bool parallel, First first, Second second) {
  if (!parallel) {
    first();
    second();
    return;
  }
  std::thread other;
  try {
    other = std::thread(first);
  } catch (const std::system_error &) {  // no thread to be had: one after the other
    first();
  }
  second();
  if (other.joinable()) other.join();
}

}  // namespace
