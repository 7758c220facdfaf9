// CPU kernels for mcore/fusions, called through MindSpore ops.Custom(func_type="aot").
//
// Every entry point has the aot signature: params holds the inputs then the outputs, all
// contiguous float32; shapes/ndims describe them. Rows are the product of all leading dims.
// Each function returns 0 on success, 1 on a shape it does not handle.
// The norms are in norm_kernels.cc, attention in attention_kernels.cc, SwiGLU in swiglu.cc;
// helpers shared by the files in common.h.
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "row_math.h"

namespace {

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
#pragma omp parallel for collapse(2) schedule(static) if (B * N * S * D >= kParallelLayerElems)
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

}  // extern "C"
