// The grouped matmul of mixture-of-experts layers (mcore/moe/grouped_matmul.py) through
// OpenBLAS sgemm: one product per expert over that expert's consecutive rows, so the work is
// the rows' own (the composed static form multiplies every row by every expert).
//
// Entry points (ops.Custom(func_type="aot") signature, see blas_matmul.cc; x, w, y, dy, dx, dw
// contiguous float32, counts int32):
//   GroupedMatmulFwd(x [N, in], w [E, in, out], counts [E]) -> y [N, out]
//   GroupedMatmulBwd(dy [N, out], x [N, in], w [E, in, out], counts [E]) -> dx [N, in],
//                                                                         dw [E, in, out]
// Rows [c_0 + .. + c_{e-1}, c_0 + .. + c_e) belong to expert e: y = x w[e], dx = dy w[e]^T,
// dw[e] = x^T dy over those rows. Rows past sum(counts) give zeros in y and dx; an expert with
// no rows gets a zero dw[e]. A negative count or counts summing to more than N: returns 1.
//
// Threads (BlasSetThreads, as for the backward of blas_matmul.cc): OpenBLAS runs on one
// thread; from kBlasParallelMacs multiply-adds on, the forward runs the experts in two runs
// of about equal rows on two threads, and the backward computes every dx on one thread and
// every dw on the other (equal multiply-adds). Each expert's product runs exactly as it
// would alone, so the results do not depend on the thread setting.
#include <cstdint>
#include <cstring>

#include "blas_gemm.h"

namespace {

struct Groups {
  int64_t N, in, out, E;
  const int32_t *counts;
  int64_t total;  // sum(counts): the rows that belong to an expert
};

// Shapes of x [N, in], w [E, in, out], counts [E] at params indices ix, iw, ic; false if they
// do not fit or the counts are not E values >= 0 summing to at most N.
bool read_groups(int64_t **shapes, const int *ndims, void **params, int ix, int iw, int ic,
                 Groups *g) {
  if (ndims[ix] != 2 || ndims[iw] != 3 || ndims[ic] != 1) return false;
  g->N = shapes[ix][0];
  g->in = shapes[ix][1];
  g->E = shapes[iw][0];
  g->out = shapes[iw][2];
  g->counts = static_cast<const int32_t *>(params[ic]);
  if (shapes[iw][1] != g->in || shapes[ic][0] != g->E) return false;
  g->total = 0;
  for (int64_t e = 0; e < g->E; ++e) {
    if (g->counts[e] < 0) return false;
    g->total += g->counts[e];
  }
  return g->total <= g->N;
}

bool parallel(const Groups &g) {
  return BlasGetThreads() >= 2 && g.total * g.in * g.out >= kBlasParallelMacs;
}

}  // namespace

extern "C" {

int GroupedMatmulFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                     void *) {
  Groups g;
  if (!read_groups(shapes, ndims, params, 0, 1, 2, &g)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[3]);
  const int64_t total = g.total;
  // experts [0, split) on one thread, [split, E) on the other: about half the rows each
  int64_t split = 0;
  for (int64_t rows = 0; split < g.E && 2 * (rows + g.counts[split]) <= total; ++split)
    rows += g.counts[split];
  auto experts = [=](int64_t first, int64_t last) {
    int64_t row = 0;
    for (int64_t e = 0; e < first; ++e) row += g.counts[e];
    for (int64_t e = first; e < last; ++e) {  // [c, in] x [in, out] -> [c, out]
      gemm(false, false, g.counts[e], g.out, g.in, x + row * g.in, g.in, w + e * g.in * g.out,
           g.out, y + row * g.out);
      row += g.counts[e];
    }
  };
  side_by_side(parallel(g), [=] { experts(0, split); }, [=] { experts(split, g.E); });
  std::memset(y + total * g.out, 0, sizeof(float) * (g.N - total) * g.out);
  return 0;
}

int GroupedMatmulBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                     void *) {
  Groups g;
  if (!read_groups(shapes, ndims, params, 1, 2, 3, &g)) return 1;
  if (ndims[0] != 2 || shapes[0][0] != g.N || shapes[0][1] != g.out) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[4]), *dw = static_cast<float *>(params[5]);
  const int64_t total = g.total;
  auto grad_x = [=] {
    int64_t row = 0;
    for (int64_t e = 0; e < g.E; ++e) {  // [c, out] x [in, out]^T -> [c, in]
      gemm(false, true, g.counts[e], g.in, g.out, dy + row * g.out, g.out, w + e * g.in * g.out,
           g.out, dx + row * g.in);
      row += g.counts[e];
    }
    std::memset(dx + total * g.in, 0, sizeof(float) * (g.N - total) * g.in);
  };
  auto grad_w = [=] {
    int64_t row = 0;
    for (int64_t e = 0; e < g.E; ++e) {  // [c, in]^T x [c, out] -> [in, out]; c = 0: zeros
      gemm(true, false, g.in, g.out, g.counts[e], x + row * g.in, g.in, dy + row * g.out, g.out,
           dw + e * g.in * g.out);
      row += g.counts[e];
    }
  };
  side_by_side(parallel(g), grad_x, grad_w);
  return 0;
}

}  // extern "C"
