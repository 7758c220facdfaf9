// Register-blocked products of small tiles in GCC / Clang vector extensions, and a vectorised
// exp: the building blocks of attention_kernels.cc. Row-major float buffers; a "block" is
// kKeys keys. Every product sums in a fixed order (its loop order), whatever the caller's
// thread.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

// A vector is one machine register: 16 floats with AVX-512, 8 with AVX, 4 elsewhere (SSE,
// NEON). A wider vector type than the registers was not split into registers by GCC: with
// 16-float vectors on an AVX2 machine every multiply-add went through the stack, and the
// attention ran at ~5 GFLOP/s per core (docs/performance.md, "On an AVX2 machine").
// kBlockVectors: vectors per register block, whose 4 x kBlockVectors accumulators and
// kBlockVectors loaded vectors must fit the registers (32 with AVX-512, 16 otherwise).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int kBlockVectors = 4;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
constexpr int kBlockVectors = 2;
#else
constexpr int64_t kLanes = 4;
constexpr int kBlockVectors = 2;
#endif
constexpr int64_t kKeys = 64;  // keys per block

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float *p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float *p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return vf{} + s; }

// Lane numbers 0 .. kLanes - 1.
inline vi lanes() {
  vi lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  return lane;
}

// exp(x) to ~2 ulp (Cephes' polynomial on x - n ln2, |x - n ln2| <= ln2 / 2); 0 below -87.
inline vf vexp(vf x) {
  const vi hidden = x < -87.0f;
  x = hidden ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n
  return hidden ? splat(0.0f) : p * (vf)bits;
}

inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// c[4][kKeys] = a[4 rows, stride lda] . bt[D][kKeys] over e < D, first NV vectors of each row.
template <int NV>
void rows4_dot(const float *a, int64_t lda, const float *bt, int64_t D, float *c) {
  vf acc[4][NV] = {};
  for (int64_t e = 0; e < D; ++e) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(bt + e * kKeys + v * kLanes);
    for (int r = 0; r < 4; ++r) {
      const vf x = splat(a[r * lda + e]);
      for (int v = 0; v < NV; ++v) acc[r][v] += x * b[v];
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * kKeys + v * kLanes, acc[r][v]);
}

// c[4 rows, stride ldc][0, kLanes NV) += sum_{j < n} p[r][j] b[j][0, kLanes NV); p rows of kKeys.
template <int NV>
void rows4_axpy(const float *p, int64_t n, const float *b, int64_t ldb, float *c, int64_t ldc) {
  vf acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = load(c + r * ldc + v * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    vf x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load(b + j * ldb + v * kLanes);
    for (int r = 0; r < 4; ++r) {
      const vf w = splat(p[r * kKeys + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] += w * x[v];
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kLanes, acc[r][v]);
}

// c[4 keys, stride ldc][0, kLanes NV) += sum_{r < R} p[r][j0 + k] b[r][0, kLanes NV), k < 4.
template <int NV>
void keys4_axpy(const float *p, int64_t R, const float *b, int64_t ldb, float *c, int64_t ldc) {
  vf acc[4][NV];
  for (int k = 0; k < 4; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = load(c + k * ldc + v * kLanes);
  for (int64_t r = 0; r < R; ++r) {
    vf x[NV];
    for (int v = 0; v < NV; ++v) x[v] = load(b + r * ldb + v * kLanes);
    for (int k = 0; k < 4; ++k) {
      const vf w = splat(p[r * kKeys + k]);
      for (int v = 0; v < NV; ++v) acc[k][v] += w * x[v];
    }
  }
  for (int k = 0; k < 4; ++k)
    for (int v = 0; v < NV; ++v) store(c + k * ldc + v * kLanes, acc[k][v]);
}

// f(std::integral_constant<int, NV>) with NV = min(nv, kBlockVectors), nv >= 1: a register
// block of that many vectors.
template <typename F>
inline void with_vectors(int64_t nv, F f) {
  switch (std::min<int64_t>(nv, kBlockVectors)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// s[R][kKeys] = a[R rows, stride lda] . bt[D][kKeys], the first n keys (R % 4 == 0).
void scores(const float *a, int64_t lda, int64_t R, const float *bt, int64_t D, int64_t n,
            float *s) {
  const int64_t nv = (n + kLanes - 1) / kLanes;
  for (int64_t r = 0; r < R; r += 4)
    for (int64_t v = 0; v < nv; v += kBlockVectors) {
      const float *ar = a + r * lda, *bv = bt + v * kLanes;
      float *sr = s + r * kKeys + v * kLanes;
      with_vectors(nv - v, [&](auto block) {
        rows4_dot<decltype(block)::value>(ar, lda, bv, D, sr);
      });
    }
}

// c[R rows, stride Dp] += p[R][n keys] b[n][Dp] (Dp % kLanes == 0, R % 4 == 0).
void rows_times_block(const float *p, int64_t R, int64_t n, const float *b, int64_t Dp,
                      float *c) {
  for (int64_t r = 0; r < R; r += 4)
    for (int64_t col = 0; col < Dp; col += kBlockVectors * kLanes) {
      const float *pr = p + r * kKeys, *bc = b + col;
      float *cr = c + r * Dp + col;
      with_vectors((Dp - col) / kLanes, [&](auto nv) {
        rows4_axpy<decltype(nv)::value>(pr, n, bc, Dp, cr, Dp);
      });
    }
}

// c[n keys, stride Dp] += p[R][n]^T b[R][Dp] (n % 4 == 0 within the kKeys of p's rows).
void block_times_rows(const float *p, int64_t R, int64_t n, const float *b, int64_t Dp,
                      float *c) {
  for (int64_t j = 0; j < n; j += 4)
    for (int64_t col = 0; col < Dp; col += kBlockVectors * kLanes) {
      const float *pj = p + j, *bc = b + col;
      float *cj = c + j * Dp + col;
      with_vectors((Dp - col) / kLanes, [&](auto nv) {
        keys4_axpy<decltype(nv)::value>(pj, R, bc, Dp, cj, Dp);
      });
    }
}

}  // namespace
