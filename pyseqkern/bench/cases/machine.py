"""The machine's ceilings: peak float32 FLOP/s (our FMA probe against torch.mm doing as many FLOPs),
peak bfloat16 FLOP/s (the level's bfloat16 arithmetic against torch.mm in bfloat16) and memory
bandwidth (our STREAM triad against torch.add(..., alpha=, out=) on the same buffers).
These rows run first; every later case reports its rate as a share of them. Their samples are long
(25 ms): a ceiling must not depend on the first milliseconds after the other side's block, when torch's
OpenMP threads may still be spinning."""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from ... import _backend
from ..._handoff import stream_of
from ..registry import Case, Prepared, register

_SAMPLE_MS = 25.0

_C = _backend._C
# Chains x lanes per thread and round, as the kernels are compiled (pyseqkern/probe.h).
_CPU_FLOPS_PER_ROUND = {128: 2 * 4 * 12, 256: 2 * 8 * 12, 512: 2 * 16 * 16}
_CUDA_CHAINS = 8


def _cpu_peak(level: str, gemm_n: int):
    def setup(ceilings):
        best = _backend.backend_info()["cpu"]["isa_best"]
        threads = torch.get_num_threads()
        x = torch.randn(gemm_n, gemm_n)
        y = torch.randn(gemm_n, gemm_n)
        out = torch.empty(gemm_n, gemm_n)
        flops = 2.0 * gemm_n ** 3
        sink = torch.empty(threads)
        sink_cap = to_dlpack(sink)

        def ours():
            _backend.set_cpu_isa(level)
            try:
                return _C.peak_fma(sink_cap, iters, threads, 0, 0)
            finally:
                _backend.set_cpu_isa(best)

        _backend.set_cpu_isa(level)
        bits = _backend.backend_info()["cpu"]["vector_bits"]
        _backend.set_cpu_isa(best)
        iters = max(1, int(flops / (_CPU_FLOPS_PER_ROUND[bits] * threads)))
        done = _CPU_FLOPS_PER_ROUND[bits] * threads * iters

        def check():
            assert ours() == done and torch.isfinite(sink).all()

        return Prepared(lambda: torch.mm(x, y, out=out), ours, check, work=done)

    return setup


def _cpu_bf16_peak(level: str, gemm_n: int):
    """The level's bfloat16 arithmetic (AMX tile products, vdpbf16ps, or float32 FMA where bfloat16 layers
    compute in float32) against torch.mm in bfloat16 (oneDNN; AMX where the CPU has it)."""
    def setup(ceilings):
        best = _backend.backend_info()["cpu"]["isa_best"]
        threads = torch.get_num_threads()
        x = torch.randn(gemm_n, gemm_n).bfloat16()
        y = torch.randn(gemm_n, gemm_n).bfloat16()
        out = torch.empty(gemm_n, gemm_n, dtype=torch.bfloat16)
        sink = torch.empty(threads)
        sink_cap = to_dlpack(sink)

        def run(iters):
            _backend.set_cpu_isa(level)
            try:
                return _C.peak_bf16(sink_cap, iters, threads)
            finally:
                _backend.set_cpu_isa(best)

        per_iter = run(1000) / 1000
        iters = max(1, int(2.0 * gemm_n ** 3 / per_iter))
        done = per_iter * iters

        def check():
            assert run(iters) == done and torch.isfinite(sink).all()

        return Prepared(lambda: torch.mm(x, y, out=out), lambda: run(iters), check, work=done)

    return setup


def _cuda_peak(gemm_n: int):
    def setup(ceilings):
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        blocks, tpb = props.multi_processor_count * 8, 256
        sink = torch.empty(blocks * tpb, device=dev)
        cap = to_dlpack(sink)
        x = torch.randn(gemm_n, gemm_n, device=dev)
        y = torch.randn(gemm_n, gemm_n, device=dev)
        out = torch.empty(gemm_n, gemm_n, device=dev)
        flops = 2.0 * gemm_n ** 3
        iters = max(1, int(flops / (2 * _CUDA_CHAINS * blocks * tpb)))
        done = 2.0 * _CUDA_CHAINS * iters * blocks * tpb
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32

        def mm():
            torch.backends.cuda.matmul.allow_tf32 = False  # true float32 FMAs, like the probe
            try:
                return torch.mm(x, y, out=out)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = allow_tf32

        def ours():
            return _C.peak_fma(cap, iters, blocks, tpb, stream_of(sink))

        def check():
            ours()
            torch.cuda.synchronize()
            assert torch.isfinite(sink).all()

        return Prepared(mm, ours, check, work=done)

    return setup


def _triad(device: str, n: int):
    def setup(ceilings):
        dev = torch.device(device)
        a, b = torch.randn(n, device=dev), torch.randn(n, device=dev)
        out_t, out_o = torch.empty(n, device=dev), torch.empty(n, device=dev)
        caps = [to_dlpack(t) for t in (out_o, a, b)]
        threads = torch.get_num_threads()

        def ours():
            return _C.triad(*caps, 0.5, threads, stream_of(a))

        def check():
            torch.add(a, b, alpha=0.5, out=out_t)
            ours()
            torch.testing.assert_close(out_o, out_t)

        return Prepared(lambda: torch.add(a, b, alpha=0.5, out=out_t), ours, check, work=3.0 * 4 * n)

    return setup


def register_all():
    info = _backend.backend_info()
    for level in [lv for lv in info["cpu"]["isa_supported"] if lv in info["cpu"]["isa_compiled"]]:
        register(Case("machine", f"fp32 FMA peak, {level} (vs torch.mm 1024^3)", "cpu", _cpu_peak(level, 1024),
                      unit="GFLOP/s", peak="flops", note="same FLOPs both sides",
                      quick=level == info["cpu"]["isa_best"], min_sample_ms=_SAMPLE_MS))
    register(Case("machine", f"bf16 peak, {info['cpu']['isa_best']} (vs torch.mm bfloat16 1024^3)", "cpu",
                  _cpu_bf16_peak(info["cpu"]["isa_best"], 1024), unit="GFLOP/s", peak="bf16_flops",
                  note="same FLOPs both sides", min_sample_ms=_SAMPLE_MS))
    register(Case("machine", "fp32 FMA peak, full (vs torch.mm 2048^3)", "cpu",
                  _cpu_peak(info["cpu"]["isa_best"], 2048), unit="GFLOP/s", peak="flops", quick=False,
                  min_sample_ms=_SAMPLE_MS))
    register(Case("machine", "memory bandwidth, triad 3x64 MB", "cpu", _triad("cpu", 16 << 20),
                  unit="GB/s", peak="bandwidth", min_sample_ms=_SAMPLE_MS))
    register(Case("machine", "fp32 FMA peak (vs torch.mm 8192^3, no TF32)", "cuda", _cuda_peak(8192),
                  unit="GFLOP/s", peak="flops"))
    register(Case("machine", "memory bandwidth, triad 3x1 GB", "cuda", _triad("cuda", 256 << 20),
                  unit="GB/s", peak="bandwidth"))


register_all()
