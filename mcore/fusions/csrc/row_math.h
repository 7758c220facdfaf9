// Row functions shared by the kernel sources: the RMSNorm of a row (norm_kernels.cc and the
// one-token decoder layer, decode_layer.cc) and the rotary of a row (cpu_kernels.cc and
// decode_layer.cc), so the fused decode step rounds as the per-op kernels do.
#pragma once
#include <cmath>
#include <cstdint>

namespace {

// Rotary for one row of d values; pairs (i, i + r/2) (half) or (2i, 2i + 1) (interleaved).
// transpose = false: out = x * cos + rotate(x) * sin; true: its adjoint (the backward).
template <bool kInterleaved, bool kTranspose>
void rope_row(const float *x, const float *c, const float *s, float *o, int64_t r, int64_t d) {
  const int64_t half = r / 2;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t a = kInterleaved ? 2 * i : i;
    const int64_t b = kInterleaved ? 2 * i + 1 : i + half;
    const float xa = x[a], xb = x[b];
    if (!kTranspose) {  // rotate: (a, b) -> (-b, a)
      o[a] = xa * c[a] - xb * s[a];
      o[b] = xb * c[b] + xa * s[b];
    } else {
      o[a] = xa * c[a] + xb * s[b];
      o[b] = xb * c[b] - xa * s[a];
    }
  }
  for (int64_t j = r; j < d; ++j) o[j] = x[j];
}

// y = w * x * rstd for one row; returns rstd = 1 / sqrt(mean(x^2) + eps).
inline float rms_row_fwd(const float *x, const float *w, float eps, float *y, int64_t H) {
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < H; ++j) sq += x[j] * x[j];
  const float r = 1.0f / std::sqrt(sq / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) y[j] = w[j] * (x[j] * r);
  return r;
}

}  // namespace
