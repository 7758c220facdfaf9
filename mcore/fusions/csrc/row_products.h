// Products of a few rows of x with a weight matrix w read once (decoding), shared by the
// small-row matmul (small_matmul.cc) and the one-token decoder layer (decode_layer.cc).
//
//   rows::multiply(x [m, k], w [n, k], y [m, n], m, k, n)     y = x w^T, m <= rows::kMaxRows
//
// Every output value is the dot product of one task, in a fixed order (partial sums over k in
// the lanes of a vector, 16 with AVX-512 and 8 with AVX2, then their horizontal sum, whose tree
// depends only on the output's place in its block), so the result is the same bits for any
// thread count. At most 4 rows of x: 16 / m
// rows of w per step, every output its own accumulator, one transposing horizontal sum for
// all 16 (few_rows); one FMA chain per row of w and a reduce per output ran at m = 2 / 4 at
// 0.7x / 0.55x of this (head shape, one thread). Reading w from L3 is the bound: ~27 GB/s per
// core, NumPy's sgemv reaches the same with two threads. 5-8 rows: each pair of w's rows with
// all the rows of x (rows_times_pair), w prefetched ahead. That is the AVX-512 form; the AVX2
// form (8-lane sums, at most 8 accumulators) and a portable loop follow it.
//
// Threads. The rows of w are cut into blocks of kBlockRows; the calling thread and the helper
// threads of a small pool claim blocks from an atomic counter until none is left. A helper
// sleeps on a condition variable between calls (no spinning: MindSpore's own thread pool and
// the other kernels share the cores; a helper that spun 20-100 us for the next product, or
// only between the products of one decoder-layer kernel, made the loaded decode step slower)
// and is woken only for a product of at least kParallelBytes of w. The hand-over is lock-free
// and the caller never sleeps: it never waits for a helper that has not started, and when it
// has claimed the last block it spins (then yields) only for the blocks in progress, so on a
// busy machine, where a helper may be descheduled, a call degrades to one thread, not to a
// stall, and an idle machine pays no wake-up of the caller after each product.
// OpenMP is not used here: its idle workers spin after a parallel region and took the cores
// MindSpore's next kernels needed (docs/performance.md "Decoding"). Helpers: the process's
// CPUs minus one, or $MSFORMERS_DECODE_THREADS - 1, read at the first parallel call. One pool
// per process (inline functions: the translation units of the library share it).
#ifndef MSFORMERS_ROW_PRODUCTS_H_
#define MSFORMERS_ROW_PRODUCTS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace rows {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kBlockRows = 64;                    // rows of w per claimed block
constexpr int64_t kParallelBytes = int64_t{1} << 20;  // w of at least 1 MB: helpers too

struct Product {
  const float *x, *w;
  float *y;
  int64_t m, k, n, blocks;
  std::atomic<int64_t> next{0};
};

#ifdef __AVX512F__
// Lane i of the result: the sum of the 16 lanes of a[i]. A transposing tree (unpack within
// 128-bit blocks, then across blocks): 45 instructions where 16 horizontal sums take ~130,
// which at 8 rows of x was a quarter of the FMAs' time.
inline __m512 sum16(const __m512 *a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // per block: (a2i lanes 0+2, a2i+1 0+2, a2i 1+3, a2i+1 1+3)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per block: the block's sum of a4i .. a4i+3
    const __m512d x = _mm512_castps_pd(b[2 * i]), z = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, z)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, z)));
  }
  for (int i = 0; i < 2; ++i)  // blocks (c2i 0+1, c2i 2+3, c2i+1 0+1, c2i+1 2+3)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                       _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// 5-8 rows of x: y[r * n + j] = x_r . w_j for the R rows of x and rows j0, j1 of w (j1 == j0:
// one row), w's rows requested kAheadFloats ahead of their loads (software prefetch). At 8
// rows a pair of w's rows takes ~8 cycles per 16 values of k, and the hardware prefetcher
// alone left the output layer [8, 512] x [32000, 512]^T waiting on memory: ~10 ms on one
// thread, ~2.7 ms with the prefetch (docs/performance.md "Batch 8").
constexpr int64_t kAheadFloats = 1024;  // 4 KB ahead: the next pair of rows when k = 512

template <int R>
inline void rows_times_pair(const float *x, const float *w0, const float *w1, int64_t k,
                            float *y, int64_t n, int64_t j0, bool pair) {
  static_assert(R > 4 && R <= kMaxRows, "the 5-8 row path");
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  const int64_t body = k & ~int64_t{15};
  for (int64_t c = 0; c < body; c += 16) {
    // a prefetch never faults: past the end of w it is dropped
    _mm_prefetch(reinterpret_cast<const char *>(w0 + c + kAheadFloats), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char *>(w1 + c + kAheadFloats), _MM_HINT_T0);
    const __m512 p = _mm512_loadu_ps(w0 + c), q = _mm512_loadu_ps(w1 + c);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_loadu_ps(x + r * k + c);
      a0[r] = _mm512_fmadd_ps(p, v, a0[r]);
      a1[r] = _mm512_fmadd_ps(q, v, a1[r]);
    }
  }
  if (body < k) {  // the last k % 16 values, masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - body)) - 1);
    const __m512 p = _mm512_maskz_loadu_ps(mask, w0 + body);
    const __m512 q = _mm512_maskz_loadu_ps(mask, w1 + body);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_maskz_loadu_ps(mask, x + r * k + body);
      a0[r] = _mm512_fmadd_ps(p, v, a0[r]);
      a1[r] = _mm512_fmadd_ps(q, v, a1[r]);
    }
  }
  if constexpr (R == 8) {  // 16 sums at once: lane 2r is x_r . w0, lane 2r + 1 is x_r . w1
    __m512 acc[16];
    for (int r = 0; r < R; ++r) acc[2 * r] = a0[r], acc[2 * r + 1] = a1[r];
    float sums[16];
    _mm512_storeu_ps(sums, sum16(acc));
    for (int r = 0; r < R; ++r) {
      y[r * n + j0] = sums[2 * r];
      if (pair) y[r * n + j0 + 1] = sums[2 * r + 1];
    }
    return;
  }
  for (int r = 0; r < R; ++r) {
    y[r * n + j0] = _mm512_reduce_add_ps(a0[r]);
    if (pair) y[r * n + j0 + 1] = _mm512_reduce_add_ps(a1[r]);
  }
}

// At most 4 rows of x: W = 16 / R rows of w per step (16, 8, 4, 4 for R = 1..4) give R * W
// independent 16-lane accumulators (one per output value, no FMA chain waits on another) and
// ONE transposing horizontal sum (sum16) for all of them; the weight is prefetched kPrefetch
// floats ahead. `count` < W: the last rows of w (the missing ones repeat the last row, their
// sums are dropped). Output (r, j) is lane r * W + j - j0 of the sum, whatever `count` is.
constexpr int64_t kPrefetch = 256;

template <int R, int W>
inline void few_rows_group(const float *x, const float *w, int64_t k, float *y, int64_t n,
                           int64_t j0, int count) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  const float *wr[W];
  for (int i = 0; i < W; ++i) wr[i] = w + (j0 + std::min(i, count - 1)) * k;
  const int64_t body = k & ~int64_t{15};
  for (int64_t c = 0; c < body; c += 16) {
    __m512 v[R];
    for (int r = 0; r < R; ++r) v[r] = _mm512_loadu_ps(x + r * k + c);
    for (int i = 0; i < W; ++i) {
      _mm_prefetch(reinterpret_cast<const char *>(wr[i] + c + kPrefetch), _MM_HINT_T0);
      const __m512 p = _mm512_loadu_ps(wr[i] + c);
      for (int r = 0; r < R; ++r) a[r * W + i] = _mm512_fmadd_ps(p, v[r], a[r * W + i]);
    }
  }
  if (body < k) {  // the last k % 16 values, masked
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - body)) - 1);
    __m512 v[R];
    for (int r = 0; r < R; ++r) v[r] = _mm512_maskz_loadu_ps(mask, x + r * k + body);
    for (int i = 0; i < W; ++i) {
      const __m512 p = _mm512_maskz_loadu_ps(mask, wr[i] + body);
      for (int r = 0; r < R; ++r) a[r * W + i] = _mm512_fmadd_ps(p, v[r], a[r * W + i]);
    }
  }
  float sums[16];
  _mm512_storeu_ps(sums, sum16(a));
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < count; ++i) y[r * n + j0 + i] = sums[r * W + i];
}

template <int R>
inline void few_rows(const Product &p, int64_t j0, int64_t j1) {
  constexpr int W = R == 1 ? 16 : R == 2 ? 8 : 4;  // kBlockRows is a multiple of W
  for (int64_t j = j0; j < j1; j += W) {
    const int count = static_cast<int>(std::min<int64_t>(W, j1 - j));
    few_rows_group<R, W>(p.x, p.w, p.k, p.y, p.n, j, count);
  }
}

template <int R>
inline void block_rows(const Product &p, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 2) {
    const bool pair = j + 1 < j1;
    const float *w0 = p.w + j * p.k;
    rows_times_pair<R>(p.x, w0, pair ? w0 + p.k : w0, p.k, p.y, p.n, j, pair);
  }
}

// Columns [j0, j1) of y.
inline void block(const Product &p, int64_t j0, int64_t j1) {
  switch (p.m) {
    case 1: few_rows<1>(p, j0, j1); break;
    case 2: few_rows<2>(p, j0, j1); break;
    case 3: few_rows<3>(p, j0, j1); break;
    case 4: few_rows<4>(p, j0, j1); break;
    case 5: block_rows<5>(p, j0, j1); break;
    case 6: block_rows<6>(p, j0, j1); break;
    case 7: block_rows<7>(p, j0, j1); break;
    default: block_rows<8>(p, j0, j1); break;
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 (16 vector registers of 8 lanes): 8-lane partial sums over k, then one transposing
// horizontal sum for 8 outputs. Lane i of the result: the sum of the 8 lanes of a[i].
inline __m256 sum8(const __m256 *a) {
  // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
  const __m256 h0 = _mm256_hadd_ps(a[0], a[1]), h1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h2 = _mm256_hadd_ps(a[4], a[5]), h3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 g0 = _mm256_hadd_ps(h0, h1);  // [a0..a3 low-half sums | a0..a3 high-half sums]
  const __m256 g1 = _mm256_hadd_ps(h2, h3);  // the same for a4..a7
  return _mm256_add_ps(_mm256_permute2f128_ps(g0, g1, 0x20), _mm256_permute2f128_ps(g0, g1, 0x31));
}

// The last k % 8 values: lanes [0, k % 8) of a load, the others zero.
inline __m256i tail_mask(int64_t left) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), lane);
}

// R <= 4 rows of x times W rows of w (R * W <= 8 accumulators, one per output value): rows
// j0 .. j0 + count - 1 of w (count < W: the last row repeats, its sums are dropped), one sum8
// for all outputs. Output (r, j) is lane r * W + i. While a group is read, the next W rows are
// prefetched at the same columns: a whole group's time ahead. Measured (AMD EPYC, AVX2, output
// layer 32000 x 512, two threads): 1 row 2.2 ms, 8 rows 3.6 ms; 256 floats ahead in the same
// row, 2.5 / 4.6 ms; the portable loop, 2.3 / 7.2 ms.

template <int R, int W>
inline void few_rows_group(const float *x, const float *w, int64_t k, float *y, int64_t n,
                           int64_t j0, int count) {
  static_assert(R * W <= 8, "one sum8");
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  const float *wr[W];
  for (int i = 0; i < W; ++i) wr[i] = w + (j0 + std::min(i, count - 1)) * k;
  auto step = [&](int64_t c, auto load) {
    __m256 v[R];
    for (int r = 0; r < R; ++r) v[r] = load(x + r * k + c);
    for (int i = 0; i < W; ++i) {
      const __m256 p = load(wr[i] + c);
      for (int r = 0; r < R; ++r) a[r * W + i] = _mm256_fmadd_ps(p, v[r], a[r * W + i]);
    }
  };
  const auto full = [](const float *s) { return _mm256_loadu_ps(s); };
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {  // one prefetch per cache line of each row of w
    for (int i = 0; i < W; ++i)  // the next W rows, at this column
      _mm_prefetch(reinterpret_cast<const char *>(wr[i] + W * k + c), _MM_HINT_T0);
    step(c, full);
    step(c + 8, full);
  }
  if (c + 8 <= k) {
    step(c, full);
    c += 8;
  }
  if (c < k) {
    const __m256i mask = tail_mask(k - c);
    step(c, [&](const float *s) { return _mm256_maskload_ps(s, mask); });
  }
  float sums[8];
  _mm256_storeu_ps(sums, sum8(a));
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < count; ++i) y[r * n + j0 + i] = sums[r * W + i];
}

// Rows [j0, j1) of w with R rows of x, W rows of w at a time.
template <int R, int W>
inline void few_rows(const float *x, const float *w, int64_t k, float *y, int64_t n, int64_t j0,
                     int64_t j1) {
  for (int64_t j = j0; j < j1; j += W)
    few_rows_group<R, W>(x, w, k, y, n, j, static_cast<int>(std::min<int64_t>(W, j1 - j)));
}

// 5-8 rows of x: per pair of w's rows, x's rows 0-3 and then the rest (the pair is in L1 for
// the second pass).
template <int R>
inline void block_rows(const Product &p, int64_t j0, int64_t j1) {
  static_assert(R > 4 && R <= kMaxRows, "the 5-8 row path");
  for (int64_t j = j0; j < j1; j += 2) {
    const int64_t j2 = std::min(j + 2, j1);
    few_rows<4, 2>(p.x, p.w, p.k, p.y, p.n, j, j2);
    few_rows<R - 4, 2>(p.x + 4 * p.k, p.w, p.k, p.y + 4 * p.n, p.n, j, j2);
  }
}

// Columns [j0, j1) of y.
inline void block(const Product &p, int64_t j0, int64_t j1) {
  switch (p.m) {
    case 1: few_rows<1, 8>(p.x, p.w, p.k, p.y, p.n, j0, j1); break;
    case 2: few_rows<2, 4>(p.x, p.w, p.k, p.y, p.n, j0, j1); break;
    case 3: few_rows<3, 2>(p.x, p.w, p.k, p.y, p.n, j0, j1); break;
    case 4: few_rows<4, 2>(p.x, p.w, p.k, p.y, p.n, j0, j1); break;
    case 5: block_rows<5>(p, j0, j1); break;
    case 6: block_rows<6>(p, j0, j1); break;
    case 7: block_rows<7>(p, j0, j1); break;
    default: block_rows<8>(p, j0, j1); break;
  }
}
#else
// Portable form: the same 16 partial sums per dot product, then their sum in lane order.
inline void block(const Product &p, int64_t j0, int64_t j1) {
  const int64_t k = p.k, body = k & ~int64_t{15};
  for (int64_t j = j0; j < j1; ++j) {
    const float *wr = p.w + j * k;
    for (int64_t r = 0; r < p.m; ++r) {
      const float *xr = p.x + r * k;
      float part[16] = {0};
      for (int64_t c = 0; c < body; c += 16)
        for (int l = 0; l < 16; ++l) part[l] += wr[c + l] * xr[c + l];
      for (int64_t c = body; c < k; ++c) part[c - body] += wr[c] * xr[c];
      float s = 0.0f;
      for (int l = 0; l < 16; ++l) s += part[l];
      p.y[r * p.n + j] = s;
    }
  }
}
#endif

// Claim and compute blocks until none is left.
inline void drain(Product &p) {
  for (int64_t b = p.next.fetch_add(1); b < p.blocks; b = p.next.fetch_add(1)) {
    const int64_t j0 = b * kBlockRows;
    block(p, j0, std::min(j0 + kBlockRows, p.n));
  }
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// Helper threads (see the file comment). Created once per process, never destroyed: the
// threads are detached and the process may exit while they sleep. The hand-over is lock-free
// (sequentially consistent atomics): the caller publishes the job and bumps the generation;
// a helper marks itself busy, then reads the job. The caller, done claiming, clears the job,
// then waits until no helper is busy: a helper that reads the job after it was cleared finds
// none, so no helper touches a finished Product.
class Pool {
 public:
  explicit Pool(int helpers) {
    for (int i = 0; i < helpers; ++i)
      std::thread([this] {
        pthread_setname_np(pthread_self(), "msf_rows");  // named in top, perf, /proc
        serve();
      }).detach();
  }

  void run(Product &p) {
    job_.store(&p);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {  // lock: a helper between its check and its wait gets the signal
      { std::lock_guard<std::mutex> lock(mu_); }
      wake_.notify_all();
    }
    drain(p);
    job_.store(nullptr);  // no helper joins from now on
    for (int spins = 0; busy_.load() != 0; ++spins)  // only blocks in progress: microseconds
      if (spins < 256) cpu_relax(); else std::this_thread::yield();
  }

 private:
  void serve() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = generation_.load();
      busy_.fetch_add(1);
      if (Product *p = job_.load()) drain(*p);
      busy_.fetch_sub(1);
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<Product *> job_{nullptr};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> busy_{0}, sleepers_{0};
};

inline int threads_wanted() {
  const char *env = std::getenv("MSFORMERS_DECODE_THREADS");
  if (env != nullptr && std::atoi(env) >= 1) return std::atoi(env);
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// The pool of this process (nullptr: one thread). A child forked from a process that had one
// gets a pool of its own (the helpers are not forked, and the parent's pool may have been
// copied mid-call, its mutex held).
inline Pool *pool() {
  static std::mutex mu;
  static Pool *instance = nullptr;
  static pid_t owner = -1;
  std::lock_guard<std::mutex> lock(mu);
  if (owner != getpid()) {
    owner = getpid();
    const int threads = threads_wanted();
    instance = threads > 1 ? new Pool(threads - 1) : nullptr;  // a forked-over pool is leaked
  }
  return instance;
}

// y = x w^T (see the file comment); m in [1, kMaxRows], n, k >= 1.
inline void multiply(const float *x, const float *w, float *y, int64_t m, int64_t k, int64_t n) {
  Product p;
  p.x = x;
  p.w = w;
  p.y = y;
  p.m = m;
  p.k = k;
  p.n = n;
  p.blocks = (n + kBlockRows - 1) / kBlockRows;
  Pool *helpers = n * k * int64_t{4} >= kParallelBytes && p.blocks > 1 ? pool() : nullptr;
  if (helpers != nullptr) {
    helpers->run(p);
  } else {
    drain(p);
  }
}

}  // namespace rows

#endif  // MSFORMERS_ROW_PRODUCTS_H_
