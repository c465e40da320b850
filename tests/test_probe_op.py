"""The triad probe op through every layer: CPU levels, CUDA, autograd, compile, opcheck, errors."""
import pytest
import torch
from torch.utils.dlpack import to_dlpack

import pyseqkern
from pyseqkern import _C
from pyseqkern.ops.probe import triad
from pyseqkern.reference.probe import triad as triad_ref
from helpers import assert_bitwise_equal, assert_close_to_ref, devices, poisoned, randn, strided

SIZES = [1, 7, 113, 40_001, 1_000_003]  # 40_001 and up run on several threads
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_levels_match_reference(isa, n, dtype):
    a, b = randn((n,), dtype, seed=1), strided((n,), dtype, seed=2)
    ref = triad_ref(a.double(), b.double(), -0.75)
    assert_close_to_ref(triad(a, b, -0.75), ref)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(1,), (7, 113), (3, 1, 41)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_any_shape(device, shape, dtype):
    a, b = strided(shape, dtype, device, seed=3), strided(shape, dtype, device, seed=4).transpose(0, -1).contiguous()
    b = b.transpose(0, -1)
    out = triad(a, b, 1.5)
    assert out.is_contiguous() and out.device.type == device
    assert_close_to_ref(out, triad_ref(a.double(), b.double(), 1.5))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_raw_kernel_writes_every_element(device, threads):
    n = 1_000_003
    a, b = randn((n,), device=device, seed=5), randn((n,), device=device, seed=6)
    out = poisoned((n,), device=device)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    _C.triad(to_dlpack(out), to_dlpack(a), to_dlpack(b), 0.5, threads, stream)
    assert_close_to_ref(out, triad_ref(a.double(), b.double(), 0.5))


@pytest.mark.parametrize("device", devices())
def test_in_place_is_allowed(device):
    a, b = randn((4097,), device=device, seed=7), randn((4097,), device=device, seed=8)
    ref = triad_ref(a.double(), b.double(), 2.0)
    stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
    _C.triad(to_dlpack(a), to_dlpack(a), to_dlpack(b), 2.0, 2, stream)
    assert_close_to_ref(a, ref)


@pytest.mark.parametrize("device", devices())
def test_deterministic(device):
    a, b = randn((300_007,), device=device, seed=9), randn((300_007,), device=device, seed=10)
    assert_bitwise_equal(triad(a, b, 0.3), triad(a, b, 0.3))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["plain", "transposed", "strided"])
def test_empty(device, layout):
    """An empty tensor is contiguous whatever its strides (torch's rule): a transposed empty view, which
    .contiguous() returns as it is, was refused as not contiguous."""
    a = {"plain": lambda: torch.empty(0, 5, device=device), "transposed": lambda: torch.empty(5, 0, device=device).t(),
         "strided": lambda: torch.empty_strided((0, 5), (1, 1), device=device)}[layout]()
    assert triad(a, a, 1.0).shape == (0, 5)


@pytest.mark.parametrize("device", devices())
def test_gradcheck(device):
    a = randn((5, 7), torch.float64, device, seed=11).requires_grad_()
    b = strided((5, 7), torch.float64, device, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: triad(x, y, -1.25), (a, b))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    a, b = randn((6, 9), device=device, seed=13), randn((6, 9), device=device, seed=14)
    torch.library.opcheck(torch.ops.pyseqkern.triad.default, (a, b, 0.5))
    torch.library.opcheck(torch.ops.pyseqkern.triad.default, (a.requires_grad_(), b, 0.5))


def test_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="eager")
    def f(x, y):
        return triad(x, y, 2.0) * 3

    a, b = randn((33,), seed=15), randn((33,), seed=16)
    assert_close_to_ref(f(a, b), 3 * triad_ref(a.double(), b.double(), 2.0))


@pytest.mark.parametrize("args, error, match", [
    ((torch.ones(3), torch.ones(4)), ValueError, r"'b' has shape \(4,\) but 'a' has \(3,\)"),
    ((torch.ones(3), torch.ones(3, dtype=torch.float64)), TypeError, "'b' has dtype torch.float64"),
    ((torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32)), TypeError, "'a' must be float32 or float64"),
    ((torch.ones(3), [1.0, 2.0, 3.0]), TypeError, "'b' must be a Tensor, got list"),
])
def test_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        triad(*args)


def test_raw_kernel_rejects_mismatches():
    a = torch.ones(5)
    with pytest.raises(ValueError, match="'b' must be contiguous"):
        _C.triad(to_dlpack(a), to_dlpack(a), to_dlpack(torch.ones(10)[::2]), 1.0, 1, 0)
    with pytest.raises(TypeError, match="'a' must be float32 or float64 and match 'out'"):
        _C.triad(to_dlpack(a), to_dlpack(a.double()), to_dlpack(a), 1.0, 1, 0)


def test_peak_probes_count_flops(isa):
    """peak_fma: 16 (AVX-512) or 12 chains of FMAs per round. peak_bf16: the level's bfloat16 arithmetic,
    AMX tile products (4 tiles of 16 x 16 x 32 per round), vdpbf16ps (16 chains of 32 multiply-adds),
    elsewhere the float32 FMA probe itself."""
    bits = pyseqkern.backend_info()["cpu"]["vector_bits"]
    fma_round = 2 * (bits // 32) * (16 if bits == 512 else 12)
    bf16_round = {"amx": 4 * 2 * 16 * 16 * 32, "avx512bf16": 2 * 32 * 16}.get(isa, fma_round)
    for probe, per_round in ((lambda s, i, t: _C.peak_fma(s, i, t, 0, 0), fma_round), (_C.peak_bf16, bf16_round)):
        sink = poisoned((3,))
        assert probe(to_dlpack(sink), 1000, 3) == per_round * 1000 * 3
        assert torch.isfinite(sink).all() and (sink > 0).all()
        with pytest.raises(ValueError, match="num_threads"):
            probe(to_dlpack(sink), 10, 4)


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    # The side stream is kept busy, then updates `a`; a kernel launched anywhere but on that stream
    # would read the old `a`.
    a, b = randn((2_000_003,), device="cuda", seed=17), randn((2_000_003,), device="cuda", seed=18)
    expected = triad_ref(a.double() + 1, b.double(), 0.25)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        a.add_(1)
        out = triad(a, b, 0.25)
    torch.cuda.current_stream().wait_stream(side)
    assert_close_to_ref(out, expected)


@pytest.mark.cuda
def test_cuda_peak_fma_and_noop():
    sink = poisoned((4 * 128,), device="cuda")
    flops = _C.peak_fma(to_dlpack(sink), 100, 4, 128, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert flops == 2 * 8 * 100 * 4 * 128 and torch.isfinite(sink).all()
    _C.noop_cuda(0, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_graph_capture():
    a, b = randn((4099,), device="cuda", seed=19), randn((4099,), device="cuda", seed=20)
    triad(a, b, 1.0)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triad(a, b, 3.0)
    a.copy_(randn((4099,), device="cuda", seed=21))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_to_ref(out, triad_ref(a.double(), b.double(), 3.0))


@pytest.mark.cuda
def test_cpu_and_cuda_mixed_is_rejected():
    with pytest.raises(ValueError, match="'b' is on cpu but 'a' is on cuda:0"):
        triad(torch.ones(3, device="cuda"), torch.ones(3), 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unaligned_and_tails(offset, dtype):
    # Views starting 1..3 elements into a buffer are not 16-byte aligned: the scalar path must cover them,
    # and lengths that are not a multiple of the vector width leave a tail.
    n = 10_007
    a = randn((n + offset,), dtype, "cuda", seed=22)[offset:]
    b = randn((n + offset,), dtype, "cuda", seed=23)[offset:]
    out = poisoned((n + offset,), dtype, "cuda")[offset:]
    _C.triad(to_dlpack(out), to_dlpack(a), to_dlpack(b), -2.0, 1, torch.cuda.current_stream().cuda_stream)
    assert_close_to_ref(out, triad_ref(a.double(), b.double(), -2.0))


@pytest.mark.cuda
def test_stream_of_matches_torch():
    from pyseqkern._handoff import stream_of

    x = torch.ones(1, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert stream_of(x) == torch.cuda.current_stream().cuda_stream == side.cuda_stream
    assert stream_of(x) == torch.cuda.current_stream().cuda_stream
