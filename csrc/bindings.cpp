// pyseqkern._C: turns Python arguments (DLPack capsules, ints, the stream handle) into params structs,
// releases the GIL and calls one entry. No math here, and nothing that knows about torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "handoff.h"
#include "pyseqkern/isa.h"
#include "pyseqkern/probe.h"
#include "pyseqkern/thread_pool.h"
#ifdef PSK_WITH_CUDA
#include "pyseqkern/cuda_info.h"
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
  return d;
}

void set_cpu_isa(const std::string& name) {
  Isa isa;
  if (!isa_parse(name.c_str(), &isa))
    throw py::value_error("pyseqkern: unknown CPU ISA level '" + name + "'; expected one of baseline, avx2, avx512");
  try {
    isa_set_active(isa);
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyseqkern compiled core (no libtorch): kernels behind pyseqkern.ops";
  m.def("build_info", &build_info);
  m.def("cpu_isa_report", &cpu_isa_report);
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"));
  m.def("cuda_report", &cuda_report_dict);
  m.def("describe", &describe, py::arg("capsule"));
  m.def("handoff_noop", &handoff_noop);
  m.def("triad", &triad, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("alpha"), py::arg("num_threads"),
        py::arg("stream"));
  m.def("peak_fma", &peak_fma, py::arg("sink"), py::arg("iters"), py::arg("num_threads"),
        py::arg("threads_per_block"), py::arg("stream"));
  m.def("noop_cuda", &noop_cuda_entry, py::arg("device"), py::arg("stream"));
  m.def("barrier_selftest", [](int nthreads, int steps) {
    py::gil_scoped_release nogil;
    return barrier_selftest(nthreads, steps);
  }, py::arg("nthreads"), py::arg("steps"));
}
