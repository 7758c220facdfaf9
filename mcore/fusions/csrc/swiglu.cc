// SwiGLU for mcore/fusions (ops.Custom(func_type="aot") signature, see cpu_kernels.cc):
// y [..., 2F] = [gate | up] -> silu(gate) * up, and its backward. Element-wise: every output
// value is computed by one task from its own inputs, so the bits are the same for any thread
// count. The sigmoid is exp.h's (on vexp), so the loops vectorise (glibc's expf does not).
#include <cstdint>

#include "common.h"
#include "exp.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")  // where the CPU has AVX-512 (GCC's default: 256)
#endif

extern "C" {

// y [..., 2F] = [gate | up] -> out [..., F] = silu(gate) * up
int SwiGLUFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *y = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  const int64_t F2 = shapes[0][ndims[0] - 1], rows = leading(ndims[0], shapes[0]);
  if (F2 % 2) return 1;
  const int64_t F = F2 / 2;
#pragma omp parallel for schedule(static) if (rows * F2 >= kParallelLayerElems)
  for (int64_t n = 0; n < rows; ++n) {
    const float *g = y + n * F2, *u = g + F;
    float *o = out + n * F;
#pragma omp simd
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
#pragma omp parallel for schedule(static) if (rows * F2 >= kParallelLayerElems)
  for (int64_t n = 0; n < rows; ++n) {
    const float *g = y + n * F2, *u = g + F, *d = dout + n * F;
    float *dg = dy + n * F2, *du = dg + F;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const float sg = sigmoid(g[j]);
      du[j] = d[j] * g[j] * sg;
      dg[j] = d[j] * u[j] * sg * (1.0f + g[j] * (1.0f - sg));
    }
  }
  return 0;
}

}  // extern "C"
