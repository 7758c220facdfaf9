// CPU kernels for mcore/fusions, called through MindSpore ops.Custom(func_type="aot").
//
// Every entry point has the aot signature: params holds the inputs then the outputs, all
// contiguous float32; shapes/ndims describe them. Rows are the product of all leading dims.
// Each function returns 0 on success, 1 on a shape it does not handle.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

int64_t leading(int nd, const int64_t *shape) {  // product of all dims but the last
  int64_t n = 1;
  for (int i = 0; i < nd - 1; ++i) n *= shape[i];
  return n;
}

int threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(-v)); }

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
#pragma omp parallel for collapse(2) schedule(static)
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

// x [..., H], w [H], eps [1] -> y [..., H] = w * x * rstd, rstd [...] = 1 / sqrt(mean(x^2) + eps)
int RmsNormFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = static_cast<const float *>(params[2])[0];
  float *y = static_cast<float *>(params[3]);
  float *rstd = static_cast<float *>(params[4]);
  const int64_t H = shapes[0][ndims[0] - 1], rows = leading(ndims[0], shapes[0]);
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < rows; ++n) {
    const float *xr = x + n * H;
    float *yr = y + n * H;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < H; ++j) sq += xr[j] * xr[j];
    const float r = 1.0f / std::sqrt(sq / static_cast<float>(H) + eps);
    rstd[n] = r;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yr[j] = w[j] * (xr[j] * r);
  }
  return 0;
}

// dy [..., H], x [..., H], w [H], rstd [...] -> dx [..., H], dw [H]
//   dx = rstd * (dy w) - x rstd^3 mean(dy w x);  dw = sum_rows dy x rstd
int RmsNormBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  const int64_t H = shapes[0][ndims[0] - 1], rows = leading(ndims[0], shapes[0]);
  const int nt = threads();
  std::vector<float> partial(static_cast<size_t>(nt) * H, 0.0f);
#pragma omp parallel
  {
    float *acc = partial.data() + static_cast<size_t>(thread_id()) * H;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < rows; ++n) {
      const float *dyr = dy + n * H, *xr = x + n * H;
      float *dxr = dx + n * H;
      const float r = rstd[n];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < H; ++j) dot += dyr[j] * w[j] * xr[j];
      const float coef = dot / static_cast<float>(H) * r * r * r;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        dxr[j] = r * dyr[j] * w[j] - xr[j] * coef;
        acc[j] += dyr[j] * xr[j] * r;
      }
    }
  }
  for (int64_t j = 0; j < H; ++j) {
    float s = 0.0f;
    for (int t = 0; t < nt; ++t) s += partial[static_cast<size_t>(t) * H + j];
    dw[j] = s;
  }
  return 0;
}

// y [..., 2F] = [gate | up] -> out [..., F] = silu(gate) * up
int SwiGLUFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *y = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  const int64_t F2 = shapes[0][ndims[0] - 1], rows = leading(ndims[0], shapes[0]);
  if (F2 % 2) return 1;
  const int64_t F = F2 / 2;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < rows; ++n) {
    const float *g = y + n * F2, *u = g + F;
    float *o = out + n * F;
    for (int64_t j = 0; j < F; ++j) o[j] = g[j] * sigmoid(g[j]) * u[j];
  }
  return 0;
}

// dout [..., F], y [..., 2F] -> dy [..., 2F]:
//   d gate = dout * up * sig(g) (1 + g (1 - sig(g))),  d up = dout * silu(g)
int SwiGLUBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dout = static_cast<const float *>(params[0]);
  const float *y = static_cast<const float *>(params[1]);
  float *dy = static_cast<float *>(params[2]);
  const int64_t F2 = shapes[1][ndims[1] - 1], rows = leading(ndims[1], shapes[1]);
  if (F2 % 2) return 1;
  const int64_t F = F2 / 2;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < rows; ++n) {
    const float *g = y + n * F2, *u = g + F, *d = dout + n * F;
    float *dg = dy + n * F2, *du = dg + F;
    for (int64_t j = 0; j < F; ++j) {
      const float sg = sigmoid(g[j]);
      du[j] = d[j] * g[j] * sg;
      dg[j] = d[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
    }
  }
  return 0;
}

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

}  // extern "C"
