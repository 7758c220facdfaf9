// Cross-entropy over the vocabulary for mcore/fusions (ops.Custom(func_type="aot") signature,
// see cpu_kernels.cc). Rows are the product of the leading dims of the logits; labels hold
// one int32 or int64 per row. A label outside [0, V) marks an ignored row: loss 0, gradient 0.
// The forward keeps only the per-row log-sum-exp; the backward rebuilds the softmax from it
// while writing the gradient, so no vocabulary-sized buffer exists besides logits and grad.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

int64_t rows_of(int nd, const int64_t *shape) {  // product of all dims but the last
  int64_t n = 1;
  for (int i = 0; i < nd - 1; ++i) n *= shape[i];
  return n;
}

int64_t label_at(const void *labels, bool wide, int64_t row) {
  return wide ? static_cast<const int64_t *>(labels)[row]
              : static_cast<const int32_t *>(labels)[row];
}

bool wide_labels(const char *dtype) { return std::strcmp(dtype, "int64") == 0; }

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
  const int64_t V = shapes[0][ndims[0] - 1], N = rows_of(ndims[0], shapes[0]);
  if (V <= 0 || rows_of(ndims[1] + 1, shapes[1]) != N) return 1;  // one label per row
  const bool wide = wide_labels(dtypes[1]);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float *zr = z + n * V;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) m = zr[v] > m ? zr[v] : m;
    double sum = 0.0;  // double: a 1e5-long sum of fp32 terms keeps full fp32 precision
    for (int64_t v = 0; v < V; ++v) sum += std::exp(zr[v] - m);
    const float lse_shift = static_cast<float>(std::log(sum));
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
  const int64_t V = shapes[0][ndims[0] - 1], N = rows_of(ndims[0], shapes[0]);
  if (V <= 0 || rows_of(ndims[1] + 1, shapes[1]) != N) return 1;
  const bool wide = wide_labels(dtypes[1]);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float *zr = z + n * V;
    float *gr = grad + n * V;
    const int64_t y = label_at(labels, wide, n);
    const bool valid = y >= 0 && y < V;
    const float g = valid ? dloss[n] : 0.0f, scale = g + dlse[n], shift = lse[n];
    for (int64_t v = 0; v < V; ++v) gr[v] = std::exp(zr[v] - shift) * scale;
    if (valid) gr[y] -= g;
  }
  return 0;
}

}  // extern "C"
