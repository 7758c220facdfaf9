// The backward of y = x w^T through the sgemm of the OpenBLAS that the pip package
// scipy-openblas32 ships (its symbols carry the prefix "scipy_"), called through MindSpore
// ops.Custom(func_type="aot"); the forward stays MindSpore's MatMul (mcore/fusions/cpu_ops.py).
//
// Entry points (aot signature: params holds the inputs then the outputs, contiguous float32,
// row-major; returns 0 on success, 1 on a shape it does not handle):
//   MatmulNTBwd(dy [m, n], x [m, k], w [n, k]) -> dx [m, k], dw [n, k]
//                                                                  dx = dy w, dw = dy^T x
//   BlasSetThreads(n): the number of OpenBLAS threads (a plain C call, not an op).
#include <cstdint>
#include <cstring>

#include "cblas.h"

namespace {

bool is_matrix(int nd, const int64_t *shape) { return nd == 2 && shape[0] >= 0 && shape[1] >= 0; }

// C [m, n] = op(A) op(B) with op(A) [m, k], op(B) [k, n]; lda / ldb: row lengths of A and B.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
          const float *b, int64_t ldb, float *c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum
    std::memset(c, 0, sizeof(float) * m * n);
    return;
  }
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), 1.0f,
                    a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), 0.0f, c,
                    static_cast<blasint>(n));
}

}  // namespace

extern "C" {

void BlasSetThreads(int n) { scipy_openblas_set_num_threads(n); }

int BlasGetThreads() { return scipy_openblas_get_num_threads(); }

int MatmulNTBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  for (int i = 0; i < 3; ++i)
    if (!is_matrix(ndims[i], shapes[i])) return 1;
  const int64_t m = shapes[1][0], k = shapes[1][1], n = shapes[2][0];
  if (shapes[0][0] != m || shapes[0][1] != n || shapes[2][1] != k) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  gemm(false, false, m, k, n, dy, n, w, k, static_cast<float *>(params[3]));  // [m, n] [n, k]
  gemm(true, false, n, k, m, dy, n, x, k, static_cast<float *>(params[4]));   // [n, m] [m, k]
  return 0;
}

}  // extern "C"
