// Persistent CPU workers shared by all kernels (contract in thread_pool.h).
#include "pyseqkern/thread_pool.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

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
// Inside a kernel a barrier wait lasts at most one time step: spin about as long, then yield, so a
// partner thread that lost its core (an oversubscribed machine) gets it back at once. If it is still
// not back after kBarrierYieldRounds yields, sleep on a futex: on a machine busy with other processes
// (a compiler on both cores) yielding alone left an LSTM layer 60x slower, each step waiting out the
// scheduler's time slice while the waiter kept taking turns on the core its partner needed.
constexpr int kBarrierSpinRounds = 2000;
constexpr int kBarrierYieldRounds = 50;

#if defined(__linux__)
void futex_wait(std::atomic<int>* word, int expected) {
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<int>* word) {
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}
#endif

thread_local bool t_in_worker = false;

struct Scratch {
  void* p = nullptr;
  int64_t cap = 0;
  bool refused = false;  // a request refused since this thread's task began
  ~Scratch() { std::free(p); }
};
thread_local Scratch t_scratch;
std::atomic<int64_t> g_scratch_limit{-1};

// Runs one thread's task and reports whether a scratch request was refused during it.
bool run_task(TaskFn fn, void* ctx, const Team& team) {
  t_scratch.refused = false;
  fn(ctx, team);
  return t_scratch.refused;
}

[[noreturn]] void throw_scratch_refused() {
  struct Refused : std::bad_alloc {
    const char* what() const noexcept override {
      return "pyseqkern: a kernel thread could not allocate its scratch memory (the call computed nothing "
             "usable; free memory and call again)";
    }
  };
  throw Refused();
}

using RawFn = void (*)(void* ctx, int tid, int nthreads);

class Pool {
 public:
  void run(int n, RawFn fn, void* ctx) {
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
  alignas(64) std::atomic<int64_t> generation_{0};
  alignas(64) std::atomic<int> remaining_{0};
  RawFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int n_ = 1;
};

// The pool is never destroyed: workers may still be parked at interpreter exit. A forked child (a
// DataLoader worker, say) gets a new one: the parent's threads do not exist there, and the mutex and
// condition variable they used may have been copied in a locked or waited-on state. The old pool is
// leaked untouched, since joining, detaching or unlocking would act on another process's threads.
std::atomic<Pool*> g_pool{nullptr};
std::mutex* g_pool_mutex = new std::mutex();

std::atomic<bool> g_forked_child{false};  // set in a forked child: never use libgomp there

// A forked child gets a new pool and never uses torch's OpenMP team (libgomp is not fork-safe).
void after_fork_in_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
  g_pool_mutex = new std::mutex();
  g_forked_child.store(true);
}

const int g_atfork_registered = pthread_atfork(nullptr, nullptr, &after_fork_in_child);

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  std::lock_guard<std::mutex> lk(*g_pool_mutex);
  p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    p = new Pool();
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

// ---- torch's OpenMP team ------------------------------------------------------------------------------
// libgomp as torch loaded it (bundled under a hashed name, loaded privately): found among the loaded
// objects and opened with RTLD_NOLOAD, so nothing is loaded that torch did not load itself.
struct Gomp {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
  std::string name;
};

int find_gomp(struct dl_phdr_info* info, size_t, void* out) {
  const char* path = info->dlpi_name;
  if (path == nullptr || std::strstr(path, "libgomp") == nullptr) return 0;
  void* h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return 0;
  Gomp* g = static_cast<Gomp*>(out);
  g->parallel = reinterpret_cast<decltype(g->parallel)>(dlsym(h, "GOMP_parallel"));
  g->thread_num = reinterpret_cast<int (*)()>(dlsym(h, "omp_get_thread_num"));
  g->num_threads = reinterpret_cast<int (*)()>(dlsym(h, "omp_get_num_threads"));
  if (!g->parallel || !g->thread_num || !g->num_threads) {
    *g = Gomp();
    return 0;
  }
  const char* slash = std::strrchr(path, '/');
  g->name = slash ? slash + 1 : path;
  return 1;
}

// Looked up on every call until found: torch may be imported after pyseqkern's core is loaded.
std::atomic<const Gomp*> g_gomp{nullptr};
std::atomic<bool> g_own_threads{false};

const Gomp* gomp() {
  if (g_own_threads.load(std::memory_order_relaxed) || g_forked_child.load(std::memory_order_relaxed)) return nullptr;
  const Gomp* g = g_gomp.load(std::memory_order_acquire);
  if (g != nullptr) return g;
  Gomp* found = new Gomp();
  if (dl_iterate_phdr(find_gomp, found) == 0) {
    delete found;
    return nullptr;
  }
  const Gomp* expected = nullptr;
  if (!g_gomp.compare_exchange_strong(expected, found)) {
    delete found;
    return expected;
  }
  return found;
}

const bool g_env_own = [] {
  const char* v = std::getenv("PYSEQKERN_THREADS");
  if (v != nullptr && std::strcmp(v, "own") == 0) g_own_threads.store(true);
  return true;
}();

struct GompRun {
  const Gomp* g;
  TaskFn fn;
  void* ctx;
  int requested;
  SpinBarrier* barrier;
  std::atomic<bool> refused{false};
};

void gomp_trampoline(void* raw) {
  GompRun& r = *static_cast<GompRun*>(raw);
  const int size = r.g->num_threads();
  const int tid = r.g->thread_num();
  bool refused = false;
  if (size == r.requested) {
    refused = run_task(r.fn, r.ctx, Team{tid, size, r.barrier});
  } else if (tid == 0) {  // granted fewer threads than asked: one thread does it all
    SpinBarrier solo(1);
    refused = run_task(r.fn, r.ctx, Team{0, 1, &solo});
  }
  if (refused) r.refused.store(true, std::memory_order_relaxed);
}

struct OwnRun {
  TaskFn fn;
  void* ctx;
  SpinBarrier* barrier;
  std::atomic<bool> refused{false};
};

void own_trampoline(void* raw, int tid, int n) {
  OwnRun& r = *static_cast<OwnRun*>(raw);
  if (run_task(r.fn, r.ctx, Team{tid, n, r.barrier})) r.refused.store(true, std::memory_order_relaxed);
}


}  // namespace

void parallel_run(int nthreads, TaskFn fn, void* ctx) {
  if (nthreads < 1) nthreads = 1;
  if (nthreads > kMaxThreads) nthreads = kMaxThreads;
  if (t_in_worker) {  // nested: one thread, so a kernel's barriers cannot deadlock; the outer run reports
    SpinBarrier solo(1);
    fn(ctx, Team{0, 1, &solo});
    return;
  }
  if (nthreads == 1) {
    SpinBarrier solo(1);
    if (run_task(fn, ctx, Team{0, 1, &solo})) throw_scratch_refused();
    return;
  }
  SpinBarrier barrier(nthreads);
  if (const Gomp* g = gomp()) {
    GompRun run{g, fn, ctx, nthreads, &barrier};
    t_in_worker = true;  // our kernels never nest parallel regions
    g->parallel(gomp_trampoline, &run, static_cast<unsigned>(nthreads), 0);
    t_in_worker = false;
    if (run.refused.load(std::memory_order_relaxed)) throw_scratch_refused();
    return;
  }
  OwnRun run{fn, ctx, &barrier};
  pool().run(nthreads, own_trampoline, &run);
  if (run.refused.load(std::memory_order_relaxed)) throw_scratch_refused();
}

void* thread_scratch(int64_t bytes) {
  Scratch& s = t_scratch;
  const int64_t limit = g_scratch_limit.load(std::memory_order_relaxed);
  if (bytes < 0 || (limit >= 0 && bytes > limit)) {
    s.refused = true;
    return nullptr;
  }
  if (bytes > s.cap) {
    std::free(s.p);
    s.cap = 0;
    s.p = std::aligned_alloc(64, static_cast<size_t>(bytes < 1 ? 64 : (bytes + 63) / 64 * 64));
    if (s.p == nullptr) {
      s.refused = true;
      return nullptr;
    }
    s.cap = bytes;
  }
  return s.p;
}

void set_thread_scratch_limit(int64_t bytes) { g_scratch_limit.store(bytes, std::memory_order_relaxed); }

const char* thread_backend() {
  static thread_local std::string text;
  const Gomp* g = gomp();
  text = g ? "openmp (" + g->name + ")" : std::string("own");
  return text.c_str();
}

void set_own_threads(bool own) { g_own_threads.store(own); }

void split_range(int64_t n, int tid, int nthreads, int64_t* begin, int64_t* end) {
  const int64_t base = n / nthreads, extra = n % nthreads;
  *begin = tid * base + (tid < extra ? tid : extra);
  *end = *begin + base + (tid < extra ? 1 : 0);
}

bool barrier_selftest(int nthreads, int steps) {
  struct Ctx {
    std::atomic<int>* arrivals;  // [steps]
    std::atomic<bool> ok{true};
    int steps;
  };
  std::vector<std::atomic<int>> arrivals(steps);
  for (auto& a : arrivals) a.store(0);
  Ctx ctx;
  ctx.arrivals = arrivals.data();
  ctx.steps = steps;
  parallel_run(nthreads, [](void* raw, const Team& team) {
    Ctx& c = *static_cast<Ctx*>(raw);
    for (int s = 0; s < c.steps; ++s) {
      c.arrivals[s].fetch_add(1, std::memory_order_relaxed);
      if (s % 2) {  // the barrier in halves, with some of this thread's work between them
        const int token = team.arrive();
        for (volatile int spin = 0; spin < 64 * (team.tid + 1); spin = spin + 1) {
        }
        team.wait_for(token);
      } else {
        team.sync();
      }
      // After the barrier every thread has arrived at step s, and none has gone past step s + 1.
      const int here = c.arrivals[s].load(std::memory_order_relaxed);
      const int next = s + 1 < c.steps ? c.arrivals[s + 1].load(std::memory_order_relaxed) : 0;
      if (here != team.size || next > team.size) c.ok.store(false);
      team.sync();
    }
  }, &ctx);
  return ctx.ok.load();
}

void SpinBarrier::wait() { wait_for(arrive()); }

int SpinBarrier::arrive() {
  const int gen = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_seq_cst);
#if defined(__linux__)
    // seq_cst on both sides (here: bump, then read sleepers_; a sleeper: count itself, then re-read
    // the word inside FUTEX_WAIT): either we see it and wake it, or it sees the new generation.
    if (sleepers_.load(std::memory_order_seq_cst) > 0) futex_wake_all(&generation_);
#endif
  }
  return gen;
}

void SpinBarrier::wait_for(int gen) {
  for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
    if (spins < kBarrierSpinRounds) {
      cpu_relax();
    } else if (spins < kBarrierSpinRounds + kBarrierYieldRounds) {
      std::this_thread::yield();
    } else {
#if defined(__linux__)
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      while (generation_.load(std::memory_order_seq_cst) == gen) futex_wait(&generation_, gen);
      sleepers_.fetch_sub(1, std::memory_order_relaxed);
#else
      std::this_thread::yield();
#endif
    }
  }
}

}  // namespace pyseqkern
