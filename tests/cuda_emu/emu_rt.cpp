// Fiber-based emulation of CUDA blocks, warps and grid barriers (test harness, see README.md).
// Every thread of a launch is a fiber; __syncthreads, warp shuffles and grid.sync are barriers at which
// the scheduler switches to another runnable fiber, picked at random (or, in skew mode, from one block
// at a time, so that a block runs ahead to its next grid barrier). Shared memory starts as 0xff bytes
// (NaN in every float type) followed by a guard zone checked after each launch.
#include "shim/cuda_runtime.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

dim3 threadIdx, blockIdx, blockDim, gridDim;
unsigned char* psk_cur_smem = nullptr;

extern "C" void psk_fiber_entry();

// ---- context switch: a few instructions on x86-64, ucontext elsewhere (or with -DPSK_EMU_UCONTEXT) ----
#if defined(__x86_64__) && !defined(PSK_EMU_UCONTEXT)
extern "C" void psk_switch(void** save_rsp, void* new_rsp);
asm(R"(
.text
.globl psk_switch
.type psk_switch,@function
psk_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");
namespace {
struct Ctx { void* rsp = nullptr; };
void ctx_switch(Ctx& from, Ctx& to) { psk_switch(&from.rsp, to.rsp); }
void ctx_make(Ctx& c, char* stack, size_t size) {
  void** sp = reinterpret_cast<void**>((reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15));
  *--sp = nullptr;                                     // fake return address of the entry
  *--sp = reinterpret_cast<void*>(&psk_fiber_entry);  // psk_switch's ret target
  for (int r = 0; r < 6; ++r) *--sp = nullptr;         // rbp rbx r12 r13 r14 r15
  c.rsp = sp;
}
}  // namespace
#else
#include <ucontext.h>
namespace {
struct Ctx { ucontext_t uc; };
void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
void ctx_make(Ctx& c, char* stack, size_t size) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, psk_fiber_entry, 0);
}
}  // namespace
#endif

namespace {
struct Fiber {
  Ctx ctx;
  dim3 tid, bid;
  bool done = false;
  int block = 0, warp = 0, lane = 0;
  unsigned char slot[8];  // the value a shuffle offers its partner
};
struct Barrier {
  int expected = 0, arrived = 0;
  std::vector<Fiber*> waiters;
};

constexpr size_t kStack = 128 * 1024;
std::vector<Fiber> g_fibers;
std::vector<Fiber*> g_runnable;            // random mode
bool g_skew = false;
std::vector<std::vector<Fiber*>> g_brun;   // skew mode: runnable fibers per block
std::vector<int> g_order;                  // skew mode: block priority order
std::vector<Barrier> g_block_bar, g_warp_bar;
Barrier g_grid_bar;
std::vector<unsigned char*> g_block_smem;
Fiber* g_cur = nullptr;
Ctx g_sched;
std::function<void()> g_body;
bool g_coop = false;
std::mt19937_64 g_rng(1);
std::vector<char*> g_stack_pool;
PskEmuStats g_stats{};

void make_runnable(Fiber* f) {
  if (g_skew) g_brun[f->block].push_back(f);
  else g_runnable.push_back(f);
}
Fiber* take_random(std::vector<Fiber*>& v) {
  std::uniform_int_distribution<size_t> pick(0, v.size() - 1);
  const size_t k = pick(g_rng);
  Fiber* f = v[k];
  v[k] = v.back();
  v.pop_back();
  return f;
}
Fiber* next_fiber() {
  if (!g_skew) return g_runnable.empty() ? nullptr : take_random(g_runnable);
  for (int b : g_order)
    if (!g_brun[b].empty()) return take_random(g_brun[b]);
  return nullptr;
}

void enter(Fiber* f) {
  g_cur = f;
  threadIdx = f->tid;
  blockIdx = f->bid;
  psk_cur_smem = g_block_smem[f->block];
  ctx_switch(g_sched, f->ctx);
}

void release(Barrier& b) {
  for (Fiber* w : b.waiters) make_runnable(w);
  b.waiters.clear();
  b.arrived = 0;
}
void arrive(Barrier& b) {
  b.waiters.push_back(g_cur);
  if (++b.arrived >= b.expected) {
    release(b);
    if (g_skew && (&b == &g_grid_bar || (b.expected > 32 && (g_rng() % 64) == 0)))
      std::shuffle(g_order.begin(), g_order.end(), g_rng);
  }
  ctx_switch(g_cur->ctx, g_sched);
}
}  // namespace

extern "C" void psk_fiber_entry() {
  g_body();
  g_cur->done = true;
  // exited threads no longer count at their block's and warp's barriers (as on sm_70+ hardware)
  Barrier* bars[2] = {&g_block_bar[g_cur->block], &g_warp_bar[g_cur->block * (blockDim.x / 32) + g_cur->warp]};
  for (Barrier* b : bars) {
    b->expected--;
    if (b->arrived > 0 && b->arrived >= b->expected) release(*b);
  }
  g_grid_bar.expected--;
  ctx_switch(g_cur->ctx, g_sched);
  abort();
}

namespace {
struct DevAttr {
  int sms, optin, coop;
  long per_sm_smem;
  cudaError_t refuse_coop;  // what every cooperative launch returns (cudaSuccess: launches as it should)
};
const std::map<int, DevAttr> g_dev = {
    {0, {132, 232448, 1, 233472, cudaSuccess}},
    {1, {4, 16384, 1, 16384 + 1024, cudaSuccess}},
    {2, {7, 6144, 1, 6144 + 1024, cudaSuccess}},
    {3, {132, 232448, 0, 233472, cudaSuccess}},
    {4, {2, 232448, 1, 233472, cudaSuccess}},
    {5, {132, 232448, 1, 233472, cudaErrorCooperativeLaunchTooLarge}},
    {6, {132, 232448, 1, 233472, cudaErrorNotSupported}}};
int g_current_dev = 0;
std::map<std::pair<int, const void*>, int> g_func_max_smem;
std::map<const void*, std::function<void(void**)>> g_registry;
cudaError_t g_last = cudaSuccess;
cudaStreamCaptureStatus g_capture = cudaStreamCaptureStatusNone;
bool g_refusal_invalidates = false;

int max_dyn(const void* f) {
  auto it = g_func_max_smem.find({g_current_dev, f});
  return it == g_func_max_smem.end() ? 48 * 1024 : it->second;
}

void run_grid(dim3 grid, dim3 block, size_t smem, bool coop, const std::function<void()>& body) {
  const int nb = grid.x, nt = block.x, nw = nt / 32;
  gridDim = grid;
  blockDim = block;
  g_coop = coop;
  g_body = body;
  g_fibers.assign(size_t(nb) * nt, Fiber{});
  g_block_bar.assign(nb, Barrier{});
  g_warp_bar.assign(size_t(nb) * nw, Barrier{});
  for (auto& b : g_block_bar) b.expected = nt;
  for (auto& b : g_warp_bar) b.expected = 32;
  g_grid_bar = Barrier{};
  g_grid_bar.expected = nb * nt;
  const size_t guard = 4096;
  std::vector<std::vector<unsigned char>> smem_store(nb);
  g_block_smem.assign(nb, nullptr);
  for (int b = 0; b < nb; ++b) {
    smem_store[b].assign(smem + guard, 0xff);
    g_block_smem[b] = smem_store[b].data();
  }
  while (g_stack_pool.size() < g_fibers.size()) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) { perror("mmap"); abort(); }
    g_stack_pool.push_back(static_cast<char*>(p));
  }
  g_runnable.clear();
  g_brun.assign(nb, {});
  g_order.resize(nb);
  for (int b = 0; b < nb; ++b) g_order[b] = b;
  std::shuffle(g_order.begin(), g_order.end(), g_rng);
  for (size_t i = 0; i < g_fibers.size(); ++i) {
    Fiber& f = g_fibers[i];
    f.block = int(i / nt);
    const int t = int(i % nt);
    f.tid = dim3(t);
    f.bid = dim3(f.block);
    f.warp = t / 32;
    f.lane = t % 32;
    ctx_make(f.ctx, g_stack_pool[i], kStack);
    make_runnable(&f);
  }
  while (Fiber* f = next_fiber()) enter(f);
  size_t not_done = 0;
  for (auto& f : g_fibers) not_done += !f.done;
  if (not_done) {
    fprintf(stderr, "EMU DEADLOCK: %zu threads never finished (grid barrier %d/%d)\n", not_done, g_grid_bar.arrived,
            g_grid_bar.expected);
    throw std::runtime_error("emulated deadlock: " + std::to_string(not_done) + " threads never finished");
  }
  for (int b = 0; b < nb; ++b)
    for (size_t i = smem; i < smem + guard; ++i)
      if (smem_store[b][i] != 0xff) {
        fprintf(stderr, "EMU SMEM OVERFLOW: block %d wrote byte %zu of %zu\n", b, i, smem);
        throw std::runtime_error("shared memory overflow");
      }
}
}  // namespace

void psk_emu_set_device(int d) { g_current_dev = d; }
void psk_emu_seed(uint64_t s) { g_rng.seed(s); }
void psk_emu_set_skew(bool skew) { g_skew = skew; }
void psk_emu_set_capture(cudaStreamCaptureStatus status, bool refusal_invalidates) {
  g_capture = status;
  g_refusal_invalidates = refusal_invalidates;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = g_capture;
  return cudaSuccess;
}
void psk_emu_reset_stats() { g_stats = PskEmuStats{}; }
PskEmuStats psk_emu_stats() { return g_stats; }
void psk_emu_note_plan(const PskEmuPlanNote& n) { g_stats.plan = n; }
void psk_misaligned(const void* p, size_t bytes) {
  std::fprintf(stderr, "emulated device fault: a %zu-byte load from %p, not %zu-byte aligned\n", bytes, p, bytes);
  std::abort();
}
void psk_emu_register(const void* fn, std::function<void(void**)> thunk) { g_registry[fn] = std::move(thunk); }

const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmu"; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
cudaError_t cudaGetLastError() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}
cudaError_t cudaGetDevice(int* d) {
  *d = g_current_dev;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  const DevAttr& d = g_dev.at(dev);
  if (a == cudaDevAttrMultiProcessorCount) *v = d.sms;
  else if (a == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = d.optin;
  else *v = d.coop;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute, int v) {
  if (v > g_dev.at(g_current_dev).optin) return g_last = cudaErrorInvalidValue;
  g_func_max_smem[{g_current_dev, f}] = v;
  return cudaSuccess;
}
// 2 blocks per SM by registers (the per-step kernels' launch bounds; a persistent grid has at most one a
// SM, and its kernels may take more registers, which a real device would count here); shared memory:
// 1 KB reserved per block.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* f, int threads, size_t smem) {
  if (threads != 256) { *n = 0; return cudaErrorInvalidValue; }
  if (static_cast<long>(smem) > max_dyn(f)) { *n = 0; return cudaSuccess; }
  const long by_smem = g_dev.at(g_current_dev).per_sm_smem / (static_cast<long>(smem) + 1024);
  *n = static_cast<int>(by_smem < 2 ? by_smem : 2);
  return cudaSuccess;
}

void psk_syncthreads() { arrive(g_block_bar[g_cur->block]); }
void psk_grid_sync() {
  if (!g_coop) { fprintf(stderr, "EMU: grid.sync in a non-cooperative launch\n"); abort(); }
  arrive(g_grid_bar);
}
void psk_shfl_exchange(void* v, size_t bytes, int lane_mask, unsigned mask) {
  if (mask != 0xffffffffu) { fprintf(stderr, "EMU: partial shuffle mask\n"); abort(); }
  Fiber* me = g_cur;
  std::memcpy(me->slot, v, bytes);
  Barrier& wb = g_warp_bar[me->block * (blockDim.x / 32) + me->warp];
  arrive(wb);
  Fiber* partner = &g_fibers[size_t(me->block) * blockDim.x + me->warp * 32 + (me->lane ^ lane_mask)];
  std::memcpy(v, partner->slot, bytes);
  arrive(wb);
}

void psk_emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  ++g_stats.plain_launches;
  run_grid(grid, block, smem, false, body);
}

cudaError_t cudaLaunchKernelExC(const cudaLaunchConfig_t* cfg, const void* fn, void** args) {
  auto it = g_registry.find(fn);
  if (it == g_registry.end()) { fprintf(stderr, "EMU: unregistered kernel\n"); abort(); }
  bool coop = false;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeCooperative && cfg->attrs[i].val.cooperative) coop = true;
  if (cfg->blockDim.x != 256 || cfg->gridDim.x < 1) return g_last = cudaErrorInvalidValue;
  if (g_capture == cudaStreamCaptureStatusInvalidated) return g_last = cudaErrorStreamCaptureInvalidated;
  if (static_cast<long>(cfg->dynamicSmemBytes) > max_dyn(fn)) {
    fprintf(stderr, "EMU: launch with %zu bytes of dynamic smem above the attribute %d\n", cfg->dynamicSmemBytes,
            max_dyn(fn));
    return g_last = cudaErrorInvalidValue;
  }
  if (coop) {
    const DevAttr& d = g_dev.at(g_current_dev);
    int per = 0;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per, fn, 256, cfg->dynamicSmemBytes);
    if (d.refuse_coop != cudaSuccess || !d.coop || long(cfg->gridDim.x) > long(per) * d.sms) {
      ++g_stats.refused;
      if (g_capture == cudaStreamCaptureStatusActive && g_refusal_invalidates)
        g_capture = cudaStreamCaptureStatusInvalidated;
      return g_last = d.refuse_coop != cudaSuccess ? d.refuse_coop : cudaErrorCooperativeLaunchTooLarge;
    }
  }
  ++(coop ? g_stats.coop_launches : g_stats.plain_launches);
  // The launch runs synchronously, so the argument pointers stay valid while the fibers read them.
  const auto& thunk = it->second;
  run_grid(cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, coop, [&] { thunk(args); });
  return cudaSuccess;
}
