// CPU kernels for mcore/fusions, called through MindSpore ops.Custom(func_type="aot").
//
// Every entry point has the aot signature: params holds the inputs then the outputs, all
// contiguous float32; shapes/ndims describe them. Rows are the product of all leading dims.
// Each function returns 0 on success, 1 on a shape it does not handle.
// The norms are in norm_kernels.cc, SwiGLU in swiglu.cc; helpers shared by the files in common.h.
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

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

// x [B, N, S, D], cos / sin [CB, 1, S, R] with CB in {1, B}, R even <= D -> out [B, N, S, D].
template <bool kInterleaved, bool kTranspose>
int rope(void **params, int *ndims, int64_t **shapes) {
  if (ndims[0] != 4 || ndims[1] != 4) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *cs = static_cast<const float *>(params[1]);
  const float *sn = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const int64_t B = shapes[0][0], N = shapes[0][1], S = shapes[0][2], D = shapes[0][3];
  const int64_t CB = shapes[1][0], R = shapes[1][3];
  if ((CB != 1 && CB != B) || shapes[1][2] != S || R > D || R % 2) return 1;
#pragma omp parallel for collapse(2) schedule(static) if (B * N * S * D >= kParallelElems)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t cb = CB == 1 ? 0 : b;
      for (int64_t t = 0; t < S; ++t) {
        const int64_t row = ((b * N + n) * S + t) * D;
        const int64_t crow = (cb * S + t) * R;
        rope_row<kInterleaved, kTranspose>(x + row, cs + crow, sn + crow, out + row, R, D);
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {

int RopeHalfFwd(int, void **p, int *nd, int64_t **sh, const char **, void *, void *) {
  return rope<false, false>(p, nd, sh);
}
int RopeHalfBwd(int, void **p, int *nd, int64_t **sh, const char **, void *, void *) {
  return rope<false, true>(p, nd, sh);
}
int RopeInterleavedFwd(int, void **p, int *nd, int64_t **sh, const char **, void *, void *) {
  return rope<true, false>(p, nd, sh);
}
int RopeInterleavedBwd(int, void **p, int *nd, int64_t **sh, const char **, void *, void *) {
  return rope<true, true>(p, nd, sh);
}

// Causal attention, queries aligned to the end of the keys (query i of S sees keys
// j <= i + T - S), grouped key/value heads (N % NKV == 0; query head h reads kv head
// h / (N / NKV)). Per thread: one transposed kv head [D, T] and a few rows of T scores,
// never an [S, T] matrix. Loops over keys run innermost so that they vectorise.
//   q [B, N, S, D], k / v [B, NKV, T, D], scale [1] -> out [B, N, S, D], lse [B, N, S]
int AttnCausalFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float scale = static_cast<const float *>(params[3])[0];
  float *out = static_cast<float *>(params[4]);
  float *lse = static_cast<float *>(params[5]);
  const int64_t B = shapes[0][0], N = shapes[0][1], S = shapes[0][2], D = shapes[0][3];
  const int64_t NKV = shapes[1][1], T = shapes[1][2];
  if (N % NKV || S > T || shapes[1][3] != D || shapes[2][3] != D) return 1;
  const int64_t G = N / NKV;
#pragma omp parallel if (B * N * S * T * D >= kParallelMacs)
  {
    std::vector<float> kt(static_cast<size_t>(D * T)), p(static_cast<size_t>(T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * N; ++bh) {
      const int64_t b = bh / N, h = bh % N, kvh = b * NKV + h / G;
      const float *kb = k + kvh * T * D, *vb = v + kvh * T * D;
      for (int64_t j = 0; j < T; ++j)  // [T, D] -> [D, T]
        for (int64_t e = 0; e < D; ++e) kt[e * T + j] = kb[j * D + e];
      for (int64_t i = 0; i < S; ++i) {
        const float *qi = q + (bh * S + i) * D;
        float *oi = out + (bh * S + i) * D;
        const int64_t len = i + T - S + 1;
        float *pr = p.data();
        for (int64_t j = 0; j < len; ++j) pr[j] = 0.0f;
        for (int64_t e = 0; e < D; ++e) {
          const float qe = qi[e] * scale;
          const float *ke = kt.data() + e * T;
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) pr[j] += qe * ke[j];
        }
        float mx = pr[0];
        for (int64_t j = 1; j < len; ++j) mx = pr[j] > mx ? pr[j] : mx;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; ++j) {
          pr[j] = std::exp(pr[j] - mx);
          sum += pr[j];
        }
        const float inv = 1.0f / sum;
        for (int64_t e = 0; e < D; ++e) oi[e] = 0.0f;
        for (int64_t j = 0; j < len; ++j) {
          const float *vj = vb + j * D;
          const float pj = pr[j] * inv;
#pragma omp simd
          for (int64_t e = 0; e < D; ++e) oi[e] += pj * vj[e];
        }
        lse[bh * S + i] = mx + std::log(sum);
      }
    }
  }
  return 0;
}

// Backward of AttnCausalFwd. With p_ij = exp(scale q_i.k_j - lse_i) and
// delta_i = dout_i . out_i:  dv_j = sum_i p_ij dout_i;  ds_ij = p_ij (dout_i . v_j - delta_i);
// dq_i = scale sum_j ds_ij k_j;  dk_j = scale sum_i ds_ij q_i. One task per (batch, kv head)
// owns dk / dv of that head and dq of its G query heads, so no two threads write one value.
//   dout, q [B, N, S, D], k, v [B, NKV, T, D], out [B, N, S, D], lse [B, N, S], scale [1]
//   -> dq [B, N, S, D], dk, dv [B, NKV, T, D]
int AttnCausalBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dout = static_cast<const float *>(params[0]);
  const float *q = static_cast<const float *>(params[1]);
  const float *k = static_cast<const float *>(params[2]);
  const float *v = static_cast<const float *>(params[3]);
  const float *out = static_cast<const float *>(params[4]);
  const float *lse = static_cast<const float *>(params[5]);
  const float scale = static_cast<const float *>(params[6])[0];
  float *dq = static_cast<float *>(params[7]);
  float *dk = static_cast<float *>(params[8]);
  float *dv = static_cast<float *>(params[9]);
  if (ndims[1] != 4 || ndims[2] != 4) return 1;
  const int64_t B = shapes[1][0], N = shapes[1][1], S = shapes[1][2], D = shapes[1][3];
  const int64_t NKV = shapes[2][1], T = shapes[2][2];
  if (N % NKV || S > T) return 1;
  const int64_t G = N / NKV;
  std::memset(dk, 0, sizeof(float) * B * NKV * T * D);
  std::memset(dv, 0, sizeof(float) * B * NKV * T * D);
#pragma omp parallel if (B * N * S * T * D >= kParallelMacs)
  {
    std::vector<float> kt(static_cast<size_t>(D * T)), vt(static_cast<size_t>(D * T));
    std::vector<float> p(static_cast<size_t>(T)), ds(static_cast<size_t>(T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t bkv = 0; bkv < B * NKV; ++bkv) {
      const int64_t b = bkv / NKV, kvh = bkv % NKV;
      const float *kb = k + bkv * T * D, *vb = v + bkv * T * D;
      float *dkb = dk + bkv * T * D, *dvb = dv + bkv * T * D;
      for (int64_t j = 0; j < T; ++j)  // [T, D] -> [D, T]
        for (int64_t e = 0; e < D; ++e) {
          kt[e * T + j] = kb[j * D + e];
          vt[e * T + j] = vb[j * D + e];
        }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = b * N + kvh * G + g;
        for (int64_t i = 0; i < S; ++i) {
          const int64_t row = (bh * S + i) * D;
          const float *qi = q + row, *doi = dout + row, *oi = out + row;
          float *dqi = dq + row;
          const float l = lse[bh * S + i];
          const int64_t len = i + T - S + 1;
          float delta = 0.0f;
          for (int64_t e = 0; e < D; ++e) delta += doi[e] * oi[e];
          float *pr = p.data(), *dsr = ds.data();
          for (int64_t j = 0; j < len; ++j) pr[j] = dsr[j] = 0.0f;
          for (int64_t e = 0; e < D; ++e) {  // scores and dout . v_j, vectorised over j
            const float qe = qi[e] * scale, de = doi[e];
            const float *ke = kt.data() + e * T, *ve = vt.data() + e * T;
#pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              pr[j] += qe * ke[j];
              dsr[j] += de * ve[j];
            }
          }
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            pr[j] = std::exp(pr[j] - l);
            dsr[j] = pr[j] * (dsr[j] - delta) * scale;
          }
          for (int64_t e = 0; e < D; ++e) {  // dq_i = sum_j ds_j k_j
            const float *ke = kt.data() + e * T;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < len; ++j) acc += dsr[j] * ke[j];
            dqi[e] = acc;
          }
          for (int64_t j = 0; j < len; ++j) {
            float *dkj = dkb + j * D, *dvj = dvb + j * D;
            const float pj = pr[j], dj = dsr[j];
#pragma omp simd
            for (int64_t e = 0; e < D; ++e) {
              dvj[e] += pj * doi[e];
              dkj[e] += dj * qi[e];
            }
          }
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
