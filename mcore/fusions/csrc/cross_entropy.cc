// Cross-entropy over the vocabulary for mcore/fusions (ops.Custom(func_type="aot") signature,
// see cpu_kernels.cc). Rows are the product of the leading dims of the logits; labels hold
// one int32 or int64 per row. A label outside [0, V) marks an ignored row: loss 0, gradient 0.
// The forward keeps only the per-row log-sum-exp; the backward rebuilds the softmax from it
// while writing the gradient, so no vocabulary-sized buffer exists besides logits and grad.
//
// Speed: exp is vexp (exp.h), so the loops over the vocabulary vectorise. The forward reads a
// row twice (max, then the sum of exponentials; a row of 32000 floats is 128 KB and stays in
// the L2 cache between the two), the backward once. Rows are split over the OpenMP threads
// above kParallelElems values; one task owns a row, and the sum of a row runs in an order fixed
// by V alone (kLanes partial sums, element v into lane v % kLanes, each in double, then the
// lanes added in index order), so the bits are the same for any thread count and any vector
// width the compiler picks (GCC is asked for 512 bits here: it defaults to 256 on AVX-512
// CPUs, and this file's loops are bound by vexp's arithmetic, not memory, at 256).
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "exp.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")  // where the CPU has AVX-512: 2x vexp throughput
#endif

namespace {

constexpr int64_t kLanes = 16;

int64_t label_at(const void *labels, bool wide, int64_t row) {
  return wide ? static_cast<const int64_t *>(labels)[row]
              : static_cast<const int32_t *>(labels)[row];
}

bool wide_labels(const char *dtype) { return std::strcmp(dtype, "int64") == 0; }

// log sum_v exp(z_v - m) for one row of V values, m its max (see the file comment for the order).
float log_sum_exp_shifted(const float *z, int64_t V, float m) {
  double acc[kLanes] = {};
  float e[kLanes];
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) e[j] = vexp(z[v + j] - m);
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += e[j];
  }
  for (int64_t j = 0; v + j < V; ++j) acc[j] += vexp(z[v + j] - m);
  double sum = 0.0;  // double: a 1e5-long sum of fp32 terms keeps full fp32 precision
  for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
  return static_cast<float>(std::log(sum));
}

}  // namespace

extern "C" {

// logits [..., V] f32, labels [...] int -> loss [...] f32, lse [...] f32 with
//   lse = log sum_v exp(z_v) (max-shifted), loss = (lse - max) - (z_y - max), 0 when ignored.
int CrossEntropyFwd(int, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                    void *) {
  const float *z = static_cast<const float *>(params[0]);
  const void *labels = params[1];
  float *loss = static_cast<float *>(params[2]);
  float *lse = static_cast<float *>(params[3]);
  const int64_t V = shapes[0][ndims[0] - 1], N = leading(ndims[0], shapes[0]);
  if (V <= 0 || leading(ndims[1] + 1, shapes[1]) != N) return 1;  // one label per row
  const bool wide = wide_labels(dtypes[1]);
#pragma omp parallel for schedule(static) if (N * V >= kParallelElems)
  for (int64_t n = 0; n < N; ++n) {
    const float *zr = z + n * V;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) m = zr[v] > m ? zr[v] : m;
    const float lse_shift = log_sum_exp_shifted(zr, V, m);
    const int64_t y = label_at(labels, wide, n);
    lse[n] = lse_shift + m;
    loss[n] = (y >= 0 && y < V) ? lse_shift - (zr[y] - m) : 0.0f;
  }
  return 0;
}

// logits [..., V], labels [...], lse [...], dloss [...], dlse [...] -> grad [..., V] with
//   grad_v = softmax_v * (dloss + dlse) - [v == y] * dloss   (dloss taken as 0 when ignored).
int CrossEntropyBwd(int, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                    void *) {
  const float *z = static_cast<const float *>(params[0]);
  const void *labels = params[1];
  const float *lse = static_cast<const float *>(params[2]);
  const float *dloss = static_cast<const float *>(params[3]);
  const float *dlse = static_cast<const float *>(params[4]);
  float *grad = static_cast<float *>(params[5]);
  const int64_t V = shapes[0][ndims[0] - 1], N = leading(ndims[0], shapes[0]);
  if (V <= 0 || leading(ndims[1] + 1, shapes[1]) != N) return 1;
  const bool wide = wide_labels(dtypes[1]);
#pragma omp parallel for schedule(static) if (N * V >= kParallelElems)
  for (int64_t n = 0; n < N; ++n) {
    const float *zr = z + n * V;
    float *gr = grad + n * V;
    const int64_t y = label_at(labels, wide, n);
    const bool valid = y >= 0 && y < V;
    const float g = valid ? dloss[n] : 0.0f, scale = g + dlse[n], shift = lse[n];
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) gr[v] = vexp(zr[v] - shift) * scale;
    if (valid) gr[y] -= g;
  }
  return 0;
}

}  // extern "C"
