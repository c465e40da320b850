// The CPU threads every kernel family shares.
//
// parallel_run(n, fn, ctx) runs fn(ctx, team) on a team of threads and returns when all have finished;
// team.tid is 0..team.size-1 and team.sync() is a barrier across the team. team.size is n, or fewer
// (1 when called from inside a team, or when the runtime grants fewer): kernels must partition work
// by team.size and be correct (and bitwise equal, for determinism) for any size.
//
// Which threads: torch's own OpenMP team when torch's libgomp is loaded in the process (found at run
// time; the core still never links torch), otherwise persistent workers of our own. On a small machine
// two pools fight: torch's OpenMP threads spin after every torch op (our op starts with one, the input
// GEMM), and a worker of ours that needs the same core loses most of a time step to them (DESIGN.md).
// PYSEQKERN_THREADS=own forces our own workers; a forked child always uses them (libgomp is not
// fork-safe). n comes from Python (torch.get_num_threads()), clamped to [1, kMaxThreads].
//
// Everything here is compiled once at baseline level (thread_pool.cpp), never per ISA: see
// cpu_dispatch.h for why kernels must not carry their own copies of shared inline code.
#pragma once
#include <atomic>
#include <cstdint>

namespace pyseqkern {

constexpr int kMaxThreads = 256;

// Sense-reversing barrier for the threads of one team; spins (with pause) then yields.
class SpinBarrier {
 public:
  explicit SpinBarrier(int nthreads) : n_(nthreads) {}
  void wait();  // out of line, compiled at baseline level
  // The barrier in two halves: arrive() counts this thread in and returns a token; wait_for(token)
  // returns once every thread has arrived. Between them a thread may do work that neither reads what
  // the others write before they arrive nor writes what they read: waiting for a slower thread then
  // overlaps that work.
  int arrive();
  void wait_for(int token);

 private:
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<int> generation_{0};  // also the futex word waiters sleep on
  std::atomic<int> sleepers_{0};
  int n_;
};

struct Team {
  int tid;
  int size;
  SpinBarrier* barrier;
  void sync() const { barrier->wait(); }
  int arrive() const { return barrier->arrive(); }
  void wait_for(int token) const { barrier->wait_for(token); }
};

using TaskFn = void (*)(void* ctx, const Team& team);
// Throws std::bad_alloc (after every thread has finished) where a thread of the team was refused its
// thread_scratch: the call fails rather than return results whose bits depend on memory being short.
void parallel_run(int nthreads, TaskFn fn, void* ctx);

// This thread's scratch for a kernel (the tile unit's staged rows): at least `bytes`, 64-byte aligned,
// kept and grown across calls, valid until this thread's next request. Null where it cannot be had; the
// kernel must then still finish (on another path, reading nothing it lacks), and the parallel_run
// around it throws once the team is done. Called outside parallel_run, null is the caller's to handle.
void* thread_scratch(int64_t bytes);
// For tests: scratch requests of more than `bytes` are refused (-1, the default: none are).
void set_thread_scratch_limit(int64_t bytes);

// Contiguous share [begin, end) of n items for thread tid of nthreads: a fixed split, so the same
// inputs and thread count always give the same partition (determinism).
void split_range(int64_t n, int tid, int nthreads, int64_t* begin, int64_t* end);

// "openmp (<library>)" or "own": where the next parallel_run will run.
const char* thread_backend();
// Forces our own workers (true) or allows torch's OpenMP team again (false).
void set_own_threads(bool own);

// Runs `steps` barrier rounds on nthreads threads (every other one through arrive and wait_for, with work
// between them) and checks that no thread passes a barrier before all have arrived at it (for tests).
bool barrier_selftest(int nthreads, int steps);

}  // namespace pyseqkern
