// Causal attention with grouped key / value heads, forward and backward, for mcore/fusions
// (called through MindSpore ops.Custom(func_type="aot"); aot signature as in cpu_kernels.cc).
//
// Queries are aligned to the end of the keys: query i of S sees keys j <= i + T - S. Query head
// h reads kv head h / G (G = N / NKV). Work is done on tiles: the rows of a tile are the G
// query heads of one kv head at a run of query positions (so the G heads share every key
// block), the keys go in blocks of kKeys. Scores exist for one tile x one key block at a time
// (never [S, T]). The products are register-blocked, 4 rows x kBlockVectors vectors, in GCC /
// Clang vector extensions, one register per vector (tile_products.h).
//
// Forward (online softmax): per row a running max m and sum l; per key block
//   m' = max(m, max_j s_j), o = o exp(m - m') + sum_j exp(s_j - m') v_j, l likewise;
//   out = o / l, lse = m + log(l) kept for the backward.
// Backward (scores recomputed per tile from lse): p = exp(s - lse), dv_j += p_ij dout_i,
//   ds_ij = p_ij (dout_i . v_j - dout_i . out_i), dq_i += ds_ij k_j, dk_j += ds_ij q_i
//   (q pre-multiplied by the scale, dq scaled at the end).
// Same bits for any thread count (common.h): a forward task owns its tile's rows; a backward
// task owns one (batch, kv head): its dk / dv and the dq of its G query heads, all summed in a
// fixed tile and block order. The tile products are in tile_products.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "tile_products.h"

namespace {

constexpr int64_t kTileRows = 64;   // target rows per tile (G heads x positions)
constexpr float kMasked = -1.0e30f;  // score of a hidden key

// Sizes and the tiling, derived from the shapes only (never from the thread count).
struct Dims {
  int64_t B, N, S, D, NKV, T, G, Dp, Tp, nkb, positions, tiles, rows;
  Dims(const int64_t *qs, const int64_t *ks)
      : B(qs[0]), N(qs[1]), S(qs[2]), D(qs[3]), NKV(ks[1]), T(ks[2]) {
    G = N / NKV;
    Dp = round_up(D, kLanes);
    Tp = round_up(T, kKeys);
    nkb = Tp / kKeys;
    positions = G >= kTileRows ? 1 : kTileRows / G;  // query positions per tile
    tiles = (S + positions - 1) / positions;
    rows = round_up(G * positions, 4);  // rows of a tile buffer
  }
  // Keys the last position of tile t sees; rows of that tile.
  int64_t keys_of_tile(int64_t t) const { return std::min(S, (t + 1) * positions) + T - S; }
  int64_t positions_of_tile(int64_t t) const { return std::min(S - t * positions, positions); }
};

// One kv head x [T, D] as key blocks, each transposed: kt [nkb][D][kKeys], zero past T.
void pack_blocks(const float *x, const Dims &d, float *kt) {
  std::memset(kt, 0, sizeof(float) * d.nkb * d.D * kKeys);
  for (int64_t j = 0; j < d.T; ++j)
    for (int64_t e = 0; e < d.D; ++e)
      kt[(j / kKeys * d.D + e) * kKeys + j % kKeys] = x[j * d.D + e];
}

// One kv head x [T, D] as rows padded to [Tp][Dp] with zeros.
void pack_rows(const float *x, const Dims &d, float *rp) {
  std::memset(rp, 0, sizeof(float) * d.Tp * d.Dp);
  for (int64_t j = 0; j < d.T; ++j) std::memcpy(rp + j * d.Dp, x + j * d.D, sizeof(float) * d.D);
}

// Copy the tile's rows of src [B, N, S, D] (batch b, heads kvh G.., positions p0..) into
// dst [rows][Dp] times mul, zero elsewhere. Row r = g * P + i (P positions of the tile).
void gather_rows(const float *src, const Dims &d, int64_t b, int64_t kvh, int64_t p0, int64_t P,
                 float mul, float *dst) {
  std::memset(dst, 0, sizeof(float) * d.rows * d.Dp);
  for (int64_t g = 0; g < d.G; ++g)
    for (int64_t i = 0; i < P; ++i) {
      const float *s = src + ((b * d.N + kvh * d.G + g) * d.S + p0 + i) * d.D;
      float *o = dst + (g * P + i) * d.Dp;
      for (int64_t e = 0; e < d.D; ++e) o[e] = s[e] * mul;
    }
}

// Keys of block kb that the query at position pos sees (0 .. kKeys).
inline int64_t visible(const Dims &d, int64_t pos, int64_t kb) {
  const int64_t n = pos + d.T - d.S + 1 - kb * kKeys;
  return n < 0 ? 0 : (n > kKeys ? kKeys : n);
}

// One row of the online softmax over a key block: s (kKeys scores, the first `seen` visible)
// becomes exp(s - m') (0 past `seen`), m the new running max m', the lane sums l[kLanes]
// l exp(m - m') + exp(s - m'). Returns exp(m - m'), the factor of the row's output so far.
inline float softmax_step(float *s, int64_t seen, float &m, float *l) {
  const vi lane = lanes();
  const int nv = static_cast<int>((seen + kLanes - 1) / kLanes);
  vf x[kKeys / kLanes], mx = splat(m);
  for (int v = 0; v < nv; ++v) {
    const vi keep = lane + v * static_cast<int32_t>(kLanes) < static_cast<int32_t>(seen);
    x[v] = keep ? load(s + v * kLanes) : splat(kMasked);
    mx = mx > x[v] ? mx : x[v];
  }
  float top = mx[0];
  for (int i = 1; i < kLanes; ++i) top = mx[i] > top ? mx[i] : top;
  vf sum{};
  for (int v = 0; v < nv; ++v) {
    const vi keep = lane + v * static_cast<int32_t>(kLanes) < static_cast<int32_t>(seen);
    const vf p = keep ? vexp(x[v] - top) : splat(0.0f);
    store(s + v * kLanes, p);
    sum += p;
  }
  for (int v = nv; v < kKeys / kLanes; ++v) store(s + v * kLanes, splat(0.0f));
  if (nv == 0) return 1.0f;
  const float alpha = top == m ? 1.0f : std::exp(m - top);
  m = top;
  store(l, load(l) * alpha + sum);
  return alpha;
}

void forward_tile(const Dims &d, int64_t b, int64_t kvh, int64_t t, const float *q,
                  const float *kt, const float *vp, float scale, float *out, float *lse,
                  float *qs, float *s, float *o, float *m, float *l) {
  const int64_t P = d.positions_of_tile(t), p0 = t * d.positions, R = round_up(d.G * P, 4);
  gather_rows(q, d, b, kvh, p0, P, scale, qs);
  std::memset(o, 0, sizeof(float) * R * d.Dp);
  for (int64_t r = 0; r < R; ++r) m[r] = kMasked;
  std::memset(l, 0, sizeof(float) * R * kLanes);
  const int64_t keys = d.keys_of_tile(t);
  for (int64_t kb = 0; kb * kKeys < keys; ++kb) {
    const int64_t n = std::min(keys - kb * kKeys, kKeys);
    scores(qs, d.Dp, R, kt + kb * d.D * kKeys, d.D, n, s);
    for (int64_t r = 0; r < R; ++r) {
      const int64_t seen = r < d.G * P ? visible(d, p0 + r % P, kb) : 0;
      const float alpha = softmax_step(s + r * kKeys, seen, m[r], l + r * kLanes);
      if (alpha != 1.0f)
        for (int64_t e = r * d.Dp; e < (r + 1) * d.Dp; e += kLanes) store(o + e, load(o + e) * alpha);
    }
    rows_times_block(s, R, n, vp + kb * kKeys * d.Dp, d.Dp, o);
  }
  for (int64_t g = 0; g < d.G; ++g)
    for (int64_t i = 0; i < P; ++i) {
      const int64_t r = g * P + i, row = (b * d.N + kvh * d.G + g) * d.S + p0 + i;
      const float sum = hsum(load(l + r * kLanes)), inv = 1.0f / sum;
      for (int64_t e = 0; e < d.D; ++e) out[row * d.D + e] = o[r * d.Dp + e] * inv;
      lse[row] = m[r] + std::log(sum);
    }
}

// Per-thread buffers of the backward: one kv head's packed k / v and dk / dv accumulators,
// one tile's rows.
struct BwdBuffers {
  std::vector<float> kt, vt, kp, dk, dv, qs, dos, dq, p, ds, lse, delta;
  explicit BwdBuffers(const Dims &d)
      : kt(d.nkb * d.D * kKeys), vt(kt.size()), kp(d.Tp * d.Dp), dk(kp.size()), dv(kp.size()),
        qs(d.rows * d.Dp), dos(qs.size()), dq(qs.size()), p(d.rows * kKeys), ds(p.size()),
        lse(d.rows), delta(d.rows) {}
};

// p = exp(s - lse), ds = p (dp - delta) for the first `seen` keys of one row, 0 past them.
inline void probs_row(float *p, float *ds, int64_t seen, float lse, float delta) {
  const vi lane = lanes();
  for (int v = 0; v < kKeys / kLanes; ++v) {
    const vi keep = lane + v * static_cast<int32_t>(kLanes) < static_cast<int32_t>(seen);
    const vf pv = vexp(load(p + v * kLanes) - lse);
    const vf dv = pv * (load(ds + v * kLanes) - delta);
    store(p + v * kLanes, keep ? pv : splat(0.0f));
    store(ds + v * kLanes, keep ? dv : splat(0.0f));
  }
}

// dq of one tile's rows; dk / dv of the head accumulated in w.dk / w.dv.
void backward_tile(const Dims &d, int64_t b, int64_t kvh, int64_t t, const float *dout,
                   const float *q, const float *out, const float *lse, float scale, float *dq,
                   BwdBuffers &w) {
  const int64_t P = d.positions_of_tile(t), p0 = t * d.positions, R = round_up(d.G * P, 4);
  gather_rows(q, d, b, kvh, p0, P, scale, w.qs.data());
  gather_rows(dout, d, b, kvh, p0, P, 1.0f, w.dos.data());
  std::memset(w.dq.data(), 0, sizeof(float) * R * d.Dp);
  for (int64_t g = 0; g < d.G; ++g)
    for (int64_t i = 0; i < P; ++i) {
      const int64_t r = g * P + i, row = (b * d.N + kvh * d.G + g) * d.S + p0 + i;
      float delta = 0.0f;
      for (int64_t e = 0; e < d.D; ++e) delta += dout[row * d.D + e] * out[row * d.D + e];
      w.lse[r] = lse[row], w.delta[r] = delta;
    }
  const int64_t keys = d.keys_of_tile(t);
  for (int64_t kb = 0; kb * kKeys < keys; ++kb) {
    const int64_t n = std::min(keys - kb * kKeys, kKeys), block = kb * kKeys * d.Dp;
    scores(w.qs.data(), d.Dp, R, w.kt.data() + kb * d.D * kKeys, d.D, n, w.p.data());
    scores(w.dos.data(), d.Dp, R, w.vt.data() + kb * d.D * kKeys, d.D, n, w.ds.data());
    for (int64_t r = 0; r < R; ++r) {
      const int64_t seen = r < d.G * P ? visible(d, p0 + r % P, kb) : 0;
      probs_row(w.p.data() + r * kKeys, w.ds.data() + r * kKeys, seen,
                seen ? w.lse[r] : 0.0f, seen ? w.delta[r] : 0.0f);
    }
    const int64_t n4 = round_up(n, 4);
    block_times_rows(w.p.data(), R, n4, w.dos.data(), d.Dp, w.dv.data() + block);
    block_times_rows(w.ds.data(), R, n4, w.qs.data(), d.Dp, w.dk.data() + block);
    rows_times_block(w.ds.data(), R, n, w.kp.data() + block, d.Dp, w.dq.data());
  }
  for (int64_t g = 0; g < d.G; ++g)
    for (int64_t i = 0; i < P; ++i) {
      const int64_t r = g * P + i, row = (b * d.N + kvh * d.G + g) * d.S + p0 + i;
      for (int64_t e = 0; e < d.D; ++e) dq[row * d.D + e] = w.dq[r * d.Dp + e] * scale;
    }
}

bool valid(int *ndims, int64_t **shapes, int qi, int ki, int vi) {
  if (ndims[qi] != 4 || ndims[ki] != 4 || ndims[vi] != 4) return false;
  const int64_t *q = shapes[qi], *k = shapes[ki], *v = shapes[vi];
  return k[1] > 0 && q[1] % k[1] == 0 && q[2] <= k[2] && k[3] == q[3] && v[3] == q[3] &&
         k[0] == q[0] && v[0] == q[0] && v[1] == k[1] && v[2] == k[2];
}

}  // namespace

extern "C" {

//   q [B, N, S, D], k / v [B, NKV, T, D], scale [1] -> out [B, N, S, D], lse [B, N, S]
int AttnCausalFwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (!valid(ndims, shapes, 0, 1, 2)) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float scale = static_cast<const float *>(params[3])[0];
  float *out = static_cast<float *>(params[4]);
  float *lse = static_cast<float *>(params[5]);
  const Dims d(shapes[0], shapes[1]);
  if (d.B * d.N * d.S * d.D == 0) return 0;
  const int64_t heads = d.B * d.NKV;
#pragma omp parallel if (d.B * d.N * d.S * d.T * d.D >= kParallelMacs)
  {
    // This thread's copy of one kv head's k blocks and v rows, packed again when a task of
    // another head comes (tasks run head after head: a thread packs about heads / threads + 1
    // times, and the loop needs no barrier before it).
    std::vector<float> kt(d.nkb * d.D * kKeys), vp(d.Tp * d.Dp);
    std::vector<float> qs(d.rows * d.Dp), s(d.rows * kKeys), o(d.rows * d.Dp), m(d.rows),
        l(d.rows * kLanes);
    int64_t packed = -1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < heads * d.tiles; ++task) {  // per head the longest tiles first
      const int64_t h = task / d.tiles, t = d.tiles - 1 - task % d.tiles;
      if (h != packed) {
        pack_blocks(k + h * d.T * d.D, d, kt.data());
        pack_rows(v + h * d.T * d.D, d, vp.data());
        packed = h;
      }
      forward_tile(d, h / d.NKV, h % d.NKV, t, q, kt.data(), vp.data(), scale, out, lse,
                   qs.data(), s.data(), o.data(), m.data(), l.data());
    }
  }
  return 0;
}

// Backward of AttnCausalFwd; one task per (batch, kv head).
//   dout, q [B, N, S, D], k, v [B, NKV, T, D], out [B, N, S, D], lse [B, N, S], scale [1]
//   -> dq [B, N, S, D], dk, dv [B, NKV, T, D]
int AttnCausalBwd(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  if (!valid(ndims, shapes, 1, 2, 3)) return 1;
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
  const Dims d(shapes[1], shapes[2]);
  const int64_t heads = d.B * d.NKV, kv_size = d.T * d.D;
  if (d.B * d.N * d.S * d.D == 0) {
    std::memset(dk, 0, sizeof(float) * heads * kv_size);
    std::memset(dv, 0, sizeof(float) * heads * kv_size);
    return 0;
  }
#pragma omp parallel if (d.B * d.N * d.S * d.T * d.D >= kParallelMacs)
  {
    BwdBuffers w(d);
#pragma omp for schedule(dynamic, 1)
    for (int64_t h = 0; h < heads; ++h) {
      const float *kh = k + h * kv_size, *vh = v + h * kv_size;
      pack_blocks(kh, d, w.kt.data());
      pack_blocks(vh, d, w.vt.data());
      pack_rows(kh, d, w.kp.data());
      std::fill(w.dk.begin(), w.dk.end(), 0.0f);
      std::fill(w.dv.begin(), w.dv.end(), 0.0f);
      for (int64_t t = 0; t < d.tiles; ++t)
        backward_tile(d, h / d.NKV, h % d.NKV, t, dout, q, out, lse, scale, dq, w);
      for (int64_t j = 0; j < d.T; ++j) {
        std::memcpy(dk + h * kv_size + j * d.D, w.dk.data() + j * d.Dp, sizeof(float) * d.D);
        std::memcpy(dv + h * kv_size + j * d.D, w.dv.data() + j * d.Dp, sizeof(float) * d.D);
      }
    }
  }
  return 0;
}

}  // extern "C"
