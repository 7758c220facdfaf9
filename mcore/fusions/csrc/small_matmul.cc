// y = x w^T for a few rows of x (decoding: one row per sequence, at most rows::kMaxRows),
// where the product is bound by reading w once (row_products.h: the products, their fixed
// summation order and the sleeping thread pool).
//
// Entry point (ops.Custom(func_type="aot") signature; inputs then outputs, contiguous float32,
// row-major; returns 0 on success, 1 on a dtype or shape it does not handle):
//   SmallMatmulNT(x [..., k], w [n, k]) -> y [..., n]      y = x w^T, rows of x <= kMaxRows
#include <cstdint>
#include <cstring>

#include "row_products.h"

extern "C" {

int SmallMatmulNT(int, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                  void *) {
  for (int i = 0; i < 3; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return 1;
  if (ndims[0] < 1 || ndims[1] != 2 || ndims[2] != ndims[0]) return 1;
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  if (shapes[1][1] != k || shapes[2][ndims[2] - 1] != n) return 1;
  int64_t m = 1;
  for (int i = 0; i < ndims[0] - 1; ++i) m *= shapes[0][i];
  if (m > rows::kMaxRows) return 1;
  float *y = static_cast<float *>(params[2]);
  if (m == 0 || n == 0) return 0;
  if (k == 0) {
    std::memset(y, 0, sizeof(float) * m * n);
    return 0;
  }
  rows::multiply(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
                 y, m, k, n);
  return 0;
}

}  // extern "C"
