// RMSNorm kernels for mcore/fusions (aot signature as in cpu_kernels.cc; float32, contiguous):
// RMSNorm alone, and the residual add fused into it (the pre-MLP norm of a decoder layer).
// The row math is shared: the fused kernel is the add followed by the same row functions.
#include <cmath>
#include <vector>

#include "common.h"
#include "row_math.h"

namespace {

// Rows per partial sum of the weight gradient: a constant, so the partition of the rows into
// blocks (and with it every rounding of dw) is the same for any thread count, for the
// one-thread rule of small tensors (common.h) and for a row range split over ranks at block
// boundaries. Each block's partial is [H] doubles: 1/16 of x's bytes at 32 rows.
constexpr int64_t kRowBlock = 32;

// dx = base + rstd (dy w) - x rstd^3 mean(dy w x) for one row (base: nullptr = 0);
// acc += dy x rstd (the row's share of dw, accumulated in double).
inline void rms_row_bwd(const float *dy, const float *x, const float *w, float r,
                        const float *base, float *dx, double *acc, int64_t H) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < H; ++j) dot += dy[j] * w[j] * x[j];
  const float coef = dot / static_cast<float>(H) * r * r * r;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    dx[j] = (base ? base[j] : 0.0f) + (r * dy[j] * w[j] - x[j] * coef);
    acc[j] += static_cast<double>(dy[j] * x[j] * r);
  }
}

// Backward over all rows: dx (plus dbase when given) row by row, and dw = sum over rows in an
// order that does not depend on the threads: rows in blocks of kRowBlock, each block summed
// in row order into its own double partial (any thread may take a block), then the partials
// summed in block order and rounded to float once.
void rms_bwd(const float *dy, const float *x, const float *w, const float *rstd,
             const float *dbase, float *dx, float *dw, int64_t rows, int64_t H) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  // [blocks, H]; at least one row, which is dw = 0 when there are no rows
  std::vector<double> partial(static_cast<size_t>(blocks > 0 ? blocks : 1) * H, 0.0);
#pragma omp parallel for schedule(static) if (rows * H >= kParallelLayerElems)
  for (int64_t b = 0; b < blocks; ++b) {
    double *acc = partial.data() + b * H;
    const int64_t end = (b + 1) * kRowBlock < rows ? (b + 1) * kRowBlock : rows;
    for (int64_t n = b * kRowBlock; n < end; ++n)
      rms_row_bwd(dy + n * H, x + n * H, w, rstd[n], dbase ? dbase + n * H : nullptr,
                  dx + n * H, acc, H);
  }
  // One thread: the partials are 1/32 of the rows' work, and a second parallel region would
  // cost one more barrier (measured 1.3x the whole backward at [8192, 512] on a loaded machine).
  double *total = partial.data();  // block 0's row collects the others, block by block
  for (int64_t b = 1; b < blocks; ++b) {
    const double *part = partial.data() + b * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) total[j] += part[j];
  }
  for (int64_t j = 0; j < H; ++j) dw[j] = static_cast<float>(total[j]);
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
#pragma omp parallel for schedule(static) if (rows * H >= kParallelLayerElems)
  for (int64_t n = 0; n < rows; ++n) rstd[n] = rms_row_fwd(x + n * H, w, eps, y + n * H, H);
  return 0;
}

// dy [..., H], x [..., H], w [H], rstd [...] -> dx [..., H], dw [H]
//   dx = rstd * (dy w) - x rstd^3 mean(dy w x);  dw = sum_rows dy x rstd
int RmsNormBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t H = shapes[0][ndims[0] - 1], rows = leading(ndims[0], shapes[0]);
  rms_bwd(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
          static_cast<const float *>(params[2]), static_cast<const float *>(params[3]), nullptr,
          static_cast<float *>(params[4]), static_cast<float *>(params[5]), rows, H);
  return 0;
}

// x, r [..., H], w [H], eps [1] -> h [..., H] = x + r, y [..., H] = RMSNorm(h), rstd [...]
int AddRmsNormFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                  void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *res = static_cast<const float *>(params[1]);
  const float *w = static_cast<const float *>(params[2]);
  const float eps = static_cast<const float *>(params[3])[0];
  float *h = static_cast<float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  float *rstd = static_cast<float *>(params[6]);
  const int64_t H = shapes[0][ndims[0] - 1], rows = leading(ndims[0], shapes[0]);
  if (ndims[1] != ndims[0] || leading(ndims[1], shapes[1]) != rows || shapes[1][ndims[1] - 1] != H)
    return 1;
#pragma omp parallel for schedule(static) if (rows * H >= kParallelLayerElems)
  for (int64_t n = 0; n < rows; ++n) {
    const float *xr = x + n * H, *rr = res + n * H;
    float *hr = h + n * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) hr[j] = xr[j] + rr[j];
    rstd[n] = rms_row_fwd(hr, w, eps, y + n * H, H);
  }
  return 0;
}

// dh, dy [..., H], h [..., H], w [H], rstd [...] -> ds [..., H] (the gradient of both
// addends), dw [H]:  ds = dh + RmsNormBwd(dy, h)
int AddRmsNormBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                  void *) {
  const int64_t H = shapes[0][ndims[0] - 1], rows = leading(ndims[0], shapes[0]);
  rms_bwd(static_cast<const float *>(params[1]), static_cast<const float *>(params[2]),
          static_cast<const float *>(params[3]), static_cast<const float *>(params[4]),
          static_cast<const float *>(params[0]), static_cast<float *>(params[5]),
          static_cast<float *>(params[6]), rows, H);
  return 0;
}

}  // extern "C"
