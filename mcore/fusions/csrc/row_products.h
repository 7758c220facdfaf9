// Products of a few rows of x with a weight matrix w read once (decoding), shared by the
// small-row matmul (small_matmul.cc) and the one-token decoder layer (decode_layer.cc).
//
//   rows::multiply(x [m, k], w [n, k], y [m, n], m, k, n)     y = x w^T, m <= rows::kMaxRows
//
// Every output value is the dot product of one task, in a fixed order (16-lane partial sums
// over k, then their horizontal sum), so the result is the same bits for any thread count.
//
// Threads. The rows of w are cut into blocks of kBlockRows; the calling thread and the helper
// threads of a small pool claim blocks from an atomic counter until none is left. A helper
// sleeps on a condition variable between calls (no spinning: MindSpore's own thread pool and
// the other kernels share the cores) and is woken only for a product of at least
// kParallelBytes of w. The caller never waits for a helper that has not started: when it has
// claimed the last block it only waits for the blocks in progress, so on a busy machine,
// where a helper may be descheduled, a call degrades to one thread, not to a stall.
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

#include <sched.h>
#include <unistd.h>

#ifdef __AVX512F__
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

// The same products for 5-8 rows of x, with w's rows requested kAheadFloats ahead of their
// loads (software prefetch). At 8 rows a pair of w's rows takes ~8 cycles per 16 values of k,
// and the hardware prefetcher alone left the output layer [8, 512] x [32000, 512]^T waiting
// on memory: ~10 ms on one thread, ~2.7 ms with the prefetch (docs/performance.md
// "Decoding"). The order of every sum is rows_times_pair's: the same bits.
constexpr int64_t kAheadFloats = 1024;  // 4 KB ahead: the next pair of rows when k = 512

template <int R>
inline void rows_times_pair_ahead(const float *x, const float *w0, const float *w1, int64_t k,
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

// y[r * n + j] = x_r . w_j for the R rows of x and rows j0, j1 of w (j1 == j0: one row).
template <int R>
inline void rows_times_pair(const float *x, const float *w0, const float *w1, int64_t k,
                            float *y, int64_t n, int64_t j0, bool pair) {
  __m512 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  const int64_t body = k & ~int64_t{15};
  for (int64_t c = 0; c < body; c += 16) {
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

template <int R>
inline void block_rows(const Product &p, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 2) {
    const bool pair = j + 1 < j1;
    const float *w0 = p.w + j * p.k;
    if constexpr (R > 4)  // 5-8 rows: the same sums, w prefetched
      rows_times_pair_ahead<R>(p.x, w0, pair ? w0 + p.k : w0, p.k, p.y, p.n, j, pair);
    else
      rows_times_pair<R>(p.x, w0, pair ? w0 + p.k : w0, p.k, p.y, p.n, j, pair);
  }
}

// Columns [j0, j1) of y.
inline void block(const Product &p, int64_t j0, int64_t j1) {
  switch (p.m) {
    case 1: block_rows<1>(p, j0, j1); break;
    case 2: block_rows<2>(p, j0, j1); break;
    case 3: block_rows<3>(p, j0, j1); break;
    case 4: block_rows<4>(p, j0, j1); break;
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

// Sleeping helper threads (see the file comment). Created once per process, never destroyed:
// the threads are detached and the process may exit while they sleep.
class Pool {
 public:
  explicit Pool(int helpers) {
    for (int i = 0; i < helpers; ++i) std::thread([this] { serve(); }).detach();
  }

  void run(Product &p) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &p;
      ++generation_;
    }
    wake_.notify_all();
    drain(p);
    std::unique_lock<std::mutex> lock(mu_);
    job_ = nullptr;  // no helper joins from now on
    done_.wait(lock, [this] { return busy_ == 0; });
  }

 private:
  void serve() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      Product *p = job_;
      if (p == nullptr) continue;  // the caller finished before this helper woke
      ++busy_;
      lock.unlock();
      drain(*p);
      lock.lock();
      if (--busy_ == 0) done_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_, done_;
  Product *job_ = nullptr;
  uint64_t generation_ = 0;
  int busy_ = 0;
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
