// The CPU worker threads every kernel family shares.
//
// parallel_run(n, fn, ctx) runs fn(ctx, tid, n) for tid = 0..n-1 on n threads (the calling thread is
// tid 0) and returns when all have finished. Workers are created once and live across calls, so a
// persistent kernel pays one dispatch per sequence, then one SpinBarrier::wait per time step.
// n is what Python passes (torch.get_num_threads()); it is clamped to [1, kMaxThreads]. Calls from
// two host threads are serialized; a parallel_run from inside a worker runs inline as a single thread (nthreads = 1), so
// kernels must be correct for any thread count.
//
// Everything here is compiled once at baseline level (thread_pool.cpp), never per ISA: see
// cpu_dispatch.h for why kernels must not carry their own copies of shared inline code.
#pragma once
#include <atomic>
#include <cstdint>

namespace pyseqkern {

constexpr int kMaxThreads = 256;

using TaskFn = void (*)(void* ctx, int tid, int nthreads);
void parallel_run(int nthreads, TaskFn fn, void* ctx);

// Contiguous share [begin, end) of n items for thread tid of nthreads: a fixed split, so the same
// inputs and thread count always give the same partition (determinism).
void split_range(int64_t n, int tid, int nthreads, int64_t* begin, int64_t* end);

// Sense-reversing barrier for the threads of one parallel_run; spins (with pause) then yields.
class SpinBarrier {
 public:
  explicit SpinBarrier(int nthreads) : n_(nthreads) {}
  void wait();  // out of line, compiled at baseline level

 private:
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};
  int n_;
};

// Runs `steps` barrier rounds on nthreads threads and checks that no thread passes a barrier before all
// have arrived at it (for tests).
bool barrier_selftest(int nthreads, int steps);

}  // namespace pyseqkern
