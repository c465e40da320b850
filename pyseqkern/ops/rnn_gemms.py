"""The torch GEMMs of the recurrent ops: the input projection x W_ih^T before the kernels run, and the
backward's products that form the input and weight gradients from the kernels' gate gradients.

Torch does these (the project's rule: torch does the big GEMMs, our kernels the recurrence); what this
module decides is which of torch's GEMMs serves each product on this machine (MKL's sgemm, oneDNN's
linear, float32 in place of a slow bfloat16 GEMM, a product blocked by rows where one long sum would
lose accuracy), each choice with the measurement behind it. Nothing here depends on the rest of the
recurrent ops: rnn.py, rnn_autograd.py and the cell training paths call into it."""
from __future__ import annotations

import torch

from .. import _backend

# The tile unit (amx), whose bfloat16 GEMMs oneDNN runs (_Gemms.joint).
_AMX = "amx" in _backend._C.cpu_isa_report()["supported"]

# The input projection goes through torch; which torch GEMM matters. On a Zen-class EPYC, MKL's sgemm
# (torch.addmm) runs at 40% of peak for these shapes and torch's own oneDNN linear at 75% (3200x256 @
# 256x1024: 10.5 ms vs 5.1 ms, equal results; DESIGN.md). oneDNN's entry point is internal to torch,
# so it is used only where it exists and passed a one-time check against addmm.
_onednn_linear = None
if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    try:
        _probe_x, _probe_w, _probe_b = (torch.linspace(-1, 1, n).reshape(s) for n, s in
                                        ((3 * 5, (3, 5)), (4 * 5, (4, 5)), (4, (4,))))
        if torch.allclose(torch.ops.mkldnn._linear_pointwise(_probe_x, _probe_w, _probe_b, "none", [], ""),
                          torch.addmm(_probe_b, _probe_x, _probe_w.t()), rtol=1e-5, atol=1e-6):
            _onednn_linear = torch.ops.mkldnn._linear_pointwise
    except Exception:  # a torch whose internal op changed: addmm it is
        _onednn_linear = None
# bfloat16 separately: oneDNN has no bfloat16 inner product on CPUs without AVX-512 (a Zen 3, say),
# where the call raises ("could not create a primitive descriptor") and torch.mm must serve instead.
_ONEDNN_BF16 = False
if _onednn_linear is not None:
    try:
        _p = [t.to(torch.bfloat16) for t in (_probe_x, _probe_w, _probe_b)]
        _ONEDNN_BF16 = torch.allclose(_onednn_linear(*_p, "none", [], "").float(),
                                      torch.addmm(*(t.float() for t in (_p[2], _p[0], _p[1].t()))),
                                      rtol=1e-2, atol=1e-2)
    except Exception:
        _ONEDNN_BF16 = False
# There torch.mm in bfloat16 runs a plain loop: 3200x256 @ 256x1024 took 105 ms against 12.7 ms for the
# float32 GEMM of the widened operands and one rounding of the result (Zen 3, 2 threads), which sums in
# float32 as well (the same error norm against float64 to 8 digits). CPU bfloat16 GEMMs go that way.
_BF16_BY_FLOAT32 = not _ONEDNN_BF16


def _by_float32(dtype, device) -> bool:
    return _BF16_BY_FLOAT32 and dtype == torch.bfloat16 and device.type == "cpu"


# torch's CPU bfloat16 GEMMs (mm, addmm and oneDNN's linear alike; torch 2.13 on the amx and avx512
# levels) carry an Inf or NaN of one row of `a` into the previous row's sums where the contraction is
# not a multiple of 32 (K = 5, 7, 33, 34, 100, 255 spilled; 2, 4, 6, 8, 10, 16, 32, 64, 256 did not): a bfloat16 LSTM
# with input_size 5 and one infinite input value gave another batch row all NaN, where torch.nn's LSTM
# (oneDNN's RNN primitive) keeps it finite (found by an auditing helper, stop 52; torch.nn's bfloat16 GRU
# and RNN, which take the same GEMMs, spill too). Such a product whose `a` holds a non-finite value runs
# in float32 instead (MKL's sgemm, which does not spill, and one rounding, as _by_float32): finite
# operands keep the bfloat16 GEMM and its bits, for one pass over `a` where K is not a multiple of 32.
_BF16_CLEAN_K = 32


def _spills(a) -> bool:
    """Whether a CPU bfloat16 product a @ b^T would carry a non-finite value of one of a's rows into
    another's sums (plain tensors only: under a trace the check would be data-dependent)."""
    return (a.dtype == torch.bfloat16 and type(a) is torch.Tensor and a.device.type == "cpu"
            and a.shape[1] % _BF16_CLEAN_K != 0 and not torch.compiler.is_compiling()
            and not bool(torch.isfinite(a).all()))


def _mm(a, bt, spills=None):
    """a @ bt^T; CPU bfloat16 through float32 where torch has no fast bfloat16 GEMM or its GEMM would
    spill a non-finite value across rows (_spills; `spills` where the caller has asked already)."""
    if _by_float32(a.dtype, a.device) or (_spills(a) if spills is None else spills):
        return _mm(a.float(), bt.float()).to(a.dtype)
    if _narrow_and_long(a, bt):
        # A product a few rows or columns wide (a weight gradient of a narrow input or projection)
        # contracted over many rows: MKL takes a path that sums all of them in one run, 5-10x the error
        # of a blocked sum (float32 LSTM(3, 64) at T x B = 24000 rows: weight_ih's gradient 4.4e-6 off
        # the float64 result where torch.nn's is 4.0e-7; found by a size fuzzer, stop 26). Each block of
        # rows is its own product, and the products are added in order: 3.8e-7 there, in less time, the
        # same bits every run. (addmm into the sum would continue the one run: the same bits as before.)
        k = a.shape[1]
        out = a[:, :_SUM_BLOCK] @ bt[:, :_SUM_BLOCK].t()
        for i in range(_SUM_BLOCK, k, _SUM_BLOCK):
            out = out + a[:, i:i + _SUM_BLOCK] @ bt[:, i:i + _SUM_BLOCK].t()
        return out
    return a @ bt.t()


_SUM_BLOCK = 512


def _narrow_and_long(a, bt) -> bool:
    k = a.shape[1]
    return (type(k) is int and k > 2 * _SUM_BLOCK and min(a.shape[0], bt.shape[0]) < 16 and a.device.type == "cpu"
            and not torch.compiler.is_compiling())


# That holds on AMD's cores with AVX-512. On Intel's, MKL's sgemm matches or beats oneDNN's linear and
# takes transposed operands as they are, so float32 there goes to mm with views and the backward kernel
# writes no transposed copies (in-process, Emerald Rapids, 5 alternations: LSTM training (100,32,256)
# 1.05-1.11x -> 1.13-1.22x torch.nn, GRU 1.73-1.87x -> 1.82-1.94x); so it does on CPUs without AVX-512
# (stop 22, a Zen 3: training (100,32,256) LSTM / GRU / RNN 1.08 / 1.12 / 1.21x faster than through
# oneDNN). _backend.FP32_GEMM says which (PYSEQKERN_FP32_GEMM forces it).


# oneDNN's linear builds and keeps a primitive per GEMM shape (torch's build keeps up to 1024, a few
# hundred KB each): training on packed batches whose row count changed every step held +465 MB of
# native memory at the plateau (a 2-layer LSTM(16, 32); torch.nn +23 MB; found by a leak sweep, stop
# 18), and plain _linear_pointwise calls with varying rows alone do the same. So oneDNN serves at most
# _ONEDNN_MAX_ROWS distinct row counts per process, the first ones seen; the rest go to torch.mm (MKL),
# as on Intel: that loop now holds +56 MB (64 row counts: +197). Fixed shapes use one or two. A row
# count's path, once decided, never changes (the two paths differ in the last bits).
_ONEDNN_ROWS: set = set()
_ONEDNN_MAX_ROWS = 16


def _onednn_ok(rows, dtype, device):
    """Where oneDNN's linear serves (below 32 rows its setup cost outweighs the gain). Never while
    compiling, which is asked first: `rows` is symbolic there, and comparing it would guard the graph
    on the row count (a recompilation where it crosses 32)."""
    if not (not torch.compiler.is_compiling() and _onednn_linear is not None and device.type == "cpu"
            and type(rows) is int and rows >= 32  # (symbolic under other traces: torch.mm)
            and ((dtype == torch.bfloat16 and _ONEDNN_BF16)
                 or (dtype == torch.float32 and _backend.FP32_GEMM == "onednn"))):
        return False
    if rows not in _ONEDNN_ROWS:
        if len(_ONEDNN_ROWS) >= _ONEDNN_MAX_ROWS:
            return False
        _ONEDNN_ROWS.add(rows)
    return True


def _input_projection(x2d, w_ih, bias, scratch=None):
    """(x_gates, x_bias): x W_ih^T for every step at once, into `scratch` (a _Scratch) where given and
    torch's GEMM takes an output. The bias goes inside x_gates (x_bias None), except where torch's own
    GEMM projects CPU float32 or float64: there it is returned as x_bias for the kernel to add as it
    reads each row (rnn.h), because addmm first copies it into every row and reads it back (10.5 of the
    135 ms of the LSTM (200,64,512) projection); the GEMM's float sum plus the bias is rounded once
    (addmm can differ in the last bit where MKL splits k, as at K=512). bfloat16 x_gates would be
    rounded before the bias; oneDNN's linear adds it for free."""
    if x2d.dtype in (torch.float32, torch.float64) and _narrow_and_long(x2d, w_ih):
        # A few rows (T x B) over a wide input: MKL summed each in one run (LSTM(4097, 7) training at
        # T=3, B=1: outputs and gradients 2.4-6.5x torch.nn's error; a fuzzer, stop 27). _mm blocks k.
        x_gates = _mm(x2d, w_ih)
        return (x_gates, bias.contiguous()) if bias is not None else (x_gates, None)
    spills = _spills(x2d)
    if not spills and _onednn_ok(x2d.shape[0], x2d.dtype, x2d.device):
        return _onednn_linear(x2d, w_ih, bias, "none", [], ""), None
    if spills or _by_float32(x2d.dtype, x2d.device):
        f = w_ih.float().t()
        return (torch.addmm(bias.float(), x2d.float(), f) if bias is not None else x2d.float() @ f).to(x2d.dtype), None
    apart = bias is not None and x2d.device.type == "cpu" and x2d.dtype in (torch.float32, torch.float64)
    inside = None if apart else bias
    if scratch is not None:
        out = scratch.take((x2d.shape[0], w_ih.shape[0]), x2d.dtype)
        x_gates = (torch.addmm(inside, x2d, w_ih.t(), out=out) if inside is not None
                   else torch.mm(x2d, w_ih.t(), out=out))
    else:
        x_gates = torch.addmm(inside, x2d, w_ih.t()) if inside is not None else x2d @ w_ih.t()
    return x_gates, (bias.contiguous() if apart else None)


# The backward's float32 GEMMs of layers whose gates are this wide or less (G*H) take MKL's mm on views even
# where oneDNN serves the rest (stop 36, the 1 MB-L2 Zen 4, torch 2.13): the transposed copies that
# oneDNN needs cost more than its GEMMs save there. Training steps in-process, 11 A B B A rounds, time
# with MKL / oneDNN, (T, B, H): RNN (100,32,256) 0.92, (100,8,256) 0.95, (100,64,256) 0.92,
# (50,16,128) 0.91, GRU (100,32,64) 0.93; wider, LSTM (100,32,64) 1.00, GRU (100,32,128) 0.99, RNN
# (200,64,512) 1.00, LSTM (100,32,128) 1.02, RNN (100,32,1024) 1.02, GRU (100,32,256) 1.02, LSTM
# (100,32,256) 1.05.
_MKL_GATES_UP_TO = 256


# oneDNN's bfloat16 GEMM on AMX cores (torch 2.13, 2-core Granite Rapids-class Xeon) runs the joint
# weight-gradient GEMM dG^T [x | h_prev | 1] (M = G*K gate rows, N = I + K + 1) at half its speed for two
# GEMMs of half the width where M is 512 or more: at 3200 rows, M = 1024, N = 513 at 790 GFLOP/s, N = 256
# at 1860. GEMM time joint / apart (dW_ih and dW_hh on transposed copies, a bias sum), rows 800 / 3200 /
# 12800: (M, N) = (512, 257) 1.50 / 0.99 / 1.01, (768, 513) 1.96 / 2.10 / 1.13, (1024, 513) 2.15 / 2.09 /
# 2.07, (2048, 1025) 2.21 / 1.13 / 0.94; (256, 513) 0.51 / 1.06 / 1.13. With dW_ih on x as it comes
# (mm_rows) apart wins at every size measured, so bfloat16 on AMX is always apart: in-process, 5 rounds,
# ratio to torch.nn joint -> apart, autocast training: LSTM (100,32,256) 0.80 -> 0.94x (before mm_rows),
# (100,32,64) 1.11 -> 1.14, (100,8,64) 1.68 -> 1.79, (50,16,128) 1.45 -> 1.57; RNN (100,32,256) 2.79 ->
# 3.12 (bfloat16 modules 2.72 -> 3.07), (100,8,256) 5.24 -> 5.38, (50,16,128) 4.24 -> 4.49, (100,64,512)
# 1.61 -> 1.70; one shape measured the other way, LSTM (200,64,512) 1.08 -> 1.05x (M = 2048 at 12,800
# rows, 3 rounds). Elsewhere the joint GEMM stays (float32: 10% less time than apart; bfloat16 without AMX
# unmeasured).


class _Gemms:
    """The backward's GEMMs as a @ bt^T with both operands row-major (`t()` gives the transposed copy
    or view). Where `fast`, they go through the same oneDNN linear as the projection, about twice
    MKL's speed here. oneDNN takes only operands contiguous along the contracted dimension (a
    transposed view as its weight took one training call from 60 ms to 10 s), and the weight
    gradients contract over rows: the backward kernel writes d_gates^T and h_prev^T itself (torch's
    transposing copies cost 4 ms of a 50 ms LSTM training call); `t()` copies the small rest, and
    bfloat16 operands that come row-major (x, w_ih) go to torch.mm whole (`mm_rows`).
    Elsewhere (float64, CUDA, torch.compile, few rows, float32 where MKL runs at full speed:
    _backend.FP32_GEMM, float32 gates _MKL_GATES_UP_TO wide or less): views and mm."""

    def __init__(self, rows, dtype, device, gate_cols):
        # (asked first: _onednn_ok takes one of oneDNN's row counts)
        narrow = dtype == torch.float32 and gate_cols <= _MKL_GATES_UP_TO
        self.fast = not narrow and _onednn_ok(rows, dtype, device)
        # The weight gradients as one GEMM, dG^T [x | h_prev | 1] (rnn_autograd), or as one per weight and
        # a sum, as bfloat16 on AMX cores takes them (above).
        self.joint = not (dtype == torch.bfloat16 and _AMX)

    def t(self, a):
        return a.t().contiguous() if self.fast else a.t()

    def mm(self, a, bt):
        if not self.fast or _narrow_and_long(a, bt):
            return _mm(a, bt)
        if _spills(a):  # (asked once: an isfinite pass over `a`)
            return _mm(a, bt, spills=True)
        return _onednn_linear(a, bt, None, "none", [], "")

    def mm_rows(self, a, b):
        """a @ b with b row-major as it comes (x, w_ih). In bfloat16 torch.mm is oneDNN's own GEMM and
        takes b whole, where linear wants b^T copied first: torch's transposing copy was a third of the
        GEMM's time and more (x of 3200 x 256: 0.49 ms against the GEMM's 0.85; 12800 x 512: 11.6 against
        14.5; stop 42, the Xeon). Float32's torch.mm is MKL's, which oneDNN's linear beats where `fast`."""
        if self.fast and a.dtype == torch.bfloat16 and not _narrow_and_long(a, b.t()):
            return _mm(a, b.t(), spills=True) if _spills(a) else torch.mm(a, b)
        return self.mm(a, self.t(b))
