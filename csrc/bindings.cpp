// pyseqkern._C: turns Python arguments (DLPack capsules, ints, the stream handle) into params structs,
// releases the GIL and calls one entry. No math here, and nothing that knows about torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "fingerprint.h"
#include "pyseqkern/cell_pointwise.h"
#include "handoff.h"
#include "pack_stamp.h"
#include "pyseqkern/isa.h"
#include "pyseqkern/probe.h"
#include "pyseqkern/rnn.h"
#include "pyseqkern/rnn_direct.h"
#include "pyseqkern/thread_pool.h"
#ifdef PSK_WITH_CUDA
#include "pyseqkern/cuda_info.h"
#include "rnn_cuda.h"
#endif

namespace py = pybind11;
using namespace pyseqkern;

namespace {

void* as_stream(uintptr_t handle) { return reinterpret_cast<void*>(handle); }

py::dict build_info() {
  py::dict d;
#ifdef PSK_WITH_CUDA
  d["cuda_compiled"] = true;
  d["cuda_archs"] = std::string(PSK_CUDA_ARCHS);
  d["cuda_toolkit"] = std::string(PSK_CUDA_TOOLKIT_VERSION);
#else
  d["cuda_compiled"] = false;
  d["cuda_archs"] = std::string();
  d["cuda_toolkit"] = std::string();
#endif
  std::vector<std::string> compiled;
  for (int i = 0; i < kIsaCount; ++i)
    if (isa_compiled(static_cast<Isa>(i))) compiled.push_back(isa_name(static_cast<Isa>(i)));
  d["cpu_isa_compiled"] = compiled;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  return d;
}

py::dict cpu_isa_report() {
  py::dict d;
  std::vector<std::string> supported;
  for (int i = 0; i < kIsaCount; ++i)
    if (isa_cpu_supports(static_cast<Isa>(i))) supported.push_back(isa_name(static_cast<Isa>(i)));
  d["supported"] = supported;
  d["best"] = std::string(isa_name(isa_best()));
  d["active"] = std::string(isa_name(isa_active()));
  d["vector_bits"] = probe_cpu_kernels().vector_bits;
  d["l2_bytes"] = cpu_l2_bytes();
  d["l3_bytes"] = cpu_l3_bytes();
  d["l3_streams_fast"] = cpu_l3_streams_fast();
  d["vendor"] = cpu_vendor();
  d["family"] = cpu_family();
  d["l2_outpaces_l3"] = cpu_l2_outpaces_l3();
  return d;
}

void set_cpu_isa(const std::string& name, bool all_threads) {
  Isa isa;
  if (!isa_parse(name.c_str(), &isa))
    throw py::value_error("pyseqkern: unknown CPU ISA level '" + name + "'; expected one of baseline, avx2, avx512, avx512bf16, amx");
  try {
    isa_set_active(isa, all_threads);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("pyseqkern: ") + e.what());
  }
}

py::dict cuda_report_dict() {
  py::dict d;
#ifdef PSK_WITH_CUDA
  CudaReport r = cuda_report();
  d["runtime_version"] = r.runtime_version;
  d["driver_version"] = r.driver_version;
  d["device_count"] = r.device_count;
  d["error"] = r.error;
  py::list devs;
  for (const auto& dev : r.devices) {
    py::dict x;
    x["name"] = dev.name;
    x["capability"] = py::make_tuple(dev.major, dev.minor);
    x["multiprocessors"] = dev.multiprocessors;
    devs.append(x);
  }
  d["devices"] = devs;
#else
  d["error"] = std::string("built without CUDA");
  d["device_count"] = 0;
  d["devices"] = py::list();
#endif
  return d;
}

py::tuple describe(py::handle capsule) {
  TensorView v = view_of(capsule, "tensor");
  py::tuple sizes(v.ndim), strides(v.ndim);
  for (int i = 0; i < v.ndim; ++i) {
    sizes[i] = v.sizes[i];
    strides[i] = v.strides[i];
  }
  return py::make_tuple(reinterpret_cast<uintptr_t>(v.data), std::string(dtype_name(v.dtype)),
                        v.device == DeviceKind::Cpu ? "cpu" : "cuda", v.device_index, sizes, strides);
}

// The handoff cost alone: six capsules read and checked, nothing run.
void handoff_noop(py::handle a, py::handle b, py::handle c, py::handle d, py::handle e, py::handle f) {
  TensorView v[6] = {view_of(a, "a"), view_of(b, "b"), view_of(c, "c"),
                     view_of(d, "d"), view_of(e, "e"), view_of(f, "f")};
  const TensorView* ptrs[6] = {&v[0], &v[1], &v[2], &v[3], &v[4], &v[5]};
  const char* names[6] = {"a", "b", "c", "d", "e", "f"};
  require_same_device(ptrs, names, 6);
}

void triad(py::handle out_c, py::handle a_c, py::handle b_c, double alpha, int num_threads, uintptr_t stream) {
  TensorView out = view_of(out_c, "out"), a = view_of(a_c, "a"), b = view_of(b_c, "b");
  const TensorView* views[3] = {&out, &a, &b};
  const char* names[3] = {"out", "a", "b"};
  require_same_device(views, names, 3);
  for (int i = 0; i < 3; ++i) {
    if (views[i]->dtype != out.dtype || (out.dtype != DType::Float32 && out.dtype != DType::Float64))
      throw py::type_error(std::string("pyseqkern: triad: argument '") + names[i] +
                           "' must be float32 or float64 and match 'out'");
    if (!views[i]->is_contiguous() || views[i]->numel() != out.numel())
      throw py::value_error(std::string("pyseqkern: triad: argument '") + names[i] +
                            "' must be contiguous with as many elements as 'out'");
  }
  TriadParams p{out.data, a.data, b.data, alpha, out.numel(), out.dtype, num_threads};
  if (out.device == DeviceKind::Cuda) {
#ifdef PSK_WITH_CUDA
    CudaDeviceGuard guard(out);
    triad_cuda(p, as_stream(stream));
#else
    throw_no_cuda("triad");
#endif
    return;
  }
  py::gil_scoped_release nogil;
  probe_cpu_kernels().triad(p);
}

double peak_fma(py::handle sink_c, int64_t iters, int num_threads, int threads_per_block, uintptr_t stream) {
  TensorView sink = view_of(sink_c, "sink");
  if (sink.dtype != DType::Float32 || !sink.is_contiguous())
    throw py::type_error("pyseqkern: peak_fma: argument 'sink' must be a contiguous float32 tensor");
  if (iters < 0 || num_threads < 1)
    throw py::value_error("pyseqkern: peak_fma: 'iters' must be >= 0 and 'num_threads' >= 1");
  if (sink.device == DeviceKind::Cpu && num_threads > kMaxThreads)
    throw py::value_error("pyseqkern: peak_fma: 'num_threads' must be at most " + std::to_string(kMaxThreads));
  PeakFmaParams p{static_cast<float*>(sink.data), iters, num_threads};
  if (sink.device == DeviceKind::Cuda) {
#ifdef PSK_WITH_CUDA
    if (threads_per_block < 1 || sink.numel() < int64_t(num_threads) * threads_per_block)
      throw py::value_error("pyseqkern: peak_fma: 'sink' needs num_threads * threads_per_block elements");
    CudaDeviceGuard guard(sink);
    return peak_fma_cuda(p, threads_per_block, as_stream(stream));
#else
    throw_no_cuda("peak_fma");
#endif
  }
  if (sink.numel() < num_threads)
    throw py::value_error("pyseqkern: peak_fma: 'sink' needs num_threads elements");
  py::gil_scoped_release nogil;
  return probe_cpu_kernels().peak_fma(p);
}

// The CPU level's bfloat16 arithmetic rate (probe.h): FLOPs done.
double peak_bf16(py::handle sink_c, int64_t iters, int num_threads) {
  TensorView sink = view_of(sink_c, "sink");
  if (sink.dtype != DType::Float32 || !sink.is_contiguous() || sink.device != DeviceKind::Cpu)
    throw py::type_error("pyseqkern: peak_bf16: argument 'sink' must be a contiguous float32 CPU tensor");
  if (iters < 0 || num_threads < 1 || num_threads > kMaxThreads)
    throw py::value_error("pyseqkern: peak_bf16: 'iters' must be >= 0 and 'num_threads' in 1.." +
                          std::to_string(kMaxThreads));
  if (sink.numel() < num_threads)
    throw py::value_error("pyseqkern: peak_bf16: 'sink' needs num_threads elements");
  PeakFmaParams p{static_cast<float*>(sink.data), iters, num_threads};
  py::gil_scoped_release nogil;
  return probe_cpu_kernels().peak_bf16(p);
}

void noop_cuda_entry(int device, uintptr_t stream) {
#ifdef PSK_WITH_CUDA
  TensorView v;
  v.device = DeviceKind::Cuda;
  v.device_index = device;
  CudaDeviceGuard guard(v);
  noop_cuda(as_stream(stream));
#else
  (void)device;
  (void)stream;
  throw_no_cuda("noop_cuda");
#endif
}

// ---- recurrent layers ---------------------------------------------------------------------------------
// Optional tensors arrive as None. Python (pyseqkern/ops/rnn.py) has already validated shapes, dtypes
// and devices; the checks here only keep a wrong call from reading out of bounds.

// "[a, b, ...]": a tensor's shape, for messages.
std::string shape_text(const TensorView& v) {
  std::string s = "[";
  for (int i = 0; i < v.ndim; ++i) s += (i ? ", " : "") + std::to_string(v.sizes[i]);
  return s + "]";
}

// Row stride of a 2-D view whose rows are contiguous; size-1 dimensions may carry any stride (torch
// calls such tensors contiguous), so they are not held against it.
int64_t row_stride(const TensorView& v, const char* what) {
  if (v.ndim != 2 || (v.sizes[1] > 1 && v.strides[1] != 1))
    throw py::value_error(std::string("pyseqkern: rnn: '") + what + "' must be 2-D with contiguous rows");
  return v.sizes[0] > 1 ? v.strides[0] : v.sizes[1];
}

const void* opt_data(py::handle h, const char* arg, TensorView* out = nullptr) {
  if (h.is_none()) return nullptr;
  TensorView v = view_of(h, arg);
  if (out) *out = v;
  return v.data;
}

// Bounds on the sizes the entries take, so that no size the kernels derive (a pack of ~4 H^2 values,
// a workspace of ~batch x 6 H, an input panel of ~4 H x I) overflows int64: hidden = 2^62 made 4 x
// hidden wrap to 0, passed the checks of a zero-element w_hh and packed out of bounds (an auditing
// helper, stop 53). Far past any layer that fits a machine's memory.
constexpr int64_t kMaxHidden = int64_t(1) << 24;
constexpr int64_t kMaxRows = int64_t(1) << 31;

RnnShape rnn_shape(int mode, bool reset_after, int64_t hidden, int64_t proj) {
  if (mode < 0 || mode > 3) throw py::value_error("pyseqkern: rnn: 'mode' must be 0..3 (lstm, gru, rnn_tanh, rnn_relu)");
  if (hidden < 1 || proj < 0 || (proj > 0 && mode != 0))
    throw py::value_error("pyseqkern: rnn: 'hidden' must be >= 1 and 'proj' >= 0 (LSTM only)");
  if (hidden > kMaxHidden || proj > kMaxHidden)
    throw py::value_error("pyseqkern: rnn: 'hidden' and 'proj' must be at most 2^24, got " + std::to_string(hidden) +
                          " and " + std::to_string(proj));
  return RnnShape{static_cast<RnnMode>(mode), reset_after, hidden, proj};
}

// The CPU kernels' storage dtypes: float32, float64, bfloat16. Their tables dispatch float64 and bfloat16
// and take everything else as float32, so a float16 or integer tensor reached them as one: torch.ops.
// pyseqkern.rnn_forward on float16 CPU x_gates wrote 4-byte values into 2-byte rows and corrupted the heap
// (found in stop 32). Every CPU entry checks here; `arg` names the tensor whose dtype the call takes.
void require_cpu_dtype(DType dtype, const char* op, const char* arg) {
  if (dtype != DType::Float32 && dtype != DType::Float64 && dtype != DType::BFloat16)
    throw py::type_error(std::string("pyseqkern: ") + op + ": '" + arg + "' must be float32, float64 or bfloat16 " +
                         "on the CPU (float16 runs on CUDA, or through float32: pyseqkern.rnn_layer), got " +
                         dtype_name(dtype));
}

// The CUDA kernels have their own packed layout and workspace (cuda/rnn_cuda.h); the reserve is shared.
// `kern`: the CPU table the caller runs with (each entry reads the level once: sizes and kernels of
// one call must come from the same level).
// A CPU pack's size includes its stamp (pack_stamp.h).
RnnSizes rnn_sizes_of(const RnnShape& shape, int64_t batch, DType dtype, bool cuda,
                      const RnnCpuKernels& kern = rnn_cpu_kernels()) {
  if (batch < 0 || batch > kMaxRows)
    throw py::value_error("pyseqkern: rnn: 'batch' must be in [0, 2^31], got " + std::to_string(batch));
  if (!cuda) {
    RnnSizes s = kern.sizes(shape, batch, dtype);
    s.packed_numel += stamp_elems(dtype);
    return s;
  }
  const bool is_double = dtype == DType::Float64;
#ifdef PSK_WITH_CUDA
  return rnn_sizes_cuda(shape, batch, is_double);
#else
  throw_no_cuda("rnn_sizes");
#endif
}

// The stamp a CPU pack of these weights (or, with `input`, of this input panel) carries at the level of
// `kern`, and where it sits (pack_stamp.h).
// `no_pieces`: the stamp of a pack made without its piece sections (pack_stamp.h), where the layout has them.
PackStamp weights_stamp(const RnnShape& shape, DType dtype, const RnnCpuKernels& kern, int64_t* layout_numel,
                        bool no_pieces = false) {
  const RnnSizes s = kern.sizes(shape, 1, dtype);
  *layout_numel = s.packed_numel;
  return pack_stamp(PackKind::Weights, shape, dtype, s.lanes, shape.proj, s.packed_numel,
                    no_pieces && s.split_rows > 0);
}

PackStamp panel_stamp(const RnnShape& shape, DType dtype, int64_t input, const RnnCpuKernels& kern,
                      int64_t* layout_numel) {
  *layout_numel = kern.input_panel_numel(shape, input, dtype);
  return pack_stamp(PackKind::InputPanel, shape, dtype, kern.sizes(shape, 1, dtype).lanes, input, *layout_numel);
}

// Refuses a CPU pack (`numel` elements of A, at least this call's layout and its stamp: checked before)
// laid out for another layer or level.
void require_stamp(const void* pack, int64_t numel, DType dtype, int64_t layout_numel, const PackStamp& want,
                   const char* op, const char* arg) {
  const std::string why = stamp_mismatch(pack, numel, dtype, layout_numel, want);
  if (!why.empty())
    throw py::value_error(std::string("pyseqkern: ") + op + ": '" + arg + "' does not fit this call: " + why);
}

// `batch`: the call's rows; below the level's split_rows a pack without its piece sections serves too.
void require_weights_stamp(py::handle pack, const RnnShape& shape, DType dtype, const RnnCpuKernels& kern,
                           const char* op, int64_t batch) {
  int64_t at = 0;
  const PackStamp want = weights_stamp(shape, dtype, kern, &at);
  const TensorView v = view_of(pack, "packed");
  PackStamp narrow = want;
  narrow.word[0] |= kNoPieces;
  const int64_t split_rows = kern.sizes(shape, 1, dtype).split_rows;
  if (split_rows > 0 && batch < split_rows && stamp_mismatch(v.data, v.numel(), dtype, at, narrow).empty()) return;
  require_stamp(v.data, v.numel(), dtype, at, want, op, "packed");
}

void require_panel_stamp(py::handle panel, const RnnShape& shape, DType dtype, int64_t input,
                         const RnnCpuKernels& kern, const char* op) {
  int64_t at = 0;
  const PackStamp want = panel_stamp(shape, dtype, input, kern, &at);
  const TensorView v = view_of(panel, "packed_in");
  require_stamp(v.data, v.numel(), dtype, at, want, op, "packed_in");
}

DType rnn_dtype(const std::string& dtype) {
  if (dtype == "float32") return DType::Float32;
  if (dtype == "float64") return DType::Float64;
  if (dtype == "float16") return DType::Float16;
  if (dtype == "bfloat16") return DType::BFloat16;
  throw py::value_error("pyseqkern: rnn: 'dtype' must be float32, float64, float16 or bfloat16, got '" + dtype + "'");
}

py::tuple rnn_sizes_entry(int mode, bool reset_after, int64_t hidden, int64_t proj, int64_t batch,
                          const std::string& dtype, bool cuda) {
  const RnnSizes s = rnn_sizes_of(rnn_shape(mode, reset_after, hidden, proj), batch, rnn_dtype(dtype), cuda);
  return py::make_tuple(s.lanes, s.packed_numel, s.workspace_numel, s.reserve_cols, s.reserve_hprev, s.ride_ring,
                        s.split_rows);
}

// Each given tensor of a call on the device of `anchor` (its sequence data), except batch_sizes, which
// stays in host memory; on CUDA time_offsets and lengths are read by the kernels on the device (rnn.h,
// cuda/rnn_cuda.h). A CPU call's kernels dereference every pointer: a CUDA pack or state with CPU
// x_gates had crashed the interpreter (a review, stop 33).
void require_on(const TensorView& anchor, const char* anchor_name, py::handle h, const char* arg) {
  if (h.is_none()) return;
  TensorView v = view_of(h, arg);
  const TensorView* views[2] = {&anchor, &v};
  const char* names[2] = {anchor_name, arg};
  require_same_device(views, names, 2);
}

#ifdef PSK_WITH_CUDA
void require_cuda_seq(const TensorView& anchor, const char* anchor_name, py::handle batch_sizes,
                      py::handle time_offsets, py::handle lengths) {
  if (!batch_sizes.is_none() && view_of(batch_sizes, "batch_sizes").device != DeviceKind::Cpu)
    throw py::value_error("pyseqkern: rnn (CUDA): 'batch_sizes' must be a CPU tensor (host memory)");
  const std::pair<py::handle, const char*> index[2] = {{time_offsets, "time_offsets"}, {lengths, "lengths"}};
  for (const auto& [h, arg] : index) {
    if (h.is_none()) continue;
    require_on(anchor, anchor_name, h, arg);
    TensorView v = view_of(h, arg);
    if (v.dtype != DType::Int64 || !v.is_contiguous())
      throw py::value_error(std::string("pyseqkern: rnn (CUDA): '") + arg + "' must be a contiguous int64 tensor");
  }
}

RnnCudaPath rnn_cuda_path(int path) {
  if (path < 0 || path > 2)
    throw py::value_error("pyseqkern: rnn (CUDA): 'path' must be 0 (auto), 1 (persistent) or 2 (step)");
  return static_cast<RnnCudaPath>(path);
}
#endif

// A packing output: at least `numel` elements of the accumulation type of `weight_dtype` (rnn.h: A).
void require_pack_out(const TensorView& out, int64_t numel, DType weight_dtype, const char* op) {
  const DType acc = weight_dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  if (out.numel() < numel || out.dtype != acc)
    throw py::value_error(std::string("pyseqkern: ") + op + ": 'out' must hold " + std::to_string(numel) + " " +
                          dtype_name(acc) + " elements");
}

// The weights of a pack (rnn_pack, rnn_pack_current) and its output, checked; `op` names the caller.
RnnPackParams pack_params(int mode, bool reset_after, int64_t hidden, int64_t proj, py::handle w_hh_c,
                          py::handle w_hr_c, const TensorView& w, const TensorView& out, const RnnCpuKernels& kern,
                          const char* op) {
  RnnPackParams p{};
  p.shape = rnn_shape(mode, reset_after, hidden, proj);
  p.dtype = w.dtype;
  p.w_hh = w.data;
  p.ld_w_hh = row_stride(w, "w_hh");
  if (w.sizes[0] != rnn_gate_count(p.shape.mode) * hidden || w.sizes[1] != p.shape.state())
    throw py::value_error(std::string("pyseqkern: ") + op + ": 'w_hh' must be [G*H, K]");
  if (proj > 0) {
    if (w_hr_c.is_none())
      throw py::value_error(std::string("pyseqkern: ") + op + ": 'w_hr' [P, H] is required where 'proj' > 0");
    TensorView r = view_of(w_hr_c, "w_hr");
    if (r.ndim != 2 || r.sizes[0] != proj || r.sizes[1] != hidden || r.dtype != w.dtype)
      throw py::value_error(std::string("pyseqkern: ") + op + ": 'w_hr' must be [P, H] = [" + std::to_string(proj) +
                            ", " + std::to_string(hidden) + "] of w_hh's dtype " + dtype_name(w.dtype) + ", got " +
                            shape_text(r) + " " + dtype_name(r.dtype));
    p.ld_w_hr = row_stride(r, "w_hr");
    p.w_hr = r.data;
  }
  const bool on_cuda = w.device == DeviceKind::Cuda;
  require_pack_out(out, rnn_sizes_of(p.shape, 1, w.dtype, on_cuda, kern).packed_numel, w.dtype, op);
  p.out = out.data;
  return p;
}

// `pieces` false: the piece sections left unwritten (pack_stamp.h), a pack for calls below split_rows only.
void rnn_pack_entry(int mode, bool reset_after, int64_t hidden, int64_t proj, py::handle w_hh_c, py::handle w_hr_c,
                    py::handle out_c, uintptr_t stream, int num_threads, bool pieces) {
  TensorView w = view_of(w_hh_c, "w_hh"), out = view_of(out_c, "out");
  const RnnCpuKernels& kern = rnn_cpu_kernels();
  RnnPackParams p = pack_params(mode, reset_after, hidden, proj, w_hh_c, w_hr_c, w, out, kern, "rnn_pack");
  const bool on_cuda = w.device == DeviceKind::Cuda;
  if (on_cuda) {
#ifdef PSK_WITH_CUDA
    require_on(w, "w_hh", out_c, "out");
    if (proj > 0) require_on(w, "w_hh", w_hr_c, "w_hr");
    CudaDeviceGuard guard(w);
    rnn_pack_cuda(p, as_stream(stream));
    return;
#else
    (void)stream;
    throw_no_cuda("rnn_pack");
#endif
  }
  require_cpu_dtype(p.dtype, "rnn_pack", "w_hh");
  p.num_threads = num_threads;
  p.skip_pieces = !pieces;
  int64_t at = 0;
  const PackStamp stamp = weights_stamp(p.shape, p.dtype, kern, &at, !pieces);
  py::gil_scoped_release nogil;
  kern.pack(p);
  write_stamp(p.out, p.dtype, at, stamp);
}

// Whether `packed` (rnn_pack's output for these weights at the active level, CPU) still matches w_hh / w_hr
// bit for bit: a pack reused across calls that record gradients is checked so (rnn.h pack_current).
bool rnn_pack_current_entry(int mode, bool reset_after, int64_t hidden, int64_t proj, py::handle w_hh_c,
                            py::handle w_hr_c, py::handle packed_c) {
  TensorView w = view_of(w_hh_c, "w_hh"), packed = view_of(packed_c, "packed");
  if (w.device != DeviceKind::Cpu || packed.device != DeviceKind::Cpu)
    throw py::value_error("pyseqkern: rnn_pack_current: CPU tensors only");
  const RnnCpuKernels& kern = rnn_cpu_kernels();
  require_cpu_dtype(w.dtype, "rnn_pack_current", "w_hh");
  // (a pack smaller than this level's layout, or of another dtype, is another level's: not current)
  if (packed.dtype != (w.dtype == DType::Float64 ? DType::Float64 : DType::Float32) ||
      packed.numel() < rnn_sizes_of(rnn_shape(mode, reset_after, hidden, proj), 1, w.dtype, false, kern).packed_numel)
    return false;
  RnnPackParams p = pack_params(mode, reset_after, hidden, proj, w_hh_c, w_hr_c, w, packed, kern, "rnn_pack_current");
  if (proj > 0 && view_of(w_hr_c, "w_hr").device != DeviceKind::Cpu)
    throw py::value_error("pyseqkern: rnn_pack_current: CPU tensors only");
  int64_t at = 0;
  const PackStamp stamp = weights_stamp(p.shape, p.dtype, kern, &at);
  // (another level's or layer's pack)
  if (!stamp_mismatch(p.out, packed.numel(), p.dtype, at, stamp).empty()) return false;
  py::gil_scoped_release nogil;
  return kern.pack_current(p);
}

// The CPU input panel (rnn.h RnnPackInputParams): its size for the active level, 0 where the forward
// cannot project the input itself (bfloat16 without dot products, or with an odd I).
int64_t rnn_input_panel_numel_entry(int mode, bool reset_after, int64_t hidden, int64_t input, const std::string& dtype) {
  if (input < 1 || input > kMaxRows)
    throw py::value_error("pyseqkern: rnn_input_panel_numel: 'input' must be in [1, 2^31]");
  const DType d = rnn_dtype(dtype);
  const int64_t numel = rnn_cpu_kernels().input_panel_numel(rnn_shape(mode, reset_after, hidden, 0), input, d);
  return numel > 0 ? numel + stamp_elems(d) : 0;  // with its stamp (pack_stamp.h)
}

void rnn_pack_input_entry(int mode, bool reset_after, int64_t hidden, py::handle w_ih_c, py::handle out_c) {
  RnnPackInputParams p{};
  p.shape = rnn_shape(mode, reset_after, hidden, 0);
  TensorView w = view_of(w_ih_c, "w_ih"), out = view_of(out_c, "out");
  if (w.device != DeviceKind::Cpu || out.device != DeviceKind::Cpu)
    throw py::value_error("pyseqkern: rnn_pack_input: CPU tensors only");
  p.dtype = w.dtype;
  require_cpu_dtype(p.dtype, "rnn_pack_input", "w_ih");
  p.w_ih = w.data;
  p.ld_w_ih = row_stride(w, "w_ih");
  p.input = w.sizes[1];
  if (w.sizes[0] != rnn_gate_count(p.shape.mode) * hidden)
    throw py::value_error("pyseqkern: rnn_pack_input: 'w_ih' must be [G*H, I]");
  const RnnCpuKernels& kern = rnn_cpu_kernels();
  int64_t at = 0;
  const PackStamp stamp = panel_stamp(p.shape, p.dtype, p.input, kern, &at);
  if (at == 0)
    throw py::value_error(std::string("pyseqkern: rnn_pack_input: no input panel for ") + dtype_name(w.dtype) +
                          " with I = " + std::to_string(p.input) + " at this CPU level");
  require_pack_out(out, at + stamp_elems(p.dtype), w.dtype, "rnn_pack_input");
  p.out = out.data;
  py::gil_scoped_release nogil;
  kern.pack_input(p);
  write_stamp(p.out, p.dtype, at, stamp);
}

// The row mapping of a call, checked against itself (rnn.h): the kernels index rows, lengths and offsets
// with it unchecked. `rows` gets N, the rows of sequence data it reaches; every row-indexed tensor is then
// held to at least that many rows (check_rows). Packed metadata: batch_sizes in host memory, int64,
// non-increasing from at most B; on the CPU time_offsets and lengths are checked to be exactly what
// batch_sizes implies (O(T + B)); CUDA keeps them in device memory, where _device_seq made them from it.
RnnSeq rnn_seq(int64_t steps, int64_t batch, py::handle batch_sizes, py::handle time_offsets, py::handle lengths,
               int64_t row_stride_t, int64_t row_stride_b, bool reverse, int64_t* rows) {
  RnnSeq q{};
  if (steps < 0 || batch < 0)
    throw py::value_error("pyseqkern: rnn: 'steps' and 'batch' must be >= 0");
  // Every row takes at least one step: the kernels write a row's h_n/c_n at its last step, so a row
  // without one would return them unwritten.
  if (steps == 0 && batch > 0)
    throw py::value_error("pyseqkern: rnn: 'steps' must be >= 1 where 'batch' > 0");
  q.steps = steps;
  q.batch = batch;
  q.row_stride_t = row_stride_t;
  q.row_stride_b = row_stride_b;
  q.reverse = reverse;
  const bool packed = !batch_sizes.is_none();
  // All three or none: the kernels key the packed row mapping on batch_sizes alone.
  if (packed != !time_offsets.is_none() || packed != !lengths.is_none())
    throw py::value_error("pyseqkern: rnn: 'batch_sizes', 'time_offsets' and 'lengths' go together (packed "
                          "sequences) or are all None");
  if (!packed) {
    if (row_stride_t < 0 || row_stride_b < 0)
      throw py::value_error("pyseqkern: rnn: 'row_stride_t' and 'row_stride_b' must be >= 0");
    // The last row any step reaches, in checked arithmetic: wrapped, a huge stride passed every bounds
    // check below it and the kernels wrote far out of bounds.
    int64_t t_rows = 0, b_rows = 0, last = 0;
    if (steps > 0 && batch > 0 &&
        (__builtin_mul_overflow(steps - 1, row_stride_t, &t_rows) ||
         __builtin_mul_overflow(batch - 1, row_stride_b, &b_rows) || __builtin_add_overflow(t_rows, b_rows, &last) ||
         __builtin_add_overflow(last, int64_t(1), &last)))
      throw py::value_error("pyseqkern: rnn: 'row_stride_t' and 'row_stride_b' reach past any tensor (overflow)");
    *rows = steps > 0 && batch > 0 ? last : 0;
    // Every row up to the last a step reaches is some (step, sequence)'s, time-major or batch-major:
    // rows no step writes came back uninitialised in y and d_gates_x (a fuzzer, stop 32).
    const bool time_major = (batch == 1 || row_stride_b == 1) && (steps == 1 || row_stride_t == batch);
    const bool batch_major = (steps == 1 || row_stride_t == 1) && (batch == 1 || row_stride_b == steps);
    if (steps > 0 && batch > 0 && !time_major && !batch_major)
      throw py::value_error("pyseqkern: rnn: 'row_stride_t' and 'row_stride_b' must lay the steps' rows out "
                            "densely: (batch, 1) time-major or (1, steps) batch-major");
    return q;
  }
  auto index = [](py::handle h, const char* arg, int64_t n) {
    TensorView v = view_of(h, arg);
    if (v.dtype != DType::Int64 || v.ndim != 1 || !v.is_contiguous() || v.numel() < n)
      throw py::value_error(std::string("pyseqkern: rnn: '") + arg + "' must be a 1-D contiguous int64 tensor of at " +
                            "least " + std::to_string(n) + " values");
    return v;
  };
  TensorView bs = index(batch_sizes, "batch_sizes", steps), to = index(time_offsets, "time_offsets", steps),
             len = index(lengths, "lengths", batch);
  if (bs.device != DeviceKind::Cpu)
    throw py::value_error("pyseqkern: rnn: 'batch_sizes' must be a CPU tensor (host memory)");
  const auto* b = static_cast<const int64_t*>(bs.data);
  int64_t n = 0;
  for (int64_t t = 0; t < steps; ++t) {
    if (b[t] < 0 || b[t] > (t ? b[t - 1] : batch))
      throw py::value_error("pyseqkern: rnn: 'batch_sizes' must be non-increasing from at most 'batch', >= 0 (a "
                            "PackedSequence's batch_sizes[0] is its number of sequences: len(sorted_indices) or "
                            "hx's batch where the layer was compiled or exported)");
    n += b[t];
  }
  if (steps > 0 && b[0] != batch)  // (rows past batch_sizes[0] would take no step: h_n unwritten)
    throw py::value_error("pyseqkern: rnn: 'batch_sizes' must start at 'batch' (every row takes a step; a "
                          "PackedSequence's batch_sizes[0] is its number of sequences: len(sorted_indices) or hx's "
                          "batch where the layer was compiled or exported)");
  if (to.device == DeviceKind::Cpu) {
    const auto* o = static_cast<const int64_t*>(to.data);
    for (int64_t t = 0, off = 0; t < steps; off += b[t], ++t)
      if (o[t] != off) throw py::value_error("pyseqkern: rnn: 'time_offsets' must be the exclusive cumsum of 'batch_sizes'");
  }
  if (len.device == DeviceKind::Cpu) {
    const auto* l = static_cast<const int64_t*>(len.data);
    for (int64_t r = 0, t = steps; r < batch; ++r) {
      while (t > 0 && b[t - 1] <= r) --t;  // steps whose batch size exceeds r
      if (l[r] != t) throw py::value_error("pyseqkern: rnn: 'lengths' must be the steps of each row by 'batch_sizes'");
    }
  }
  q.batch_sizes = b;
  q.time_offsets = static_cast<const int64_t*>(to.data);
  q.lengths = static_cast<const int64_t*>(len.data);
  *rows = n;
  return q;
}

// The workspace a forward needs beyond sizes' where it projects each step's rows itself (x without
// x_gates_buf): the step's own x_gates, B*G*ceil(H/L)*L (rnn.h). rnn_forward, the cells' step and
// the planned sequence (RnnCellStep) all size it so.
int64_t own_x_gates_numel(const RnnShape& shape, int64_t batch, int64_t lanes) {
  return batch * rnn_gate_count(shape.mode) * ((shape.hidden + lanes - 1) / lanes * lanes);
}

// A row-indexed tensor (sequence data) as the kernels read or write it: `rows` rows of `cols` values of
// `dtype`, contiguous within a row, `ld` apart (the view's own row stride where ld < 0). Returns the
// row stride.
int64_t check_rows(const TensorView& v, const char* arg, int64_t rows, int64_t cols, DType dtype, int64_t ld = -1) {
  const int64_t stride = row_stride(v, arg);
  if (v.dtype != dtype || v.sizes[0] < rows || v.sizes[1] < cols || (ld >= 0 && rows > 1 && stride != ld))
    throw py::value_error(std::string("pyseqkern: rnn: '") + arg + "' must hold " + std::to_string(rows) + " rows of " +
                          std::to_string(cols) + " " + dtype_name(dtype) + " values" +
                          (ld >= 0 ? ", " + std::to_string(ld) + " apart" : std::string()));
  return stride;
}

// A dense tensor of at least `numel` values of `dtype` (states, packed weights, workspace), or None.
void* dense_of(py::handle h, const char* arg, DType dtype, int64_t numel, bool optional = true) {
  if (h.is_none()) {
    if (optional) return nullptr;
    throw py::value_error(std::string("pyseqkern: rnn: '") + arg + "' is required");
  }
  TensorView v = view_of(h, arg);
  if (v.dtype != dtype || !v.is_contiguous() || v.numel() < numel)
    throw py::value_error(std::string("pyseqkern: rnn: '") + arg + "' must be a contiguous " + dtype_name(dtype) +
                          " tensor of at least " + std::to_string(numel) + " values");
  return v.data;
}

// Returns the path that ran: "cpu", or on CUDA "persistent" or "step" (backend_info() reports it).
std::string rnn_forward_entry(int mode, bool reset_after, int64_t hidden, int64_t proj, int64_t steps, int64_t batch,
                       py::handle batch_sizes, py::handle time_offsets, py::handle lengths, int64_t row_stride_t,
                       int64_t row_stride_b, bool reverse, py::handle x_gates, py::handle b_hn, py::handle h0,
                       py::handle c0, py::handle y, int64_t ld_y, py::handle h_n, py::handle c_n, py::handle packed,
                       py::handle reserve, py::handle workspace, int num_threads, uintptr_t stream,
                       int path, py::handle x, py::handle packed_in, py::handle x_gates_buf, py::handle x_bias,
                       bool ride) {
  RnnFwdParams p{};
  p.shape = rnn_shape(mode, reset_after, hidden, proj);
  const RnnCpuKernels& kern = rnn_cpu_kernels();
  int64_t rows = 0;
  p.seq = rnn_seq(steps, batch, batch_sizes, time_offsets, lengths, row_stride_t, row_stride_b, reverse, &rows);
  if (!x.is_none()) {
    // The forward projects the input itself (CPU): x_gates is the bias row [1, G*H] or None.
    TensorView xv = view_of(x, "x"), pin = view_of(packed_in, "packed_in");
    if (xv.device != DeviceKind::Cpu || pin.device != DeviceKind::Cpu)
      throw py::value_error("pyseqkern: rnn_forward: 'x' (in-kernel input projection) is CPU only");
    p.dtype = xv.dtype;
    p.x = xv.data;
    p.ld_x = row_stride(xv, "x");
    p.input = xv.sizes[1];
    if (p.input > kMaxRows)  // (an x of no rows may be as wide as it likes)
      throw py::value_error("pyseqkern: rnn_forward: 'x' must have at most 2^31 features");
    const int64_t numel = kern.input_panel_numel(p.shape, p.input, p.dtype);
    if (numel == 0)
      throw py::value_error("pyseqkern: rnn_forward: 'packed_in' must be rnn_pack_input's output for this 'x'");
    p.packed_in = dense_of(packed_in, "packed_in", p.dtype == DType::Float64 ? DType::Float64 : DType::Float32,
                           numel + stamp_elems(p.dtype), false);
    if (!x_gates.is_none()) {
      TensorView b = view_of(x_gates, "x_gates");
      if (b.dtype != p.dtype || b.numel() != rnn_gate_count(p.shape.mode) * hidden || !b.is_contiguous())
        throw py::value_error("pyseqkern: rnn_forward: with 'x', 'x_gates' is the [G*H] bias row in x's dtype");
      p.x_gates = b.data;
    }
    if (!x_gates_buf.is_none()) {
      // Every row projected before the steps, into x_gates_buf [N, G*H] (rows of sequence data).
      TensorView buf = view_of(x_gates_buf, "x_gates_buf");
      // N = x's rows, or a ring of kRnnRideRing rows for a forward that rides (rnn.h; the kernel
      // refuses it otherwise).
      if (buf.dtype != p.dtype || buf.device != DeviceKind::Cpu || buf.ndim != 2 ||
          (buf.sizes[0] != xv.sizes[0] && (buf.sizes[0] != kRnnRideRing || xv.sizes[0] < kRnnRideRing)) ||
          buf.sizes[1] != rnn_gate_count(p.shape.mode) * hidden)
        throw py::value_error("pyseqkern: rnn_forward: 'x_gates_buf' must be a CPU [N, G*H] tensor in x's dtype, "
                              "N = x's rows (or " + std::to_string(kRnnRideRing) +
                              ", a ring, for a one-row sequence whose projection rides in the steps)");
      p.x_gates_buf = buf.data;
      p.ld_gates = row_stride(buf, "x_gates_buf");
      p.x_rows = xv.sizes[0];
      p.x_gates_buf_rows = buf.sizes[0];
      p.ride = ride;  // (the kernel checks that it can)
    }
  } else {
    if (!x_gates_buf.is_none())
      throw py::value_error("pyseqkern: rnn_forward: 'x_gates_buf' is where the kernel projects 'x'; pass 'x' too");
    TensorView xg = view_of(x_gates, "x_gates");
    p.dtype = xg.dtype;
    p.x_gates = xg.data;
    p.ld_gates = row_stride(xg, "x_gates");
    if (!x_bias.is_none()) {
      TensorView b = view_of(x_bias, "x_bias");
      if (b.dtype != p.dtype || b.device != DeviceKind::Cpu || xg.device != DeviceKind::Cpu ||
          b.numel() != rnn_gate_count(p.shape.mode) * hidden || !b.is_contiguous())
        throw py::value_error("pyseqkern: rnn_forward: 'x_bias' must be a contiguous CPU [G*H] row in x_gates' dtype, "
                              "with CPU x_gates");
      p.x_bias = b.data;
    }
  }
  if (p.x != nullptr && !x_bias.is_none())
    throw py::value_error("pyseqkern: rnn_forward: 'x_bias' goes with x_gates made outside the kernel, not with 'x'");
  if (ride && p.x_gates_buf == nullptr)
    throw py::value_error("pyseqkern: rnn_forward: 'ride' projects inside the steps into 'x_gates_buf'; pass 'x' and "
                          "'x_gates_buf' too");
  // Everything the kernels index, held to the rows and sizes they reach (a direct op call with
  // inconsistent arguments would otherwise write out of bounds).
  const int64_t H = hidden, K = p.shape.state(), G = rnn_gate_count(p.shape.mode);
  const TensorView rows_of = p.x != nullptr ? view_of(x, "x") : view_of(x_gates, "x_gates");
  // Packed: every row is a row of sequence data (a compiled or exported graph leaves this check to the
  // kernel entry; fewer rows than x's would return the rest of y unwritten).
  if (!batch_sizes.is_none() && (rows_of.ndim != 2 || rows_of.sizes[0] != rows))
    throw py::value_error("pyseqkern: rnn_forward: 'batch_sizes' must sum to the rows of the packed input (" +
                          std::to_string(rows_of.ndim == 2 ? rows_of.sizes[0] : -1) + "), got " +
                          std::to_string(rows));
  if (p.x != nullptr)
    check_rows(rows_of, "x", rows, p.input, p.dtype);
  else
    check_rows(rows_of, "x_gates", rows, G * H, p.dtype);
  // Padded: y has exactly the rows the steps write (the op sizes y by x_gates; more rows came back
  // uninitialised, a fuzzer, stop 32).
  if (batch_sizes.is_none() && view_of(y, "y").sizes[0] != rows)
    throw py::value_error("pyseqkern: rnn_forward: '" + std::string(p.x != nullptr ? "x" : "x_gates") +
                          "' and 'y' must have exactly the " + std::to_string(rows) +
                          " rows that 'steps', 'batch' and the row strides reach");
  const RnnSizes sz = rnn_sizes_of(p.shape, batch, p.dtype, rows_of.device != DeviceKind::Cpu, kern);
  const DType acc = p.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  p.b_hn = dense_of(b_hn, "b_hn", p.dtype, H);
  p.h0 = dense_of(h0, "h0", p.dtype, batch * K);
  p.c0 = dense_of(c0, "c0", p.dtype, batch * H);
  const TensorView yv = view_of(y, "y");
  check_rows(yv, "y", rows, K, p.dtype, ld_y);
  if (!batch_sizes.is_none() && (yv.ndim != 2 || yv.sizes[0] != rows))
    throw py::value_error("pyseqkern: rnn_forward: 'batch_sizes' must sum to the rows of 'y'");
  p.y = yv.data;
  p.ld_y = ld_y;
  p.h_n = dense_of(h_n, "h_n", p.dtype, batch * K, false);
  p.c_n = dense_of(c_n, "c_n", p.dtype, batch * H);
  p.packed = dense_of(packed, "packed", acc, sz.packed_numel, false);
  p.reserve = dense_of(reserve, "reserve", acc, rows * sz.reserve_cols);
  const int64_t own_gates = p.x != nullptr && p.x_gates_buf == nullptr ? own_x_gates_numel(p.shape, batch, sz.lanes) : 0;
  p.workspace = dense_of(workspace, "workspace", acc, sz.workspace_numel + own_gates, false);
  p.num_threads = num_threads;
  const char* anchor = p.x != nullptr ? "x" : "x_gates";
  const std::pair<py::handle, const char*> tensors[] = {
      {b_hn, "b_hn"}, {h0, "h0"}, {c0, "c0"}, {y, "y"}, {h_n, "h_n"}, {c_n, "c_n"}, {packed, "packed"},
      {reserve, "reserve"}, {workspace, "workspace"}, {x_gates, "x_gates"}, {packed_in, "packed_in"},
      {x_gates_buf, "x_gates_buf"}, {x_bias, "x_bias"}};
  for (const auto& [h, arg] : tensors) require_on(rows_of, anchor, h, arg);
  if (rows_of.device != DeviceKind::Cpu) {
#ifdef PSK_WITH_CUDA
    require_cuda_seq(rows_of, anchor, batch_sizes, time_offsets, lengths);
    const RnnCudaPath request = rnn_cuda_path(path);
    CudaDeviceGuard guard(rows_of);
    py::gil_scoped_release nogil;
    return rnn_cuda_path_name(rnn_forward_cuda(p, request, as_stream(stream)));
#else
    (void)stream;
    (void)path;
    throw_no_cuda("rnn_forward");
#endif
  }
  require_cpu_dtype(p.dtype, "rnn_forward", anchor);
  require_on(rows_of, anchor, time_offsets, "time_offsets");
  require_on(rows_of, anchor, lengths, "lengths");
  require_weights_stamp(packed, p.shape, p.dtype, kern, "rnn_forward", p.seq.batch);
  if (p.x != nullptr) require_panel_stamp(packed_in, p.shape, p.dtype, p.input, kern, "rnn_forward");
  py::gil_scoped_release nogil;
  kern.forward(p);
  return "cpu";
}

std::string rnn_backward_entry(int mode, bool reset_after, int64_t hidden, int64_t proj, int64_t steps, int64_t batch,
                        py::handle batch_sizes, py::handle time_offsets, py::handle lengths, int64_t row_stride_t,
                        int64_t row_stride_b, bool reverse, py::handle dy, int64_t ld_dy, py::handle dh_n,
                        py::handle dc_n, py::handle c0, py::handle reserve, py::handle packed, py::handle d_gates_x,
                        py::handle d_gates_h, py::handle d_proj, py::handle dh0, py::handle dc0, py::handle workspace,
                        int num_threads, py::handle d_gates_xt, py::handle d_gates_ht, py::handle h_prev_t,
                        uintptr_t stream, int path) {
  RnnBwdParams p{};
  p.shape = rnn_shape(mode, reset_after, hidden, proj);
  const RnnCpuKernels& kern = rnn_cpu_kernels();
  int64_t rows = 0;
  p.seq = rnn_seq(steps, batch, batch_sizes, time_offsets, lengths, row_stride_t, row_stride_b, reverse, &rows);
  const int64_t H = hidden, K = p.shape.state(), G = rnn_gate_count(p.shape.mode);
  TensorView gx = view_of(d_gates_x, "d_gates_x");
  p.dtype = gx.dtype;
  p.d_gates_x = gx.data;
  p.ld_dgx = check_rows(gx, "d_gates_x", rows, G * H, p.dtype);
  TensorView gh;
  p.d_gates_h = const_cast<void*>(opt_data(d_gates_h, "d_gates_h", &gh));
  p.ld_dgh = p.d_gates_h ? check_rows(gh, "d_gates_h", rows, G * H, p.dtype) : 0;
  const RnnSizes sz = rnn_sizes_of(p.shape, batch, p.dtype, gx.device != DeviceKind::Cpu, kern);
  const DType acc = p.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  // Transposed copies [cols, N], all with one leading dimension (rnn.h).
  p.ld_t = -1;
  auto transposed = [&](py::handle h, const char* arg, int64_t cols) -> void* {
    TensorView t;
    if (!opt_data(h, arg, &t)) return nullptr;
    const int64_t ld = row_stride(t, arg);
    if (t.dtype != gx.dtype || t.sizes[0] != cols || t.sizes[1] != gx.sizes[0] || t.sizes[1] < rows ||
        (p.ld_t >= 0 && ld != p.ld_t))
      throw py::value_error(std::string("pyseqkern: rnn_backward: '") + arg +
                            "' must be [cols, N] of the gradients' dtype, one leading dimension for all");
    p.ld_t = ld;
    return t.data;
  };
  const int64_t gate_rows = rnn_gate_count(p.shape.mode) * hidden;
  p.d_gates_xt = transposed(d_gates_xt, "d_gates_xt", gate_rows);
  p.d_gates_ht = transposed(d_gates_ht, "d_gates_ht", gate_rows);
  p.h_prev_t = transposed(h_prev_t, "h_prev_t", p.shape.state());
  // (no rows, as at batch 0: nothing is written, and a zero-row buffer arrives as None)
  if (p.shape.mode == RnnMode::Gru && p.shape.reset_after && !p.d_gates_h && !p.d_gates_ht && rows > 0)
    throw py::value_error("pyseqkern: rnn_backward: GRU with reset_after needs 'd_gates_h' or 'd_gates_ht'");
  TensorView dyv;
  p.dy = opt_data(dy, "dy", &dyv);
  if (p.dy) check_rows(dyv, "dy", rows, K, p.dtype, ld_dy);
  p.ld_dy = ld_dy;
  p.dh_n = dense_of(dh_n, "dh_n", p.dtype, batch * K);
  p.dc_n = dense_of(dc_n, "dc_n", p.dtype, batch * H);
  p.c0 = dense_of(c0, "c0", p.dtype, batch * H);
  p.reserve = dense_of(reserve, "reserve", acc, rows * sz.reserve_cols, false);
  // The op sizes d_gates_x by the reserve's rows: exactly the sequence's, or rows past it came back
  // uninitialised (a fuzzer, stop 32).
  if (const TensorView rv = view_of(reserve, "reserve"); rv.ndim != 2 || rv.sizes[0] != rows || gx.sizes[0] != rows)
    throw py::value_error("pyseqkern: rnn_backward: 'reserve' (and 'd_gates_x') must have exactly the " +
                          std::to_string(rows) + " rows of the sequence, as rnn_forward made it");
  p.packed = dense_of(packed, "packed", acc, sz.packed_numel, false);
  TensorView dp;
  p.d_proj = const_cast<void*>(opt_data(d_proj, "d_proj", &dp));
  if (proj > 0 && !p.d_proj && rows > 0)  // (a zero-row d_proj arrives as None, as d_gates_h above)
    throw py::value_error("pyseqkern: rnn_backward: LSTM with proj needs 'd_proj'");
  if (p.d_proj) check_rows(dp, "d_proj", rows, proj, p.dtype, proj);  // (both kernels write row * P + k)
  p.dh0 = dense_of(dh0, "dh0", p.dtype, batch * K, false);
  p.dc0 = dense_of(dc0, "dc0", p.dtype, batch * H);
  p.workspace = dense_of(workspace, "workspace", acc, sz.workspace_numel, false);
  p.num_threads = num_threads;
  const std::pair<py::handle, const char*> tensors[] = {
      {dy, "dy"}, {dh_n, "dh_n"}, {dc_n, "dc_n"}, {c0, "c0"}, {reserve, "reserve"}, {packed, "packed"},
      {d_gates_h, "d_gates_h"}, {d_proj, "d_proj"}, {dh0, "dh0"}, {dc0, "dc0"}, {workspace, "workspace"},
      {d_gates_xt, "d_gates_xt"}, {d_gates_ht, "d_gates_ht"}, {h_prev_t, "h_prev_t"}};
  for (const auto& [h, arg] : tensors) require_on(gx, "d_gates_x", h, arg);
  if (gx.device != DeviceKind::Cpu) {
#ifdef PSK_WITH_CUDA
    if (p.d_gates_xt || p.d_gates_ht || p.h_prev_t)
      throw py::value_error("pyseqkern: rnn_backward (CUDA): transposed outputs are CPU-only; pass None");
    if (p.shape.mode == RnnMode::Gru && p.shape.reset_after && !p.d_gates_h)
      throw py::value_error("pyseqkern: rnn_backward (CUDA): GRU with reset_after needs 'd_gates_h'");
    require_cuda_seq(gx, "d_gates_x", batch_sizes, time_offsets, lengths);
    const RnnCudaPath request = rnn_cuda_path(path);
    CudaDeviceGuard guard(gx);
    py::gil_scoped_release nogil;
    return rnn_cuda_path_name(rnn_backward_cuda(p, request, as_stream(stream)));
#else
    (void)stream;
    (void)path;
    throw_no_cuda("rnn_backward");
#endif
  }
  require_cpu_dtype(p.dtype, "rnn_backward", "d_gates_x (the dtype of dy, dh_n, dc_n)");
  require_on(gx, "d_gates_x", time_offsets, "time_offsets");
  require_on(gx, "d_gates_x", lengths, "lengths");
  require_weights_stamp(packed, p.shape, p.dtype, kern, "rnn_backward", p.seq.batch);
  py::gil_scoped_release nogil;
  kern.backward(p);
  return "cpu";
}

// ---- the cells' thin inference path --------------------------------------------------------------------
// One cell step with the parameters fixed (pyseqkern/ops/rnn.py, _CellPlan): everything that depends only
// on the parameters (shape, dtype, packed weights, input panel, bias row, b_hn) is checked once, here, and
// the kernel table of the level that packed them is kept. A step passes only the call's own tensors, as
// data pointers of tensors the Python layer has checked (x [batch, I], h, c, h_n, c_n [batch, H], all of
// the plan's dtype, CPU, contiguous; h and c may be 0 for zeros). At B=1, H=256 the capsules and the
// general rnn_forward entry were 4 us of an RNNCell step's 14. The Python plan owns the tensors this
// object points into.
class RnnCellStep {
 public:
  RnnCellStep(int mode, bool reset_after, int64_t hidden, int64_t input, const std::string& dtype,
              py::handle packed, py::handle packed_in, py::handle bias, py::handle b_hn)
      : kernels_(rnn_cpu_kernels()) {
    RnnFwdParams& p = base_;
    p.shape = rnn_shape(mode, reset_after, hidden, 0);
    p.dtype = rnn_dtype(dtype);
    require_cpu_dtype(p.dtype, "RnnCellStep", "dtype");
    p.input = input;
    const int64_t panel_numel =
        input > 0 && input <= kMaxRows ? kernels_.input_panel_numel(p.shape, input, p.dtype) : 0;
    if (panel_numel == 0)
      throw py::value_error("pyseqkern: RnnCellStep: no input panel for " + dtype + " with this 'input' here");
    const RnnSizes sz = kernels_.sizes(p.shape, 1, p.dtype);
    lanes_ = sz.lanes;
    const DType acc = p.dtype == DType::Float64 ? DType::Float64 : DType::Float32;
    auto own = [&](py::handle h, const char* arg, DType want, int64_t numel) -> const void* {
      if (h.is_none()) return nullptr;
      const TensorView v = view_of(h, arg);
      if (v.device != DeviceKind::Cpu || v.dtype != want || v.numel() < numel || !v.is_contiguous())
        throw py::value_error(std::string("pyseqkern: RnnCellStep: '") + arg + "' must be a contiguous CPU " +
                              dtype_name(want) + " tensor of at least " + std::to_string(numel) + " elements");
      return v.data;
    };
    if (packed.is_none() || packed_in.is_none())
      throw py::value_error("pyseqkern: RnnCellStep: 'packed' and 'packed_in' are required");
    p.packed = own(packed, "packed", acc, sz.packed_numel + stamp_elems(p.dtype));
    p.packed_in = own(packed_in, "packed_in", acc, panel_numel + stamp_elems(p.dtype));
    // (its batch varies call to call: a whole pack, as the caches hold)
    require_weights_stamp(packed, p.shape, p.dtype, kernels_, "RnnCellStep", INT64_MAX);
    require_panel_stamp(packed_in, p.shape, p.dtype, input, kernels_, "RnnCellStep");
    p.x_gates = own(bias, "bias", p.dtype, rnn_gate_count(p.shape.mode) * hidden);  // the bias row, or none
    p.b_hn = own(b_hn, "b_hn", p.dtype, hidden);
  }

  // y: where the step's output goes besides h_n (a one-step sequence's output tensor), or 0 (h_n only).
  void run(int64_t batch, uintptr_t x, uintptr_t h, uintptr_t c, uintptr_t h_n, uintptr_t c_n,
           int num_threads, bool spread, uintptr_t y) const {
    if (batch < 1 || x == 0 || h_n == 0 || (base_.shape.mode == RnnMode::Lstm) != (c_n != 0))
      throw py::value_error("pyseqkern: RnnCellStep.run: needs batch >= 1, x and h_n, and c_n exactly for LSTM");
    RnnFwdParams p = base_;
    p.seq = RnnSeq{1, batch, nullptr, nullptr, nullptr, batch, 1, false};
    p.x = reinterpret_cast<const void*>(x);
    p.ld_x = p.input;
    p.h0 = reinterpret_cast<const void*>(h);
    p.c0 = reinterpret_cast<const void*>(c);
    // One step: each row's output is its final state, so y and h_n may share one buffer (rnn.h allows it).
    p.h_n = reinterpret_cast<void*>(h_n);
    p.y = y != 0 ? reinterpret_cast<void*>(y) : p.h_n;
    p.ld_y = p.shape.hidden;
    p.c_n = reinterpret_cast<void*>(c_n);
    p.num_threads = num_threads;
    p.spread = spread;
    // The workspace plus the kernel's own x_gates.
    const int64_t numel =
        kernels_.sizes(p.shape, batch, p.dtype).workspace_numel + own_x_gates_numel(p.shape, batch, lanes_);
    py::gil_scoped_release nogil;
    p.workspace = workspace(numel * (p.dtype == DType::Float64 ? 8 : 4));
    kernels_.forward(p);
  }

  // A whole inference sequence through the same bound parameters (ops/rnn.py, seq_fast: a layer of a
  // module's plain forward), the kernel projecting the input as rnn_forward does with 'x': time-major
  // rows (b_stride 1, t_stride batch) or batch-major ones (t_stride 1, b_stride steps), for x and y
  // alike, or a packed batch's; `reverse` runs it from its last step (a bidirectional layer's second
  // direction), y's rows ld_y apart (both directions' outputs side by side in one row), and time-major
  // where y_time_major (batch-major rows read, y as torch.nn lays out a batch_first output). `buf`: 0 to
  // project each step's rows inside the step, else the x_gates buffer of buf_rows rows (all of x's, or
  // the ride's ring; `ride` as RnnFwdParams', with a buffer only); `ws`: the workspace of ws_numel
  // accumulation values. The caller (seq_fast) checked every tensor these pointers come from against the
  // plan: this entry checks only the sizes it is told.
  void run_seq(int64_t steps, int64_t batch, int64_t t_stride, int64_t b_stride, uintptr_t x, uintptr_t h,
               uintptr_t c, uintptr_t y, uintptr_t h_n, uintptr_t c_n, uintptr_t ws, int64_t ws_numel,
               uintptr_t buf, int64_t buf_rows, int num_threads, uintptr_t batch_sizes, uintptr_t time_offsets,
               uintptr_t lengths, int64_t packed_rows, bool reverse, int64_t ld_y, bool y_time_major,
               bool ride) const {
    // Packed (PackedSequence order): batch_sizes [steps], time_offsets [steps] and lengths [batch], as
    // ops/rnn.py's _listed_seq made them from checked batch sizes summing to packed_rows.
    const bool packed = batch_sizes != 0;
    const int64_t rows = packed ? packed_rows : steps * batch;
    if (steps < 1 || batch < 1 || x == 0 || y == 0 || h_n == 0 || ws == 0 ||
        (base_.shape.mode == RnnMode::Lstm) != (c_n != 0) ||
        ld_y < base_.shape.hidden || (packed ? time_offsets == 0 || lengths == 0 || rows < 1 || y_time_major
                : !((t_stride == batch && b_stride == 1) || (t_stride == 1 && b_stride == steps))))
      throw py::value_error("pyseqkern: RnnCellStep.run_seq: needs steps, batch >= 1, x, y, h_n and a workspace, "
                            "c_n exactly for LSTM, and time- or batch-major rows (or all three packed forms, "
                            "y's rows as x's)");
    RnnFwdParams p = base_;
    p.seq = packed ? RnnSeq{steps, batch, reinterpret_cast<const int64_t*>(batch_sizes),
                            reinterpret_cast<const int64_t*>(time_offsets), reinterpret_cast<const int64_t*>(lengths),
                            0, 0, reverse}
                   : RnnSeq{steps, batch, nullptr, nullptr, nullptr, t_stride, b_stride, reverse};
    p.x = reinterpret_cast<const void*>(x);
    p.ld_x = p.input;
    p.h0 = reinterpret_cast<const void*>(h);
    p.c0 = reinterpret_cast<const void*>(c);
    p.y = reinterpret_cast<void*>(y);
    p.ld_y = ld_y;
    if (y_time_major) {
      p.y_row_stride_t = batch;
      p.y_row_stride_b = 1;
    }
    p.h_n = reinterpret_cast<void*>(h_n);
    p.c_n = reinterpret_cast<void*>(c_n);
    p.num_threads = num_threads;
    const int64_t G = rnn_gate_count(p.shape.mode);
    int64_t need = kernels_.sizes(p.shape, batch, p.dtype).workspace_numel;
    if (buf != 0) {
      if (buf_rows != rows && (buf_rows != kRnnRideRing || rows < kRnnRideRing))
        throw py::value_error("pyseqkern: RnnCellStep.run_seq: 'buf_rows' must be the sequence's rows or the ring's");
      p.x_gates_buf = reinterpret_cast<void*>(buf);
      p.ld_gates = G * p.shape.hidden;
      p.x_rows = rows;
      p.x_gates_buf_rows = buf_rows;
      p.ride = ride;
    } else {
      if (ride) throw py::value_error("pyseqkern: RnnCellStep.run_seq: 'ride' needs the x_gates buffer ('buf')");
      need += own_x_gates_numel(p.shape, batch, lanes_);
    }
    if (ws_numel < need)
      throw py::value_error("pyseqkern: RnnCellStep.run_seq: the workspace needs " + std::to_string(need) + " values");
    p.workspace = reinterpret_cast<void*>(ws);
    py::gil_scoped_release nogil;
    kernels_.forward(p);
  }

 private:
  // The kernel's workspace lives only inside a call: one per calling thread, grown to the largest seen.
  // pyseqkern.empty_cache() releases the calling thread's (release_workspace).
  static void* workspace(int64_t bytes) {
    std::vector<double>& buf = thread_buffer();
    if (static_cast<int64_t>(buf.size()) * 8 < bytes) buf.resize(static_cast<size_t>(bytes / 8 + 1));
    return buf.data();
  }

 public:
  static void release_workspace() { std::vector<double>().swap(thread_buffer()); }

 private:
  static std::vector<double>& thread_buffer() {
    thread_local std::vector<double> buf;
    return buf;
  }

  const RnnCpuKernels& kernels_;
  RnnFwdParams base_{};
  int64_t lanes_ = 1;
};

// ---- a recorded cell step's pointwise parts (pyseqkern/cell_pointwise.h) -------------------------------
// Internal to ops/rnn_cell_deferred.py, which passes data pointers of contiguous tensors it made or
// checked (0 for the nullable ones); `f64` picks double over float.
template <typename T>
T* at(uintptr_t address) { return reinterpret_cast<T*>(address); }

void cell_lstm_forward(bool f64, int64_t batch, int64_t hidden, uintptr_t gates, uintptr_t c, uintptr_t c_n,
                       uintptr_t tanh_c, uintptr_t h_n) {
  cell_cpu_kernels().lstm_forward(f64, batch, hidden, at<void>(gates), at<const void>(c), at<void>(c_n),
                                  at<void>(tanh_c), at<void>(h_n));
}

void cell_lstm_backward(bool f64, int64_t batch, int64_t hidden, uintptr_t act, uintptr_t c, uintptr_t tanh_c,
                        uintptr_t dh_n, uintptr_t dc_n, uintptr_t d_gates, uintptr_t dc) {
  cell_cpu_kernels().lstm_backward(f64, batch, hidden, at<const void>(act), at<const void>(c),
                                   at<const void>(tanh_c), at<const void>(dh_n), at<const void>(dc_n),
                                   at<void>(d_gates), at<void>(dc));
}

void cell_gru_forward(bool f64, int64_t batch, int64_t hidden, uintptr_t gi, uintptr_t gh, uintptr_t h,
                      uintptr_t act, uintptr_t h_n) {
  cell_cpu_kernels().gru_forward(f64, batch, hidden, at<const void>(gi), at<const void>(gh), at<const void>(h),
                                 at<void>(act), at<void>(h_n));
}

void cell_gru_backward(bool f64, int64_t batch, int64_t hidden, uintptr_t act, uintptr_t gh, uintptr_t h,
                       uintptr_t dh_n, uintptr_t d_gi, uintptr_t d_gh, uintptr_t dh) {
  cell_cpu_kernels().gru_backward(f64, batch, hidden, at<const void>(act), at<const void>(gh), at<const void>(h),
                                  at<const void>(dh_n), at<void>(d_gi), at<void>(d_gh), at<void>(dh));
}

void cell_rnn_forward(bool f64, int64_t batch, int64_t hidden, uintptr_t pre, bool relu) {
  cell_cpu_kernels().rnn_forward(f64, batch, hidden, at<void>(pre), relu);
}

void cell_rnn_backward(bool f64, int64_t batch, int64_t hidden, uintptr_t act, uintptr_t dy, uintptr_t d_pre,
                       bool relu) {
  cell_cpu_kernels().rnn_backward(f64, batch, hidden, at<const void>(act), at<const void>(dy), at<void>(d_pre),
                                  relu);
}

// ---- one step from torch's weight layout (pyseqkern/rnn_direct.h) ----------------------------------
// Internal to ops/rnn_direct.py, whose op impl checks every shape, dtype and device and passes data
// pointers of contiguous tensors (0 for the nullable ones); dtype: 0 float32, 1 float64, 3 bfloat16.
void rnn_direct_step(int mode, bool reset_after, int64_t hidden, int dtype, int64_t batch, int64_t input,
                     uintptr_t x, uintptr_t h0, uintptr_t c0, uintptr_t w_ih, uintptr_t w_hh, uintptr_t b_ih,
                     uintptr_t b_hh, uintptr_t h_n, uintptr_t c_n, uintptr_t workspace, int num_threads) {
  RnnDirectParams p{};
  p.shape = RnnShape{static_cast<RnnMode>(mode), reset_after, hidden, 0};
  p.dtype = static_cast<DType>(dtype);
  require_cpu_dtype(p.dtype, "rnn_direct_step", "dtype");
  p.batch = batch;
  p.input = input;
  p.x = at<const void>(x);
  p.ld_x = input;
  p.h0 = at<const void>(h0);
  p.c0 = at<const void>(c0);
  p.w_ih = at<const void>(w_ih);
  p.ld_w_ih = input;
  p.w_hh = at<const void>(w_hh);
  p.ld_w_hh = hidden;
  p.b_ih = at<const void>(b_ih);
  p.b_hh = at<const void>(b_hh);
  p.h_n = at<void>(h_n);
  p.c_n = at<void>(c_n);
  p.workspace = at<void>(workspace);
  p.num_threads = num_threads;
  py::gil_scoped_release nogil;
  rnn_direct_cpu_kernels().step(p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyseqkern compiled core (no libtorch): kernels behind pyseqkern.ops";
  m.attr("RNN_RIDE_RING") = kRnnRideRing;
  m.def("build_info", &build_info);
  m.def("cpu_isa_report", &cpu_isa_report);
  m.def("set_cpu_l3_streams_fast", &set_cpu_l3_streams_fast);
  m.def("set_cpu_l2_outpaces_l3", &set_cpu_l2_outpaces_l3);
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"), py::arg("all_threads") = false);
  m.def("cpu_isa_follow_default", &isa_follow_default);
  m.def("cuda_report", &cuda_report_dict);
  m.def("describe", &describe, py::arg("capsule"));
  m.def("handoff_noop", &handoff_noop);
  m.def("triad", &triad, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("alpha"), py::arg("num_threads"),
        py::arg("stream"));
  m.def("peak_fma", &peak_fma, py::arg("sink"), py::arg("iters"), py::arg("num_threads"),
        py::arg("threads_per_block"), py::arg("stream"));
  m.def("peak_bf16", &peak_bf16, py::arg("sink"), py::arg("iters"), py::arg("num_threads"));
  m.def("noop_cuda", &noop_cuda_entry, py::arg("device"), py::arg("stream"));
  // CUDA callers add stream (torch's current raw stream) and, for forward/backward, path (0 auto,
  // 1 persistent, 2 step: the PYSEQKERN_CUDA_RNN_PATH override); CPU callers may leave them out.
  m.def("rnn_sizes", &rnn_sizes_entry, py::arg("mode"), py::arg("reset_after"), py::arg("hidden"), py::arg("proj"),
        py::arg("batch"), py::arg("dtype"), py::arg("cuda") = false);
  m.def("rnn_pack", &rnn_pack_entry, py::arg("mode"), py::arg("reset_after"), py::arg("hidden"), py::arg("proj"),
        py::arg("w_hh"), py::arg("w_hr"), py::arg("out"), py::arg("stream") = 0, py::arg("num_threads") = 1,
        py::arg("pieces") = true);
  m.def("rnn_forward", &rnn_forward_entry, py::arg("mode"), py::arg("reset_after"), py::arg("hidden"),
        py::arg("proj"), py::arg("steps"), py::arg("batch"), py::arg("batch_sizes").none(true),
        py::arg("time_offsets").none(true), py::arg("lengths").none(true), py::arg("row_stride_t"),
        py::arg("row_stride_b"), py::arg("reverse"), py::arg("x_gates").none(true), py::arg("b_hn").none(true),
        py::arg("h0").none(true), py::arg("c0").none(true), py::arg("y"), py::arg("ld_y"), py::arg("h_n"),
        py::arg("c_n").none(true), py::arg("packed"), py::arg("reserve").none(true), py::arg("workspace"),
        py::arg("num_threads"), py::arg("stream") = 0, py::arg("path") = 0, py::arg("x") = py::none(),
        py::arg("packed_in") = py::none(), py::arg("x_gates_buf") = py::none(), py::arg("x_bias") = py::none(),
        py::arg("ride") = false);
  m.def("rnn_input_panel_numel", &rnn_input_panel_numel_entry, py::arg("mode"), py::arg("reset_after"),
        py::arg("hidden"), py::arg("input"), py::arg("dtype"));
  m.def("rnn_pack_current", &rnn_pack_current_entry, py::arg("mode"), py::arg("reset_after"), py::arg("hidden"),
        py::arg("proj"), py::arg("w_hh"), py::arg("w_hr"), py::arg("packed"));
  m.def("rnn_pack_input", &rnn_pack_input_entry, py::arg("mode"), py::arg("reset_after"), py::arg("hidden"),
        py::arg("w_ih"), py::arg("out"));
  py::class_<RnnCellStep>(m, "RnnCellStep")
      .def(py::init<int, bool, int64_t, int64_t, const std::string&, py::handle, py::handle, py::handle,
                    py::handle>(),
           py::arg("mode"), py::arg("reset_after"), py::arg("hidden"), py::arg("input"), py::arg("dtype"),
           py::arg("packed"), py::arg("packed_in"), py::arg("bias").none(true), py::arg("b_hn").none(true))
      .def("run", &RnnCellStep::run, py::arg("batch"), py::arg("x"), py::arg("h"), py::arg("c"), py::arg("h_n"),
           py::arg("c_n"), py::arg("num_threads"), py::arg("spread") = false, py::arg("y") = 0)
      .def("run_seq", &RnnCellStep::run_seq)
      .def_static("release_workspace", &RnnCellStep::release_workspace);
  m.def("cell_lstm_forward", &cell_lstm_forward);
  m.def("cell_lstm_backward", &cell_lstm_backward);
  m.def("cell_gru_forward", &cell_gru_forward);
  m.def("cell_gru_backward", &cell_gru_backward);
  m.def("cell_rnn_forward", &cell_rnn_forward);
  m.def("cell_rnn_backward", &cell_rnn_backward);
  m.def("rnn_direct_step", &rnn_direct_step);
  py::class_<Fingerprint>(m, "Fingerprint")
      .def(py::init<const std::vector<Fingerprint::Span>&>(), py::arg("spans"))
      .def("matches", &Fingerprint::matches)
      .def_property_readonly("samples", &Fingerprint::samples);
  m.def("rnn_backward", &rnn_backward_entry, py::arg("mode"), py::arg("reset_after"), py::arg("hidden"),
        py::arg("proj"), py::arg("steps"), py::arg("batch"), py::arg("batch_sizes").none(true),
        py::arg("time_offsets").none(true), py::arg("lengths").none(true), py::arg("row_stride_t"),
        py::arg("row_stride_b"), py::arg("reverse"), py::arg("dy").none(true), py::arg("ld_dy"),
        py::arg("dh_n").none(true), py::arg("dc_n").none(true), py::arg("c0").none(true), py::arg("reserve"),
        py::arg("packed"), py::arg("d_gates_x"), py::arg("d_gates_h").none(true), py::arg("d_proj").none(true),
        py::arg("dh0"), py::arg("dc0").none(true), py::arg("workspace"), py::arg("num_threads"),
        py::arg("d_gates_xt").none(true), py::arg("d_gates_ht").none(true), py::arg("h_prev_t").none(true),
        py::arg("stream") = 0, py::arg("path") = 0);
  m.def("thread_backend", [] { return std::string(thread_backend()); });
  m.def("set_own_threads", &set_own_threads, py::arg("own"));
  m.def("set_thread_scratch_limit", &set_thread_scratch_limit, py::arg("bytes"));
  m.def("barrier_selftest", [](int nthreads, int steps) {
    py::gil_scoped_release nogil;
    return barrier_selftest(nthreads, steps);
  }, py::arg("nthreads"), py::arg("steps"));
}
