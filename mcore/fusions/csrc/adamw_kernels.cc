// The optimizer update's kernels for mcore/fusions (aot signature as in cpu_kernels.cc; float32,
// contiguous, any shape: a tensor is its flat run of elements).
//
// SquaredNorm: the sum of squares of one gradient in fixed blocks of kNormBlock elements, each
// block summed in double, the blocks then added in index order: the result does not depend on
// the thread count (every parallel layout reproduces the one-process norm).
// AdamWInPlace: one pass over a parameter that reads w, g, m, v and writes w, m, v in place and
// zeroes g (the gradient buffer), with the clip factor applied to g on the way in. It returns a
// one-element dummy output (0) so the graph keeps the call.
// AccAddInPlace: acc += g in place (the gradient accumulation of the training step), the same
// IEEE sums as MindSpore's AssignAdd, on the calling thread: the add is bound by memory, and
// inside a training step 27 parallel regions between MindSpore's kernels each waited for a
// second thread (in one profile at load ~5: 112 ms a step on two threads, 39 ms on one,
// AssignAdd 56 ms; docs/performance.md).
#include <cmath>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kNormBlock = int64_t{1} << 14;  // elements per partial sum of SquaredNorm

inline int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

}  // namespace

extern "C" {

// g [...] -> out [1] = sum g^2 (see the file comment for the summation order)
int SquaredNorm(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *g = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  const int64_t n = numel(ndims[0], shapes[0]);
  const int64_t blocks = (n + kNormBlock - 1) / kNormBlock;
  std::vector<double> part(static_cast<size_t>(blocks), 0.0);
#pragma omp parallel for schedule(static) if (n >= kParallelElems)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t lo = b * kNormBlock, hi = lo + kNormBlock < n ? lo + kNormBlock : n;
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = lo; j < hi; ++j) s += static_cast<double>(g[j]) * g[j];
    part[static_cast<size_t>(b)] = s;
  }
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) total += part[static_cast<size_t>(b)];
  out[0] = static_cast<float>(total);
  return 0;
}

// w, g, m, v [...] (same element count), s [6] = (lr, b1, b2, eps, wd, coef) -> out [1] = 0.
// In place, per element, with gc = g * coef (MindSpore's AdamWeightDecay formulas; the caller
// folds the bias correction into lr, eps and wd):
//   m += (gc - m)(1 - b1);  v += (gc^2 - v)(1 - b2);  w -= lr (m / (sqrt(v) + eps) + wd w);  g = 0
int AdamWInPlace(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  float *w = static_cast<float *>(params[0]);
  float *g = static_cast<float *>(params[1]);
  float *m = static_cast<float *>(params[2]);
  float *v = static_cast<float *>(params[3]);
  const float *s = static_cast<const float *>(params[4]);
  float *out = static_cast<float *>(params[5]);
  const int64_t n = numel(ndims[0], shapes[0]);
  for (int k = 1; k < 4; ++k)
    if (numel(ndims[k], shapes[k]) != n) return 1;
  if (numel(ndims[4], shapes[4]) != 6) return 1;
  const float lr = s[0], c1 = 1.0f - s[1], c2 = 1.0f - s[2], eps = s[3], wd = s[4], coef = s[5];
#pragma omp parallel for simd schedule(static) if (n >= kParallelElems)
  for (int64_t i = 0; i < n; ++i) {
    const float gc = g[i] * coef;
    const float mi = m[i] + (gc - m[i]) * c1;
    const float vi = v[i] + (gc * gc - v[i]) * c2;
    w[i] -= lr * (mi / (std::sqrt(vi) + eps) + wd * w[i]);
    m[i] = mi;
    v[i] = vi;
    g[i] = 0.0f;
  }
  out[0] = 0.0f;
  return 0;
}

// acc [...], g [...] (same element count) -> out [1] = 0; acc += g in place.
int AccAddInPlace(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                  void *) {
  float *acc = static_cast<float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[2]);
  const int64_t n = numel(ndims[0], shapes[0]);
  if (numel(ndims[1], shapes[1]) != n) return 1;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += g[i];
  out[0] = 0.0f;
  return 0;
}

}  // extern "C"
