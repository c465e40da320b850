"""The CPU threads every kernel shares, on both backends (torch's OpenMP team and our own workers):
barriers, thread counts above the core count, fork safety."""
import os

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import pyseqkern
from pyseqkern import _C
from pyseqkern.reference.probe import triad as triad_ref
from helpers import assert_bitwise_equal, assert_close_to_ref, randn


@pytest.fixture(params=["openmp", "own"])
def backend(request):
    _C.set_own_threads(request.param == "own")
    if request.param == "openmp" and not _C.thread_backend().startswith("openmp"):
        pytest.skip("torch's OpenMP runtime is not loaded in this process")
    yield request.param
    _C.set_own_threads(False)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_barrier_holds_every_thread(backend, threads):
    assert _C.barrier_selftest(threads, 2000)


def test_backend_is_reported():
    import pyseqkern

    pool = pyseqkern.backend_info()["cpu"]["thread_pool"]
    assert pool == _C.thread_backend() and (pool == "own" or pool.startswith("openmp ("))


def test_thread_counts_change_between_calls(backend):
    n = 200_003
    a, b = randn((n,), seed=1), randn((n,), seed=2)
    ref = triad_ref(a.double(), b.double(), 0.5)
    for threads in [4, 1, 7, 2, 3]:
        out = torch.full((n,), float("nan"))
        _C.triad(to_dlpack(out), to_dlpack(a), to_dlpack(b), 0.5, threads, 0)
        assert_close_to_ref(out, ref)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_works_in_a_forked_child():
    n = 200_003
    a, b = randn((n,), seed=3), randn((n,), seed=4)
    ref = triad_ref(a.double(), b.double(), 2.0)
    out = torch.empty(n)
    _C.triad(to_dlpack(out), to_dlpack(a), to_dlpack(b), 2.0, 2, 0)  # parent's workers exist now
    pid = os.fork()
    if pid == 0:  # child: must not hang or crash using workers that did not survive the fork
        code = 1
        try:
            # As DataLoader workers do: torch's own OpenMP regions are not fork-safe (libgomp), ours must be.
            torch.set_num_threads(1)
            child_out = torch.full((n,), float("nan"))
            _C.triad(to_dlpack(child_out), to_dlpack(a), to_dlpack(b), 2.0, 2, 0)
            ok = _C.barrier_selftest(2, 100)
            code = 0 if ok and torch.allclose(child_out.double(), ref) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"


@pytest.mark.parametrize("mode, dtype, B", [("lstm", torch.float32, 33), ("gru", torch.float32, 40),
                                            ("lstm", torch.bfloat16, 5), ("rnn_tanh", torch.bfloat16, 7)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_refused_scratch_fails_the_call_not_its_bits(backend, isa, mode, dtype, B, threads):
    """The tile unit's staged rows are per-thread scratch (thread_scratch). A thread refused it finishes on
    the vdpbf16ps / FMA tiles, whose bits differ, so the call must raise MemoryError (inference, the
    training forward and the backward) rather than return them; the next call, with scratch, gives the
    same bits as before. Levels without the tile unit never ask for scratch. Float32 from 32 rows
    (kSplitRows) and bfloat16 at any size multiply on the tile unit at amx."""
    cls = {"lstm": pyseqkern.nn.LSTM, "gru": pyseqkern.nn.GRU, "rnn_tanh": pyseqkern.nn.RNN}[mode]
    torch.manual_seed(5)
    m = cls(24, 40).to(dtype)
    x = randn((9, B, 24), dtype=dtype, seed=6)
    dy = randn((9, B, 40), dtype=dtype, seed=7)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)

    def refused(fn):
        _C.set_thread_scratch_limit(0)
        try:
            if isa != "amx":
                return fn()
            with pytest.raises(MemoryError, match="could not allocate its scratch"):
                fn()
        finally:
            _C.set_thread_scratch_limit(-1)

    def grads(y):
        y.backward(dy)
        return [x_.grad] + [p.grad for p in m.parameters()]

    try:
        with torch.no_grad():
            want = m(x)[0]
        refused(lambda: m(x))  # inference
        x_ = x.clone().requires_grad_()
        refused(lambda: m(x_))  # the training forward
        want_grads = grads(m(x_)[0])
        m.zero_grad()
        x_.grad = None
        y = m(x_)[0]
        refused(lambda: y.backward(dy, retain_graph=True))  # the backward
        m.zero_grad()
        x_.grad = None
        with torch.no_grad():
            assert_bitwise_equal(m(x)[0], want)
        for got, expect in zip(grads(y), want_grads):
            assert_bitwise_equal(got, expect, "gradient")
    finally:
        torch.set_num_threads(saved)
        _C.set_thread_scratch_limit(-1)
