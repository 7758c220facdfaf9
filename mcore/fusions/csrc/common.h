// Helpers shared by the kernel sources of mcore/fusions (cpu_kernels.cc, norm_kernels.cc).
// Contract of every kernel: its outputs are the same bits for any OpenMP thread count, with or
// without the one-thread rule below. A value written by one task is summed by that task in a
// fixed order; a sum over rows (the norms' weight gradient) goes through partials over blocks
// of a constant row count, summed in block order (norm_kernels.cc).
#pragma once
#include <cstdint>

namespace {

// Below these sizes a kernel runs on one thread: an OpenMP region costs a fork and a barrier,
// and on a busy machine a descheduled thread holds that barrier for a whole time slice (a tiny
// model's step measured ~4x slower with 2 threads per kernel than with 1 at load ~15).
constexpr int64_t kParallelElems = int64_t{1} << 16;  // element-wise kernels: values written
// The norms, the rotary and SwiGLU: higher, so that a prefill (a few hundred rows) runs no OpenMP
// region. After a region libgomp's idle worker spins for milliseconds (its default wait
// policy) on the core that MindSpore's next kernel, a MatMul on two threads, needs: the
// 32-token prefill of the benchmark model took 32 ms with these kernels on two threads and
// 15 ms on one (docs/performance.md, "Prefill: no OpenMP region").
constexpr int64_t kParallelLayerElems = int64_t{1} << 20;
constexpr int64_t kParallelMacs = int64_t{1} << 22;   // attention: B * N * S * T * D

inline int64_t leading(int nd, const int64_t *shape) {  // product of all dims but the last
  int64_t n = 1;
  for (int i = 0; i < nd - 1; ++i) n *= shape[i];
  return n;
}

}  // namespace
