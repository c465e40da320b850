// Recurrent CUDA kernels: choosing the path (persistent or per-step) and the block slices from what the
// current device reports at run time (multiprocessors, opt-in shared memory, occupancy of the actual
// kernel), and launching (cooperatively for the persistent path). Contract: rnn_common.cuh.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda_check.h"
#include "rnn_common.cuh"

namespace pyseqkern {
namespace rnn_cuda {
namespace {

// ---- traits ---------------------------------------------------------------------------------------
// Multiply-adds a block should get per step before more blocks pay off: below this a step is latency
// (the grid barrier, L2 round trips), and every extra block makes the barrier slower. A first guess
// (B=1, H=256 LSTM: 16 blocks), to be tuned on a GPU.
constexpr int64_t kMinBlockMacs = 16384;
// The per-step path stages at most this many k columns per tile (more blocks per multiprocessor).
constexpr int kStepKTile = 1024;
// The forward's gate phase holds the products of up to this many batch tiles (kNB rows each) at once
// and runs one epilogue over all their rows with every thread. One tile at a time, the epilogue of
// kNB * units elements ran on a warp or two, its x_gates loads and activations exposed once per tile:
// at B=64 eight times a step (stop 32, not yet measured on a GPU: bench/gpu_phases.py).
constexpr int64_t kMaxEpilogueTiles = 8;

int64_t epilogue_tiles(const PlanShape& s) {
  if (s.backward) return 1;
  const int64_t tiles = (s.B + kNB - 1) / kNB;
  return tiles < 1 ? 1 : (tiles > kMaxEpilogueTiles ? kMaxEpilogueTiles : tiles);
}

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;
  bool cooperative = false;
};

std::mutex g_mutex;
std::map<int, DeviceInfo> g_devices;
std::map<std::pair<int, const void*>, bool> g_smem_raised;
using PlanKey = std::tuple<int, const void*, int64_t, int64_t, int64_t, int64_t, int64_t, int>;
std::map<PlanKey, RnnPlan> g_plans;

DeviceInfo device_info(int dev) {
  auto it = g_devices.find(dev);
  if (it != g_devices.end()) return it->second;
  DeviceInfo d;
  int v = 0;
  cuda_check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  cuda_check(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "cudaDeviceGetAttribute");
  cuda_check(cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, dev), "cudaDeviceGetAttribute");
  d.cooperative = v != 0;
  g_devices[dev] = d;
  return d;
}

// Lets `kernel` use all opt-in shared memory on `dev`, once. The attribute is a ceiling, not a
// request: occupancy follows the dynamic size of each launch.
void raise_smem_limit(int dev, const void* kernel, int optin) {
  auto key = std::make_pair(dev, kernel);
  if (g_smem_raised.count(key)) return;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  g_smem_raised[key] = true;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Slices for `units` hidden units per block: states per block, weights held, rows and k of the
// largest phase (see the phase lists in rnn_fwd.cu and rnn_bwd.cu).
struct Slices {
  int64_t blocks, units, states, weights, rmax, kmax;
};
Slices slices_of(const PlanShape& s, int64_t units) {
  Slices c;
  c.units = units;
  c.blocks = ceil_div(s.H, units);
  c.states = s.P > 0 ? ceil_div(s.P, c.blocks) : units;
  if (s.backward) {
    c.weights = c.states * s.G * s.H + (s.P > 0 ? units * s.P : 0);
    c.rmax = units > c.states ? units : c.states;
    c.kmax = s.G * s.H > s.P ? s.G * s.H : s.P;
  } else {
    c.weights = s.G * units * s.K + (s.P > 0 ? c.states * s.H : 0);
    c.rmax = s.G * units > c.states ? s.G * units : c.states;
    c.kmax = s.P > 0 && s.H > s.K ? s.H : s.K;
  }
  return c;
}

// The k tile that fits in `avail` elements (kNB rows staged): the whole k when it fits, else the
// largest multiple of 32 (0 when not even 32 columns fit).
int64_t ktile_for(int64_t kmax, int64_t avail, int64_t cap) {
  const int64_t fit = avail / kNB;
  const int64_t want = kmax < cap ? kmax : cap;
  if (want <= fit) return want;
  return fit / 32 * 32;
}

bool try_persistent(const PlanShape& s, const DeviceInfo& d, int dev, const void* kernel, RnnPlan* out) {
  if (!d.cooperative || d.sms < 1) return false;
  const int64_t macs_per_unit = s.G * s.K * (s.B > 0 ? s.B : 1);
  int64_t units = ceil_div(s.H, d.sms);
  const int64_t by_work = ceil_div(kMinBlockMacs, macs_per_unit);
  if (units < by_work) units = by_work;
  if (units > s.H) units = s.H;
  const int64_t optin = d.smem_optin / s.acc_bytes;
  raise_smem_limit(dev, kernel, d.smem_optin);
  while (true) {
    const Slices c = slices_of(s, units);
    if (c.rmax > (1 << 20)) return false;
    // All the epilogue tiles where they fit beside a k tile of 128 (or the whole k), else one.
    int64_t et = epilogue_tiles(s), fixed = 0, ktile = 0;
    for (;; et = 1) {
      fixed = c.weights + spart_elems(static_cast<int>(c.rmax)) * et;
      ktile = fixed < optin ? ktile_for(c.kmax, optin - fixed, c.kmax) : 0;
      if (ktile >= (c.kmax < 128 ? c.kmax : 128) || et == 1) break;
    }
    if (fixed >= optin) return false;  // more units per block only hold more weights
    if (ktile < (c.kmax < 128 ? c.kmax : 128)) return false;
    const int64_t bytes = (fixed + kNB * ktile) * s.acc_bytes;
    int per_sm = 0;
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(bytes)),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    if (per_sm > 0 && c.blocks <= int64_t(per_sm) * d.sms) {
      out->persistent = true;
      out->blocks = static_cast<int>(c.blocks);
      out->units = static_cast<int>(c.units);
      out->states = static_cast<int>(c.states);
      out->ktile = static_cast<int>(ktile);
      out->etiles = static_cast<int>(et);
      out->weight_elems = c.weights;
      out->smem_bytes = bytes;
      return true;
    }
    if (per_sm == 0 || c.blocks <= 1) return false;
    units = ceil_div(s.H, c.blocks - 1);  // the next slice width that removes a block
  }
}

RnnPlan step_plan(const PlanShape& s, const DeviceInfo& d, int dev, const void* kernel) {
  const int64_t target = kStepBlocksPerSm * static_cast<int64_t>(d.sms > 0 ? d.sms : 1);
  const int64_t units = ceil_div(s.H, s.H < target ? s.H : target);
  const Slices c = slices_of(s, units);
  const int64_t optin = d.smem_optin / s.acc_bytes;
  int64_t et = epilogue_tiles(s), fixed = 0, ktile = 0;
  for (;; et = 1) {  // (as try_persistent: all the epilogue tiles where a k tile of 128 still fits)
    fixed = spart_elems(static_cast<int>(c.rmax)) * et;
    ktile = fixed < optin ? ktile_for(c.kmax, optin - fixed, kStepKTile) : 0;
    if (ktile >= (c.kmax < 128 ? c.kmax : 128) || et == 1) break;
  }
  if (ktile < 1)
    throw std::runtime_error("pyseqkern: rnn (CUDA): shared memory too small for the per-step kernel (" +
                             std::to_string(d.smem_optin) + " bytes per block)");
  raise_smem_limit(dev, kernel, d.smem_optin);
  RnnPlan p;
  p.persistent = false;
  p.blocks = static_cast<int>(c.blocks);
  p.units = static_cast<int>(c.units);
  p.states = static_cast<int>(c.states);
  p.ktile = static_cast<int>(ktile);
  p.etiles = static_cast<int>(et);
  p.weight_elems = 0;
  p.smem_bytes = (fixed + kNB * ktile) * s.acc_bytes;
  return p;
}

PlanKey plan_key(int dev, const PlanShape& s, RnnCudaPath request, const void* kernel_persistent) {
  return PlanKey{dev, kernel_persistent, s.H, s.K, s.P, s.B, s.G, static_cast<int>(request)};
}

}  // namespace

int debug_skip() {
  const char* v = std::getenv("PYSEQKERN_CUDA_RNN_SKIP");
  return v ? std::atoi(v) : 0;
}

RnnPlan make_plan(const PlanShape& s, RnnCudaPath request, const void* kernel_persistent, const void* kernel_step) {
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(g_mutex);
  const PlanKey key = plan_key(dev, s, request, kernel_persistent);
  auto it = g_plans.find(key);
  if (it != g_plans.end()) return it->second;
  const DeviceInfo d = device_info(dev);
  RnnPlan plan{};
  bool ok = false;
  if (request != RnnCudaPath::Step) ok = try_persistent(s, d, dev, kernel_persistent, &plan);
  if (!ok) {
    if (request == RnnCudaPath::Persistent)
      throw std::invalid_argument(
          "pyseqkern: rnn (CUDA): the persistent path was requested (PYSEQKERN_CUDA_RNN_PATH=persistent) but "
          "this layer's recurrent weights do not fit on chip of this device, or it has no cooperative launch");
    plan = step_plan(s, d, dev, kernel_step);
  }
  g_plans[key] = plan;
  return plan;
}

RnnPlan demote_to_step(const PlanShape& s, RnnCudaPath request, const void* kernel_persistent,
                       const void* kernel_step) {
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(g_mutex);
  const RnnPlan plan = step_plan(s, device_info(dev), dev, kernel_step);
  g_plans[plan_key(dev, s, request, kernel_persistent)] = plan;
  return plan;
}

bool launch(const void* kernel, const RnnPlan& plan, void** args, bool cooperative, cudaStream_t stream,
            const char* name) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(plan.blocks));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(plan.smem_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  cfg.attrs = cooperative ? attr : nullptr;
  cfg.numAttrs = cooperative ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelExC(&cfg, kernel, args);
  if (err == cudaSuccess) return true;
  // A refused launch is also recorded as the thread's last error; left there, the next launch check
  // (ours or torch's) would report it against an innocent kernel. Sticky errors survive this anyway.
  (void)cudaGetLastError();
  // Refused as cooperative (too large a grid, or a runtime that does not allow cooperative launches:
  // virtualised ones, some tools): the caller demotes to the per-step path, or raises where the
  // persistent path was asked for.
  if (cooperative && (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported ||
                      err == cudaErrorNotPermitted))
    return false;
  cuda_check(err, name);
  return false;
}

bool launch_persistent(RnnPlan& plan, const PlanShape& s, RnnCudaPath request, const void* kernel_persistent,
                       const void* kernel_step, void** args, cudaStream_t stream, const char* name) {
  if (!plan.persistent) return false;
  if (launch(kernel_persistent, plan, args, true, stream, name)) {
    cuda_check(cudaGetLastError(), name);
    return true;
  }
  if (request == RnnCudaPath::Persistent)
    throw std::invalid_argument("pyseqkern: rnn (CUDA): the persistent path was requested but the device "
                                "refused its cooperative launch (a grid too large to be co-resident, "
                                "or no cooperative launches here)");
  plan = demote_to_step(s, request, kernel_persistent, kernel_step);
  // Inside a CUDA graph capture the refused launch may have invalidated the capture, and the per-step
  // launches would then fail at the capture's end with an error that names neither this layer nor the
  // cause. The demoted plan is kept, so the same call made once before capturing (a warm-up) takes the
  // per-step path from the start, and that path captures.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess) (void)cudaGetLastError();
  if (capture == cudaStreamCaptureStatusInvalidated)
    throw std::runtime_error(std::string("pyseqkern: rnn (CUDA): ") + name +
                             ": the device refused the persistent kernel's cooperative launch inside a CUDA "
                             "graph capture, which invalidated the capture; this layer now takes the per-step "
                             "path on this device, so run it once before capturing (the warm-up "
                             "torch.cuda.graphs asks for) and capture again");
  return false;
}

void launch_step(const void* kernel_step, const RnnPlan& plan, void** args, cudaStream_t stream, const char* name) {
  launch(kernel_step, plan, args, false, stream, name);
  cuda_check(cudaGetLastError(), name);
}

}  // namespace rnn_cuda
}  // namespace pyseqkern
