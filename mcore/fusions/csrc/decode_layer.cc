// One decoder layer for ONE new token per sequence over a static KV cache, float32, in one call:
// the 1-token step of a Llama-style dense layer (mcore.transformer.layer.TransformerLayer with
// RMSNorm, a fused q|k|v projection, half-split rotary, grouped-query attention, SwiGLU MLP, no
// biases, tp = 1). The composed reference is that layer's construct with a StaticKVCache.
//
// Entry point (ops.Custom(func_type="aot") signature; inputs then outputs, contiguous, row-major;
// returns 0 on success, 1 on a dtype or shape it does not handle):
//   DecodeLayerStep(x [b, 1, h], cos, sin [b, 1, 1, r], key_mask [b, T] int32,
//                   position [] or [1] int32, k_cache, v_cache [b, n_kv, T, d] (written in place),
//                   w_in [h], w_qkv [(n + 2 n_kv) d, h], w_proj [h, n d], w_mlp_norm [h],
//                   w_fc1 [2 f, h], w_fc2 [h, f], scalars [3] = (eps_in, eps_mlp, softmax scale))
//     -> out [b, 1, h]
//
//   a   = RMSNorm(x; w_in)                       qkv = a w_qkv^T, split into n, n_kv, n_kv heads
//   q, k rotated on their first r dims (cos, sin: halves [f0..f(r/2-1), f0..f(r/2-1)])
//   k_cache[:, :, position] = k; v_cache[:, :, position] = v
//   attention of each query head over the keys j of its group (j <= position, key_mask[j] > 0
//   and, when the query's own key_mask[position] is a segment id > 0, the same id); when no key
//   is kept, the average of all T values (the composed softmax over equal masked scores)
//   h1  = x + attn w_proj^T;   m = RMSNorm(h1; w_mlp_norm)
//   out = h1 + (silu(g) * u) w_fc2^T with [g | u] = m w_fc1^T
//
// The products read each weight once (row_products.h, its sleeping thread pool); the norms,
// the rotary and the SwiGLU activation are the per-op kernels' row functions (row_math.h,
// exp.h); everything else runs on the calling thread in a fixed order: the same bits for any
// thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "exp.h"
#include "row_math.h"
#include "row_products.h"

namespace {

// RMSNorm of m rows of width h (row_math.h's row, as the RMSNorm kernel computes it).
void rms_norm(const float *x, const float *w, float *y, int64_t m, int64_t h, float eps) {
  for (int64_t r = 0; r < m; ++r) rms_row_fwd(x + r * h, w, eps, y + r * h, h);
}

// a . b over d values: 16 lane sums (lane l takes the values l, l + 16, ...), then their sum.
// The score of a key was one chain of d dependent scalar multiply-adds.
inline float dot_lanes(const float *a, const float *b, int64_t d) {
#ifdef __AVX512F__
  __m512 acc = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= d; c += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
  if (c < d) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (d - c)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + c), _mm512_maskz_loadu_ps(mask, b + c),
                          acc);
  }
  return _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7, 8-15
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), lo);
    hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(b + c + 8), hi);
  }
  float part[16];
  _mm256_storeu_ps(part, lo);
  _mm256_storeu_ps(part + 8, hi);
  for (int l = 0; c + l < d; ++l) part[l] = std::fma(a[c + l], b[c + l], part[l]);
  const __m256 s = _mm256_add_ps(_mm256_loadu_ps(part), _mm256_loadu_ps(part + 8));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_movehdup_ps(e)));
#else
  float part[16] = {0.0f};
  int64_t c = 0;
  for (; c + 16 <= d; c += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[c + l] * b[c + l];
  for (int l = 0; c + l < d; ++l) part[l] += a[c + l] * b[c + l];
  float sum = 0.0f;
  for (int l = 0; l < 16; ++l) sum += part[l];
  return sum;
#endif
}

// out += p * v over d values, one fused multiply-add per value (the compiler left the loop
// scalar).
inline void add_scaled(float p, const float *v, float *out, int64_t d) {
  int64_t c = 0;
#ifdef __AVX512F__
  const __m512 scale = _mm512_set1_ps(p);
  for (; c + 16 <= d; c += 16)
    _mm512_storeu_ps(out + c, _mm512_fmadd_ps(scale, _mm512_loadu_ps(v + c),
                                              _mm512_loadu_ps(out + c)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 scale = _mm256_set1_ps(p);
  for (; c + 8 <= d; c += 8)
    _mm256_storeu_ps(out + c, _mm256_fmadd_ps(scale, _mm256_loadu_ps(v + c),
                                              _mm256_loadu_ps(out + c)));
#endif
  for (; c < d; ++c) out[c] = std::fma(p, v[c], out[c]);
}

struct Shapes {
  int64_t b, h, r, t, n, n_kv, d, f;
};

// Attention of row `row`'s n query heads (q [n, d]) over its cache: out [n, d].
void attend(const Shapes &s, int64_t row, const float *q, const float *keys, const float *vals,
            const int32_t *mask, int64_t pos, float scale, float *out, float *scores) {
  const int64_t group = s.n / s.n_kv, d = s.d, t = s.t;
  const int32_t *seg = mask + row * t;
  const int32_t seg_q = seg[pos];
  for (int64_t head = 0; head < s.n; ++head) {
    const int64_t g = head / group;
    const float *kg = keys + ((row * s.n_kv + g) * t) * d;
    const float *vg = vals + ((row * s.n_kv + g) * t) * d;
    const float *qh = q + head * d;
    float *oh = out + head * d;
    float best = -INFINITY;
    int64_t kept = 0;
    for (int64_t j = 0; j <= pos; ++j) {
      const bool keep = seg[j] > 0 && (seg_q <= 0 || seg[j] == seg_q);
      if (!keep) {
        scores[j] = -INFINITY;
        continue;
      }
      scores[j] = dot_lanes(qh, kg + j * d, d) * scale;
      best = std::max(best, scores[j]);
      ++kept;
    }
    std::fill(oh, oh + d, 0.0f);
    if (kept == 0) {  // every score masked: the composed softmax is uniform over all T keys
      for (int64_t j = 0; j < t; ++j) add_scaled(1.0f, vg + j * d, oh, d);
      for (int64_t c = 0; c < d; ++c) oh[c] /= float(t);
      continue;
    }
    float total = 0.0f;
    for (int64_t j = 0; j <= pos; ++j) {
      if (scores[j] == -INFINITY) continue;
      const float p = std::exp(scores[j] - best);
      total += p;
      add_scaled(p, vg + j * d, oh, d);
    }
    const float inv = 1.0f / total;
    for (int64_t c = 0; c < d; ++c) oh[c] *= inv;
  }
}

bool is(const char *dtype, const char *want) { return std::strcmp(dtype, want) == 0; }

}  // namespace

extern "C" {

int DecodeLayerStep(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                    void *, void *) {
  if (nparam != 15) return 1;
  for (int i = 0; i < 15; ++i)
    if (!(i == 3 || i == 4 ? is(dtypes[i], "int32") : is(dtypes[i], "float32"))) return 1;
  if (ndims[0] != 3 || ndims[1] != 4 || ndims[3] != 2 || ndims[5] != 4 || ndims[8] != 2 ||
      ndims[9] != 2 || ndims[11] != 2 || ndims[12] != 2)
    return 1;
  Shapes s;
  s.b = shapes[0][0];
  s.h = shapes[0][2];
  s.r = shapes[1][3];
  s.n_kv = shapes[5][1];
  s.t = shapes[5][2];
  s.d = shapes[5][3];
  s.n = s.d > 0 ? shapes[9][1] / s.d : 0;
  s.f = shapes[12][1];
  const int64_t width = (s.n + 2 * s.n_kv) * s.d;
  if (shapes[0][1] != 1 || s.b < 1 || s.b > rows::kMaxRows || s.n_kv < 1 || s.n % s.n_kv ||
      s.r > s.d || s.r % 2 || shapes[1][0] != s.b || shapes[3][0] != s.b ||
      shapes[3][1] != s.t || shapes[5][0] != s.b || shapes[8][0] != width ||
      shapes[8][1] != s.h || shapes[9][0] != s.h || shapes[9][1] != s.n * s.d ||
      shapes[11][0] != 2 * s.f || shapes[11][1] != s.h || shapes[12][0] != s.h)
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *cos = static_cast<const float *>(params[1]);
  const float *sin = static_cast<const float *>(params[2]);
  const int32_t *mask = static_cast<const int32_t *>(params[3]);
  const int64_t pos = *static_cast<const int32_t *>(params[4]);
  float *keys = static_cast<float *>(params[5]);
  float *vals = static_cast<float *>(params[6]);
  const float *w_in = static_cast<const float *>(params[7]);
  const float *w_qkv = static_cast<const float *>(params[8]);
  const float *w_proj = static_cast<const float *>(params[9]);
  const float *w_mlp = static_cast<const float *>(params[10]);
  const float *w_fc1 = static_cast<const float *>(params[11]);
  const float *w_fc2 = static_cast<const float *>(params[12]);
  const float *scalars = static_cast<const float *>(params[13]);
  float *out = static_cast<float *>(params[14]);
  if (pos < 0 || pos >= s.t) return 1;
  const int64_t b = s.b, h = s.h, d = s.d, nd = s.n * d, kvd = s.n_kv * d;

  std::vector<float> normed(b * h), qkv(b * width), attn(b * nd), h1(b * h);
  std::vector<float> gate_up(b * 2 * s.f), act(b * s.f), scores(s.t);
  rms_norm(x, w_in, normed.data(), b, h, scalars[0]);
  rows::multiply(normed.data(), w_qkv, qkv.data(), b, h, width);  // [b, h] -> [b, (n+2n_kv) d]
  for (int64_t row = 0; row < b; ++row) {
    float *q = qkv.data() + row * width;  // heads q (n), k (n_kv), v (n_kv) of this row
    for (int64_t head = 0; head < s.n + s.n_kv; ++head)  // q and k rotated in place
      rope_row<false, false>(q + head * d, cos + row * s.r, sin + row * s.r, q + head * d, s.r, d);
    for (int64_t g = 0; g < s.n_kv; ++g) {  // slot `pos` of [b, n_kv, T, d]
      const int64_t at = ((row * s.n_kv + g) * s.t + pos) * d;
      std::memcpy(keys + at, q + nd + g * d, sizeof(float) * d);
      std::memcpy(vals + at, q + nd + kvd + g * d, sizeof(float) * d);
    }
    attend(s, row, q, keys, vals, mask, pos, scalars[2], attn.data() + row * nd, scores.data());
  }
  rows::multiply(attn.data(), w_proj, h1.data(), b, nd, h);  // [b, n d] -> [b, h]
  for (int64_t i = 0; i < b * h; ++i) h1[i] += x[i];
  rms_norm(h1.data(), w_mlp, normed.data(), b, h, scalars[1]);
  rows::multiply(normed.data(), w_fc1, gate_up.data(), b, h, 2 * s.f);  // [b, h] -> [b, 2f]
  for (int64_t row = 0; row < b; ++row)
    for (int64_t c = 0; c < s.f; ++c) {
      const float g = gate_up[row * 2 * s.f + c], u = gate_up[row * 2 * s.f + s.f + c];
      act[row * s.f + c] = g * sigmoid(g) * u;  // as the SwiGLU kernel
    }
  rows::multiply(act.data(), w_fc2, out, b, s.f, h);  // [b, f] -> [b, h]
  for (int64_t i = 0; i < b * h; ++i) out[i] += h1[i];
  return 0;
}

}  // extern "C"
