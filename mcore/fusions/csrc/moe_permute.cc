// The token permutation of mixture-of-experts layers (mcore/moe/permute.py) for mcore/fusions,
// ops.Custom(func_type="aot") entry points (see cpu_kernels.cc): rows float32, the routing,
// counts and order int32.
//
// A routing of T tokens is experts [T, k] (ids in [0, E]; E = a dropped pair); pair
// p = t * k + j is token t's j-th choice, N = T * k pairs.
//   MoePermuteFwd(x [T, h], experts [T, k], slots [E]) -> x_sorted [N, h], counts [E], order [N]
//       a counting sort: pairs by expert, then by pair index, dropped ones last (the order of
//       sorting the keys expert * N + p); x_sorted[i] = x[order[i] / k]. Only the shape of
//       slots is read: it gives E.
//   MoePermuteBwd(dx_sorted [N, h], order [N], x [T, h]) -> dx [T, h]
//       dx[t] = sum over j of dx_sorted[row of pair t * k + j] (x gives only the shape).
//   MoeUnpermuteFwd(y [N, h], order [N], weights [T, k]) -> out [T, h]
//       out[t] = sum over j of weights[t, j] * y[row of pair t * k + j].
//   MoeUnpermuteBwd(dout [T, h], y [N, h], order [N], weights [T, k]) -> dy [N, h], dw [T, k]
//       dy[row of p] = weights[p] * dout[t]; dw[p] = dout[t] . y[row of p] (summed in double).
// "Row of p" is i with order[i] = p. Sums over j run in j order; every output row is written
// by one task, so the results are the same bits for any thread count. Returns 1 on shapes
// that do not fit, an expert id outside [0, E] or an order that is not a permutation of [0, N).
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

// rows[p] = i with order[i] = p; false unless order is a permutation of [0, N).
bool invert(const int32_t *order, int64_t N, std::vector<int64_t> *rows) {
  rows->assign(N, -1);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t p = order[i];
    if (p < 0 || p >= N || (*rows)[p] >= 0) return false;
    (*rows)[p] = i;
  }
  return true;
}

}  // namespace

extern "C" {

int MoePermuteFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 1) return 1;
  const int64_t T = shapes[0][0], h = shapes[0][1], k = shapes[1][1], N = T * k;
  const int64_t E = shapes[2][0];
  if (shapes[1][0] != T || shapes[3][0] != N || shapes[4][0] != E || shapes[5][0] != N) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const int32_t *experts = static_cast<const int32_t *>(params[1]);
  float *x_sorted = static_cast<float *>(params[3]);
  int32_t *counts = static_cast<int32_t *>(params[4]);
  int32_t *order = static_cast<int32_t *>(params[5]);
  std::vector<int64_t> next(E + 1, 0);  // pairs per expert, then each expert's next row
  for (int64_t p = 0; p < N; ++p) {
    if (experts[p] < 0 || experts[p] > E) return 1;
    ++next[experts[p]];
  }
  for (int64_t e = 0; e < E; ++e) counts[e] = static_cast<int32_t>(next[e]);
  int64_t start = 0;
  for (int64_t e = 0; e <= E; ++e) {
    const int64_t n = next[e];
    next[e] = start;
    start += n;
  }
  for (int64_t p = 0; p < N; ++p) order[next[experts[p]]++] = static_cast<int32_t>(p);
#pragma omp parallel for schedule(static) if (N * h >= kParallelLayerElems)
  for (int64_t i = 0; i < N; ++i)
    std::memcpy(x_sorted + i * h, x + (order[i] / k) * h, sizeof(float) * h);
  return 0;
}

int MoePermuteBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 2) return 1;
  const int64_t N = shapes[0][0], h = shapes[0][1], T = shapes[2][0];
  if (T == 0) return N == 0 ? 0 : 1;
  if (shapes[1][0] != N || shapes[2][1] != h || N % T) return 1;
  const int64_t k = N / T;
  const float *dy = static_cast<const float *>(params[0]);
  float *dx = static_cast<float *>(params[3]);
  std::vector<int64_t> rows;
  if (!invert(static_cast<const int32_t *>(params[1]), N, &rows)) return 1;
#pragma omp parallel for schedule(static) if (N * h >= kParallelLayerElems)
  for (int64_t t = 0; t < T; ++t) {
    float *out = dx + t * h;
    std::memcpy(out, dy + rows[t * k] * h, sizeof(float) * h);
    for (int64_t j = 1; j < k; ++j) {
      const float *src = dy + rows[t * k + j] * h;
      for (int64_t c = 0; c < h; ++c) out[c] += src[c];
    }
  }
  return 0;
}

int MoeUnpermuteFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                    void *) {
  if (ndims[0] != 2 || ndims[1] != 1 || ndims[2] != 2) return 1;
  const int64_t N = shapes[0][0], h = shapes[0][1], T = shapes[2][0], k = shapes[2][1];
  if (shapes[1][0] != N || T * k != N) return 1;
  const float *y = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  std::vector<int64_t> rows;
  if (!invert(static_cast<const int32_t *>(params[1]), N, &rows)) return 1;
#pragma omp parallel for schedule(static) if (N * h >= kParallelLayerElems)
  for (int64_t t = 0; t < T; ++t) {
    float *o = out + t * h;
    std::memset(o, 0, sizeof(float) * h);
    for (int64_t j = 0; j < k; ++j) {
      const float *src = y + rows[t * k + j] * h;
      const float weight = w[t * k + j];
      for (int64_t c = 0; c < h; ++c) o[c] += weight * src[c];
    }
  }
  return 0;
}

int MoeUnpermuteBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                    void *) {
  if (ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 1 || ndims[3] != 2) return 1;
  const int64_t T = shapes[0][0], h = shapes[0][1], N = shapes[1][0], k = shapes[3][1];
  if (shapes[1][1] != h || shapes[2][0] != N || shapes[3][0] != T || T * k != N) return 1;
  const float *dout = static_cast<const float *>(params[0]);
  const float *y = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[3]);
  float *dy = static_cast<float *>(params[4]), *dw = static_cast<float *>(params[5]);
  std::vector<int64_t> rows;
  if (!invert(static_cast<const int32_t *>(params[2]), N, &rows)) return 1;
#pragma omp parallel for schedule(static) if (N * h >= kParallelLayerElems)
  for (int64_t p = 0; p < N; ++p) {
    const float *g = dout + (p / k) * h;
    const float *src = y + rows[p] * h;
    float *d = dy + rows[p] * h;
    double dot = 0.0;
    for (int64_t c = 0; c < h; ++c) {
      d[c] = w[p] * g[c];
      dot += static_cast<double>(g[c]) * src[c];
    }
    dw[p] = static_cast<float>(dot);
  }
  return 0;
}

}  // extern "C"
