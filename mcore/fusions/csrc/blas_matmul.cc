// y = x w^T and its backward through the sgemm of the OpenBLAS that the pip package
// scipy-openblas32 ships (its symbols carry the prefix "scipy_"), called through MindSpore
// ops.Custom(func_type="aot") (mcore/fusions/cpu_ops.py: CpuMatmul).
//
// Entry points (aot signature: params holds the inputs then the outputs, contiguous float32,
// row-major; returns 0 on success, 1 on a shape it does not handle):
//   MatmulNTFwd(x [m, k], w [n, k]) -> y [m, n]                       y = x w^T
//   MatmulNTBwd(dy [m, n], x [m, k], w [n, k]) -> dx [m, k], dw [n, k]
//                                                                  dx = dy w, dw = dy^T x
//   BlasSetThreads(n) / BlasGetThreads(): the threads of the kernels (plain C calls).
//
// Threads: OpenBLAS always runs on one thread here. With BlasSetThreads(n >= 2) a product of
// at least kParallelMacs multiply-adds is split in two halves computed at the same time on two
// threads (the calling one and one it starts), which meet once, at the end:
//   forward: the columns of y (the rows of w): each thread packs half of w;
//   backward: the rows of dx (dy[rows] w) and the columns of dw (dy^T x[:, cols]); each thread
//   computes one half of each product, one after the other.
// (Measured against the rows of y, dx and dw side by side, and other splits:
// docs/performance.md, "BLAS matmul".) OpenBLAS's own threads split every product and wait for
// each other inside it: on a busy machine a descheduled one stalls the call (measured: ~4x
// slower than one thread at load ~11). Every output value is the same sum, in the same order,
// whichever block of the output it falls in (OpenBLAS blocks the summed dimension by its
// length only), so the results do not depend on the setting
// (tests/mcore/fusions/test_thread_invariance.py). Smaller products run on one thread
// (starting a thread costs more than it saves there).
#include <atomic>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>

#include "cblas.h"

namespace {

constexpr int64_t kParallelMacs = int64_t{1} << 25;  // ~3 ms on one thread
constexpr int64_t kAlign = 16;  // split points: a multiple of the sgemm kernel's unroll

bool is_matrix(int nd, const int64_t *shape) { return nd == 2 && shape[0] >= 0 && shape[1] >= 0; }

// C [m, n] (row length ldc) = op(A) op(B) with op(A) [m, k], op(B) [k, n]; lda / ldb: row
// lengths of A and B.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
          const float *b, int64_t ldb, float *c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum
    for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    return;
  }
  scipy_cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k), 1.0f,
                    a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), 0.0f, c,
                    static_cast<blasint>(ldc));
}

int64_t half(int64_t n) {  // the first half's length: a multiple of kAlign, at most n
  const int64_t h = (n / 2 + kAlign - 1) / kAlign * kAlign;
  return h < n ? h : n;
}

// task(1) on a thread it starts and task(0) on this one, at the same time; they meet at the end.
template <class Task>
void on_two_threads(const Task &task) {
  std::thread other;
  try {
    other = std::thread([&] { task(1); });
  } catch (const std::system_error &) {  // no thread to be had: one after the other
    task(1);
  }
  task(0);
  if (other.joinable()) other.join();
}

std::atomic<int> g_threads{1};  // set by BlasSetThreads (this library's one piece of state)

bool parallel(int64_t macs) { return g_threads.load() >= 2 && macs >= kParallelMacs; }

}  // namespace

extern "C" {

void BlasSetThreads(int n) {
  g_threads.store(n < 1 ? 1 : n);
  scipy_openblas_set_num_threads(1);
}

int BlasGetThreads() { return g_threads.load(); }

int MatmulNTFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  for (int i = 0; i < 2; ++i)
    if (!is_matrix(ndims[i], shapes[i])) return 1;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  auto cols = [=](int64_t lo, int64_t hi) {  // y[:, lo:hi] = x w[lo:hi]^T
    gemm(false, true, m, hi - lo, k, x, k, w + lo * k, k, y + lo, n);
  };
  if (!parallel(m * n * k)) {
    cols(0, n);
    return 0;
  }
  const int64_t split = half(n);
  on_two_threads([=](int part) { part ? cols(split, n) : cols(0, split); });
  return 0;
}

int MatmulNTBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  for (int i = 0; i < 3; ++i)
    if (!is_matrix(ndims[i], shapes[i])) return 1;
  const int64_t m = shapes[1][0], k = shapes[1][1], n = shapes[2][0];
  if (shapes[0][0] != m || shapes[0][1] != n || shapes[2][1] != k) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]), *dw = static_cast<float *>(params[4]);
  if (!parallel(m * n * k)) {
    gemm(false, false, m, k, n, dy, n, w, k, dx, k);  // [m, n] [n, k]
    gemm(true, false, n, k, m, dy, n, x, k, dw, k);   // [n, m] [m, k]
    return 0;
  }
  const int64_t rows = half(m), cols = half(k);
  on_two_threads([=](int part) {  // part 0: the first halves, part 1: the second ones
    const int64_t r0 = part ? rows : 0, r1 = part ? m : rows;
    const int64_t c0 = part ? cols : 0, c1 = part ? k : cols;
    gemm(false, false, r1 - r0, k, n, dy + r0 * n, n, w, k, dx + r0 * k, k);  // dx[r0:r1]
    gemm(true, false, n, c1 - c0, m, dy, n, x + c0, k, dw + c0, k);           // dw[:, c0:c1]
  });
  return 0;
}

}  // extern "C"
