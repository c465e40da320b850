// Persistent CPU workers shared by all kernels (contract in thread_pool.h).
#include "pyseqkern/thread_pool.h"

#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pyseqkern {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Idle workers spin this many pause rounds (tens of microseconds) for the next call before sleeping:
// enough for back-to-back calls, short enough not to take a core from torch's own OpenMP threads
// (which spin after every torch op, and would be slowed by ours on a small machine).
constexpr int kIdleSpinRounds = 2000;
// Inside a kernel, threads wait at a barrier for at most one time step: spin longer, then yield.
constexpr int kBarrierSpinRounds = 20000;

thread_local bool t_in_worker = false;

class Pool {
 public:
  void run(int n, TaskFn fn, void* ctx) {
    std::lock_guard<std::mutex> call_lock(call_mutex_);
    ensure_workers(n - 1);
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    // Every worker acknowledges every generation, taking part or not, so none can lag behind and
    // read the next call's fn_/n_ while still handling this one.
    remaining_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(wake_mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_cv_.notify_all();
    t_in_worker = true;
    fn(ctx, 0, n);
    t_in_worker = false;
    for (int spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kBarrierSpinRounds) cpu_relax(); else std::this_thread::yield();
    }
  }

 private:
  void ensure_workers(int count) {
    if (owner_pid_ != getpid()) {  // forked child: the parent's threads do not exist here
      for (auto& t : workers_) t.detach();
      workers_.clear();
      owner_pid_ = getpid();
    }
    while (static_cast<int>(workers_.size()) < count) {
      const int tid = static_cast<int>(workers_.size()) + 1;
      const int64_t seen = generation_.load(std::memory_order_acquire);
      workers_.emplace_back([this, tid, seen] { loop(tid, seen); });
    }
  }

  void loop(int tid, int64_t seen) {
    t_in_worker = true;
    for (;;) {
      int64_t gen;
      for (int spins = 0; (gen = generation_.load(std::memory_order_acquire)) == seen; ++spins) {
        if (spins < kIdleSpinRounds) { cpu_relax(); continue; }
        std::unique_lock<std::mutex> lk(wake_mutex_);
        wake_cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      }
      seen = gen;
      if (tid < n_) fn_(ctx_, tid, n_);
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::mutex call_mutex_;
  std::mutex wake_mutex_;
  std::condition_variable wake_cv_;
  std::vector<std::thread> workers_;
  pid_t owner_pid_ = getpid();
  alignas(64) std::atomic<int64_t> generation_{0};
  alignas(64) std::atomic<int> remaining_{0};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int n_ = 1;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may still be parked at interpreter exit
  return *p;
}

}  // namespace

void parallel_run(int nthreads, TaskFn fn, void* ctx) {
  if (nthreads < 1) nthreads = 1;
  if (nthreads > kMaxThreads) nthreads = kMaxThreads;
  if (nthreads == 1 || t_in_worker) {  // nested: one thread, so a kernel's barriers cannot deadlock
    fn(ctx, 0, 1);
    return;
  }
  pool().run(nthreads, fn, ctx);
}

void split_range(int64_t n, int tid, int nthreads, int64_t* begin, int64_t* end) {
  const int64_t base = n / nthreads, extra = n % nthreads;
  *begin = tid * base + (tid < extra ? tid : extra);
  *end = *begin + base + (tid < extra ? 1 : 0);
}

void SpinBarrier::wait() {
  const int gen = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    return;
  }
  for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
    if (spins < kBarrierSpinRounds) cpu_relax(); else std::this_thread::yield();
  }
}

}  // namespace pyseqkern
