// Register-blocked products of small tiles in GCC / Clang vector extensions (16 floats per
// vector: AVX-512 with -march=native, narrower vectors elsewhere), and a vectorised exp: the
// building blocks of attention_kernels.cc. Row-major float buffers; a "block" is kKeys keys.
// Every product sums in a fixed order (its loop order), whatever the caller's thread.
#pragma once
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;  // floats per vector
constexpr int64_t kKeys = 64;   // keys per block: 4 vectors

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float *p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float *p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float s) { return vf{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

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

// c[4 rows, stride ldc][0, 16 NV) += sum_{j < n} p[r][j] b[j][0, 16 NV); p rows of kKeys.
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

// c[4 keys, stride ldc][0, 16 NV) += sum_{r < R} p[r][j0 + k] b[r][0, 16 NV), k < 4.
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

// s[R][kKeys] = a[R rows, stride lda] . bt[D][kKeys], the first n keys (R % 4 == 0).
void scores(const float *a, int64_t lda, int64_t R, const float *bt, int64_t D, int64_t n,
            float *s) {
  const int64_t nv = (n + kLanes - 1) / kLanes;
  for (int64_t r = 0; r < R; r += 4) {
    const float *ar = a + r * lda;
    float *sr = s + r * kKeys;
    if (nv == 1) rows4_dot<1>(ar, lda, bt, D, sr);
    else if (nv == 2) rows4_dot<2>(ar, lda, bt, D, sr);
    else if (nv == 3) rows4_dot<3>(ar, lda, bt, D, sr);
    else rows4_dot<4>(ar, lda, bt, D, sr);
  }
}

// c[R rows, stride Dp] += p[R][n keys] b[n][Dp] (Dp % 16 == 0, R % 4 == 0).
void rows_times_block(const float *p, int64_t R, int64_t n, const float *b, int64_t Dp,
                      float *c) {
  for (int64_t r = 0; r < R; r += 4)
    for (int64_t col = 0; col < Dp; col += 4 * kLanes) {
      const float *pr = p + r * kKeys, *bc = b + col;
      float *cr = c + r * Dp + col;
      const int64_t nv = (Dp - col) / kLanes;
      if (nv == 1) rows4_axpy<1>(pr, n, bc, Dp, cr, Dp);
      else if (nv == 2) rows4_axpy<2>(pr, n, bc, Dp, cr, Dp);
      else if (nv == 3) rows4_axpy<3>(pr, n, bc, Dp, cr, Dp);
      else rows4_axpy<4>(pr, n, bc, Dp, cr, Dp);
    }
}

// c[n keys, stride Dp] += p[R][n]^T b[R][Dp] (n % 4 == 0 within the kKeys of p's rows).
void block_times_rows(const float *p, int64_t R, int64_t n, const float *b, int64_t Dp,
                      float *c) {
  for (int64_t j = 0; j < n; j += 4)
    for (int64_t col = 0; col < Dp; col += 4 * kLanes) {
      const float *pj = p + j, *bc = b + col;
      float *cj = c + j * Dp + col;
      const int64_t nv = (Dp - col) / kLanes;
      if (nv == 1) keys4_axpy<1>(pj, R, bc, Dp, cj, Dp);
      else if (nv == 2) keys4_axpy<2>(pj, R, bc, Dp, cj, Dp);
      else if (nv == 3) keys4_axpy<3>(pj, R, bc, Dp, cj, Dp);
      else keys4_axpy<4>(pj, R, bc, Dp, cj, Dp);
    }
}

}  // namespace
