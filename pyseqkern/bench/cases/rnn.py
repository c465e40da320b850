"""Recurrent layers: torch.nn.LSTM/GRU/RNN and the cells against pyseqkern.nn's drop-in modules.

Both sides are the same class with the same weights: torch's module is built under a fixed seed, ours
loads its state_dict. Work is the FLOPs of the recurrent layer: a forward pass does
2*T*B*G*H*(I+K) (G gates, K = proj_size or H) plus 2*T*B*P*H for a projection of size P; a training
step (forward + backward) counts 3x that; a packed batch counts only its valid steps.

Targets (the RNN issue's; speedup = torch ms / ours ms), inference unless stated:
  LSTM   B=1: 2.0, B=8: 1.5, B>=16: 1.1 (B>=32: or 85% of the measured peak, where torch's oneDNN is
         near it); training 1.2; packed 2.0; bfloat16 1.0
  GRU    B<=8: 3.0, B>=16: 1.8; training 2.0; packed 2.0
  RNN    B<=8: 3.0, B>=16: 1.8; packed 2.0
  packed, every mode, "padding costs nothing": our packed call no slower than 1.2x our padded call
         scaled by the valid share (a case whose "torch" side is our padded call; target 1/(1.2 x share))
  cells  (B, H) = (1, 256): 5.0, (32, 512): 1.3; a training loop of cell steps (no target)
  decode steps (T=1, B=1, hx given): eager 1.0; both modules under torch.compile (full suite, no target)
  torch.func (LSTM, GRU; no target): grad of a loss over functional_call, both under torch.func.grad;
  per-sample gradients, ours by vmap of grad, torch.nn's by a loop of plain autograd (no vmap rule).
  autocast (no target): float32 modules called inside torch.autocast(bfloat16) on both sides; torch.nn's
  LSTM runs oneDNN's bfloat16 kernel there, its GRU and RNN cast each GEMM (ops/rnn_autocast.py).
CUDA (the CUDA RNN issue's; against torch.nn on cuDNN in the same run), float16 and float32, (T, B, H) =
(100, 1/4/16/64, 256/512/1024):
  inference at B <= 16: 2.0; training (forward + backward) at B <= 16: 1.5; everywhere else 1.0;
  packed batch: 2.0 vs torch's packed path. The rate column is the achieved TFLOP/s-equivalent in
  GFLOP/s, its share of the measured float32 FMA peak (float16 rows too: our kernels do float32 math).
On CUDA, float32 cases run with TF32 off on both sides (true float32, as the tolerances assume)."""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ... import nn as _ours_nn
from ..registry import Case, Prepared, register

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "LSTMCell": 4, "GRUCell": 3, "RNNCell": 1}
_SEED = 0
_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=1e-2, atol=1e-2)}

# (T, B, H) with I = H, for inference and training. The (200, 64, 512) shape is 13-54 GFLOP per inference
# call, 3x that in training (about 15 s and 45 s a case on 2 cores): full suite only; every other case is
# in the quick suite.
_LAYER_SHAPES = [(100, 1, 256), (100, 8, 256), (100, 32, 256), (200, 64, 512), (50, 16, 128)]
_FULL_ONLY = {(200, 64, 512)}


def _inference_target(cls: str, batch: int) -> float:
    if cls == "LSTM":
        return 2.0 if batch <= 1 else 1.5 if batch <= 8 else 1.1
    return 3.0 if batch <= 8 else 1.8


def _training_target(cls: str, shape):
    """The issue's training targets: (100, 32, 256), LSTM and GRU; the other shapes are reported only."""
    return {"LSTM": 1.2, "GRU": 2.0}.get(cls) if shape == (100, 32, 256) else None


def _inference_peak_target(cls: str, batch: int):
    """The issue's alternative for LSTM at B >= 32: 85% of the measured peak FLOP/s also meets it."""
    return 85.0 if cls == "LSTM" and batch >= 32 else None


def _modules(cls: str, device: str, dtype: torch.dtype, *args, **kwargs):
    """(torch module, our module): the same class and weights, on `device` in `dtype`."""
    torch.manual_seed(_SEED)
    theirs = getattr(torch.nn, cls)(*args, **kwargs)
    ours = getattr(_ours_nn, cls)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(device=device, dtype=dtype), ours.to(device=device, dtype=dtype)


def _randn(*shape, device: str, dtype: torch.dtype, seed: int = _SEED + 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _exact(device: str, dtype: torch.dtype):
    """A context for each call: on CUDA in float32, TF32 off for cuDNN and matmuls (restored after)."""
    if device != "cuda" or dtype != torch.float32:
        return contextlib.nullcontext

    @contextlib.contextmanager
    def no_tf32():
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    return no_tf32


def _region(device: str, dtype: torch.dtype):
    return lambda: torch.autocast(device, dtype=dtype)


def _flat(out) -> list[torch.Tensor]:
    """Every tensor of a module's output: (output, h_n), (output, (h_n, c_n)), PackedSequence data."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "batch_sizes"):  # PackedSequence
        return [out.data]
    return [t for o in out for t in _flat(o)]


def _assert_agree(theirs, ours, dtype: torch.dtype) -> None:
    a, b = _flat(theirs), _flat(ours)
    assert len(a) == len(b), f"{len(a)} outputs from torch, {len(b)} from pyseqkern"
    for x, y in zip(a, b):
        # (in autocast regions torch.nn's GRU, cells and packed LSTM return float32, ours the region's dtype)
        torch.testing.assert_close(y.float(), x.float(), **_TOL[dtype])


def _torch_missing(torch_fn) -> str | None:
    """Why torch.nn cannot run the case here, or None. Its bfloat16 LSTM and bfloat16 linear layers are
    oneDNN kernels that exist only on CPUs with AVX-512 (on a Zen 3 they raise "could not create a
    primitive descriptor"); any other failure is the case's own and propagates."""
    try:
        torch_fn()
    except RuntimeError as exc:
        if "could not create a primitive descriptor" not in str(exc):
            raise
        return "torch.nn's bfloat16 path (oneDNN) raises on this CPU (no AVX-512)"
    return None


def _layer_flops(cls: str, steps: float, batch: int, inp: int, hidden: int, proj: int = 0) -> float:
    """Forward FLOPs of one layer over `steps` time steps (steps*batch = valid rows for packed input)."""
    k = proj or hidden
    return 2.0 * steps * batch * _GATES[cls] * hidden * (inp + k) + 2.0 * steps * batch * proj * hidden


def _inference(cls: str, device: str, steps: int, batch: int, hidden: int, dtype=torch.float32, proj: int = 0,
               autocast=None):
    """autocast: a dtype; float32 modules and input, called inside a torch.autocast region of it."""
    def setup(ceilings):
        kwargs = {"proj_size": proj} if proj else {}
        theirs, ours = _modules(cls, device, dtype, hidden, hidden, **kwargs)
        theirs.eval()
        ours.eval()
        x = _randn(steps, batch, hidden, device=device, dtype=dtype)
        exact = _exact(device, dtype) if autocast is None else _region(device, autocast)

        def run(module):
            def fn():
                with torch.no_grad(), exact():
                    return module(x)
            return fn

        torch_fn, ours_fn = run(theirs), run(ours)
        work = _layer_flops(cls, steps, batch, hidden, hidden, proj)
        missing = _torch_missing(torch_fn) if (autocast or dtype) == torch.bfloat16 else None
        if missing:  # checked against torch.nn in float32 on the same (bfloat16) weights and input
            reference, x32 = theirs.float(), x.float()

            def check_f32():
                with torch.no_grad():
                    _assert_agree(reference(x32), ours_fn(), torch.bfloat16)
            return Prepared(None, ours_fn, check_f32, work=work, torch_missing=missing)

        def check():
            with warnings.catch_warnings():  # torch warns once that oneDNN has no proj_size (the case's note says so)
                warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
                expected = torch_fn()
            _assert_agree(expected, ours_fn(), autocast or dtype)

        return Prepared(torch_fn, ours_fn, check, work=work)

    return setup


def _drop_grads(params, x) -> None:
    """Every timed training call starts from no gradients (accumulating would add a read per call)."""
    for p in params:
        p.grad = None
    x.grad = None


def _training(cls: str, device: str, steps: int, batch: int, hidden: int, dtype=torch.float32, autocast=None):
    """autocast: a dtype; the forward inside a torch.autocast region of it, the backward after it."""
    def setup(ceilings):
        theirs, ours = _modules(cls, device, dtype, hidden, hidden)
        theirs.train()
        ours.train()
        x = _randn(steps, batch, hidden, device=device, dtype=dtype).requires_grad_()
        exact = _exact(device, dtype)
        region = contextlib.nullcontext if autocast is None else _region(device, autocast)

        def run(module, region, x):
            params = list(module.parameters())

            def fn():
                _drop_grads(params, x)
                with exact():
                    with region():
                        out, h_n = module(x)
                    h = h_n[0] if isinstance(h_n, tuple) else h_n
                    (out.float().sum() + h.float().sum()).backward()
                return out, h_n
            return fn

        torch_fn, ours_fn = run(theirs, region, x), run(ours, region, x)
        work = 3.0 * _layer_flops(cls, steps, batch, hidden, hidden)
        missing = _torch_missing(torch_fn) if (autocast or dtype) == torch.bfloat16 else None
        x_ref = x
        if missing:  # the reference: torch.nn in float32 on the same weights and input, outside any region
            x_ref = x.detach().float().requires_grad_()
            torch_fn = run(theirs.float(), contextlib.nullcontext, x_ref)

        def check():
            expected = torch_fn()
            grads = [x_ref.grad.clone()] + [p.grad.clone() for p in theirs.parameters()]
            _assert_agree(expected, ours_fn(), autocast or dtype)
            # A weight gradient sums T*B products, so single entries can cancel to near zero: the absolute
            # tolerance scales with the tensor's largest entry (elementwise agreement at 1e-4 would only
            # test the order of float32 sums).
            names = ["input"] + [n for n, _ in ours.named_parameters()]
            tol = _TOL[autocast or dtype]
            for name, want, got in zip(names, grads, [x.grad] + [p.grad for p in ours.parameters()]):
                atol = tol["atol"] * max(1.0, float(want.abs().max()))
                torch.testing.assert_close(got.float(), want.float(), rtol=tol["rtol"], atol=atol,
                                           msg=lambda m, name=name: f"grad of {name}: {m}")

        return Prepared(None if missing else torch_fn, ours_fn, check, work=work, torch_missing=missing)

    return setup


def _func_grad(cls: str, device: str, steps: int, batch: int, hidden: int, per_sample: bool):
    """torch.func: the gradient of a loss over functional_call with respect to the parameters, through
    torch.func.grad on both sides; with `per_sample`, one gradient per sequence: ours by vmap of grad over
    the batch (what DP-SGD computes), torch.nn's by a loop of plain autograd over the sequences (its
    layers have no vmap rule: "Batching rule not implemented for aten::lstm.input")."""
    def setup(ceilings):
        theirs, ours = _modules(cls, device, torch.float32, hidden, hidden)
        x = _randn(steps, batch, hidden, device=device, dtype=torch.float32)
        exact = _exact(device, torch.float32)

        def run(module):
            params = {k: v.detach() for k, v in module.named_parameters()}

            def loss(p, z):
                out, h_n = torch.func.functional_call(module, p, (z,))
                h = h_n[0] if isinstance(h_n, tuple) else h_n
                return out.square().sum() + h.sum()
            grad = torch.func.grad(loss)
            if not per_sample:
                return lambda: grad(params, x)
            if module is ours:
                each = torch.func.vmap(grad, in_dims=(None, 1))
                return lambda: each(params, x)

            names, weights = list(params), list(module.parameters())

            def loop():  # (plain autograd per sequence: torch.nn's fastest way, on oneDNN)
                got = [torch.autograd.grad(loss(dict(zip(names, weights)), x[:, b]), weights) for b in range(batch)]
                return {k: torch.stack([g[i] for g in got]) for i, k in enumerate(names)}
            return loop

        torch_fn, ours_fn = run(theirs), run(ours)

        def timed(fn):
            def call():
                with exact():
                    return fn()
            return call

        def check():
            want, got = timed(torch_fn)(), timed(ours_fn)()
            for name in want:
                atol = _TOL[torch.float32]["atol"] * max(1.0, float(want[name].abs().max()))
                torch.testing.assert_close(got[name], want[name], rtol=_TOL[torch.float32]["rtol"], atol=atol,
                                           msg=lambda m, name=name: f"grad of {name}: {m}")

        return Prepared(timed(torch_fn), timed(ours_fn), check,
                        work=3.0 * _layer_flops(cls, steps, batch, hidden, hidden))

    return setup


def _packed(cls: str, device: str, batch: int, hidden: int, longest: int, shortest: int, dtype=torch.float32):
    def setup(ceilings):
        theirs, ours = _modules(cls, device, dtype, hidden, hidden)
        theirs.eval()
        ours.eval()
        lengths = _packed_lengths(batch, longest, shortest)
        x = _randn(longest, batch, hidden, device=device, dtype=dtype)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=True)
        exact = _exact(device, dtype)

        def run(module):
            def fn():
                with torch.no_grad(), exact():
                    return module(packed)
            return fn

        torch_fn, ours_fn = run(theirs), run(ours)

        def check():
            _assert_agree(torch_fn(), ours_fn(), dtype)

        work = _layer_flops(cls, int(lengths.sum()), 1, hidden, hidden)
        return Prepared(torch_fn, ours_fn, check, work=work)

    return setup


def _packed_lengths(batch: int, longest: int, shortest: int) -> torch.Tensor:
    return torch.linspace(longest, shortest, batch).round().long()


def _packed_vs_padded(cls: str, device: str, batch: int, hidden: int, longest: int, shortest: int):
    """The issue's second packed target, "padding costs nothing": our packed call against our own call on
    the padded batch (the "torch" side here), which must not take more than 1.2x the padded time scaled
    by the share of valid steps, i.e. padded / packed >= 1 / (1.2 x share): the case's target."""
    def setup(ceilings):
        _, ours = _modules(cls, device, torch.float32, hidden, hidden)
        ours.eval()
        lengths = _packed_lengths(batch, longest, shortest)
        x = _randn(longest, batch, hidden, device=device, dtype=torch.float32)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=True)

        def padded_fn():
            with torch.no_grad():
                return ours(x)

        def packed_fn():
            with torch.no_grad():
                return ours(packed)

        def check():  # every sequence's last valid output row, both ways
            y_pad, y_packed = padded_fn()[0], pad_packed_sequence(packed_fn()[0])[0]
            rows = torch.arange(batch, device=x.device)
            torch.testing.assert_close(y_packed[lengths - 1, rows], y_pad[lengths - 1, rows],
                                       rtol=_TOL[torch.float32]["rtol"], atol=_TOL[torch.float32]["atol"])

        return Prepared(padded_fn, packed_fn, check, work=_layer_flops(cls, int(lengths.sum()), 1, hidden, hidden))

    return setup


def _padding_target(batch: int, longest: int, shortest: int) -> float:
    share = float(_packed_lengths(batch, longest, shortest).sum()) / (batch * longest)
    return round(1.0 / (1.2 * share), 2)  # (1.52 for 10..100 over 32 rows: 1.515 rounded up, the stricter)


def _one_call(theirs, ours, args, device: str, dtype: torch.dtype, work: float) -> Prepared:
    """Both modules called on the same args without autograd, in eval mode: one step per call."""
    theirs.eval()
    ours.eval()
    exact = _exact(device, dtype)

    def run(module):
        def fn():
            with torch.no_grad(), exact():
                return module(*args)
        return fn

    torch_fn, ours_fn = run(theirs), run(ours)

    def check():
        _assert_agree(torch_fn(), ours_fn(), dtype)

    return Prepared(torch_fn, ours_fn, check, work=work)


def _cell(cls: str, device: str, batch: int, hidden: int, dtype=torch.float32):
    def setup(ceilings):
        theirs, ours = _modules(cls, device, dtype, hidden, hidden)
        x = _randn(batch, hidden, device=device, dtype=dtype, seed=_SEED + 1)
        h = _randn(batch, hidden, device=device, dtype=dtype, seed=_SEED + 2)
        hx = (h, _randn(batch, hidden, device=device, dtype=dtype, seed=_SEED + 3)) if cls == "LSTMCell" else h
        return _one_call(theirs, ours, (x, hx), device, dtype, _layer_flops(cls, 1, batch, hidden, hidden))

    return setup


def _cell_loop(cls: str, device: str, steps: int, batch: int, hidden: int, dtype=torch.float32, layers=0):
    """A training step of a cell stepped by a Python loop (teacher forcing, an attention decoder): `steps`
    calls recorded by autograd, a loss over every step's h, one backward. With `layers`, a sequence
    module of that many layers fed one token a call instead (x [1, B, H], hx from the last call)."""
    def setup(ceilings):
        theirs, ours = _modules(cls, device, dtype, hidden, hidden, **({"num_layers": layers} if layers else {}))
        theirs.train()
        ours.train()
        xs = _randn(steps, batch, hidden, device=device, dtype=dtype).requires_grad_()
        h0 = _randn(batch, hidden, device=device, dtype=dtype, seed=_SEED + 2)
        exact = _exact(device, dtype)

        def run(module):
            params = list(module.parameters())

            def fn():
                _drop_grads(params, xs)
                with exact():
                    h, c, hs = h0, h0, []
                    if layers:
                        hx = None
                        for t in range(steps):
                            h, hx = module(xs[t:t + 1], hx)
                            hs.append(h[0])
                    for t in range(steps if not layers else 0):
                        if cls == "LSTMCell":
                            h, c = module(xs[t], (h, c))
                        else:
                            h = module(xs[t], h)
                        hs.append(h)
                    out = torch.stack(hs)
                    out.sum().backward()
                return out
            return fn

        torch_fn, ours_fn = run(theirs), run(ours)

        def check():
            expected = torch_fn()
            grads = [xs.grad.clone()] + [p.grad.clone() for p in theirs.parameters()]
            _assert_agree(expected, ours_fn(), dtype)
            tol = _TOL[dtype]
            for want, got in zip(grads, [xs.grad] + [p.grad for p in ours.parameters()]):
                atol = tol["atol"] * max(1.0, float(want.abs().max()))  # (as _training's: sums of many products)
                torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol)

        return Prepared(torch_fn, ours_fn, check,
                        work=3.0 * max(1, layers) * _layer_flops(cls, steps, batch, hidden, hidden))

    return setup


def _decode(cls: str, device: str, batch: int, hidden: int, layers: int, dtype=torch.float32, compiled=False):
    """One decoding step of a sequence module: T=1 with the state given, as a generation loop calls it.
    `compiled`: both modules under torch.compile(fullgraph=True) (Inductor), compiled in the setup. Dynamo
    refuses torch.nn's recurrent classes, subclasses included, unless allow_rnn is set: set for the
    compilation only (the calls hit the compiled code)."""
    def setup(ceilings):
        theirs, ours = _modules(cls, device, dtype, hidden, hidden, num_layers=layers)
        x = _randn(1, batch, hidden, device=device, dtype=dtype, seed=_SEED + 1)
        h = _randn(layers, batch, hidden, device=device, dtype=dtype, seed=_SEED + 2)
        hx = (h, _randn(layers, batch, hidden, device=device, dtype=dtype, seed=_SEED + 3)) if cls == "LSTM" else h
        if compiled:
            theirs, ours = (torch.compile(m.eval(), fullgraph=True) for m in (theirs, ours))
            with torch._dynamo.config.patch(allow_rnn=True), torch.no_grad():
                theirs(x, hx), ours(x, hx)
        return _one_call(theirs, ours, (x, hx), device, dtype, layers * _layer_flops(cls, 1, batch, hidden, hidden))

    return setup


# CUDA: the grid. The quick suite keeps H=512 (every batch, both dtypes); --full runs all.
_CUDA_SHAPES = [(100, b, h) for h in (256, 512, 1024) for b in (1, 4, 16, 64)]
_CUDA_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def register_cuda():
    device = "cuda"
    for cls in ("LSTM", "GRU", "RNN"):
        family = cls.lower()
        for dname, dtype in _CUDA_DTYPES.items():
            for steps, batch, hidden in _CUDA_SHAPES:
                shape = f"T={steps} B={batch} H={hidden} {dname}"
                quick = hidden == 512
                register(Case(family, f"inference {shape}", device,
                              _inference(cls, device, steps, batch, hidden, dtype),
                              unit="GFLOP/s", peak="flops", target=2.0 if batch <= 16 else 1.0, quick=quick))
                register(Case(family, f"training {shape}", device,
                              _training(cls, device, steps, batch, hidden, dtype), unit="GFLOP/s", peak="flops",
                              target=1.5 if batch <= 16 else 1.0, note="forward + backward", quick=quick))
            register(Case(family, f"packed B=64 lengths 10..100 H=512 {dname}", device,
                          _packed(cls, device, 64, 512, 100, 10, dtype), unit="GFLOP/s", peak="flops", target=2.0,
                          note="vs torch's packed path"))
        if cls == "LSTM":
            register(Case(family, "proj_size=128 inference T=100 B=16 H=512 float32", device,
                          _inference(cls, device, 100, 16, 512, proj=128), unit="GFLOP/s", peak="flops", target=1.0))
    for cls in ("LSTMCell", "GRUCell", "RNNCell"):
        for batch, hidden in ((1, 256), (16, 512), (64, 1024)):
            for dname, dtype in _CUDA_DTYPES.items():
                register(Case("rnn_cell", f"{cls} B={batch} H={hidden} {dname}", device,
                              _cell(cls, device, batch, hidden, dtype), unit="GFLOP/s", peak="flops",
                              target=2.0 if batch <= 16 else 1.0, note="one step per call", quick=hidden == 512))


def register_all():
    for device in ("cpu",):
        for cls in ("LSTM", "GRU", "RNN"):
            family = cls.lower()
            for steps, batch, hidden in _LAYER_SHAPES:
                register(Case(family, f"inference T={steps} B={batch} H={hidden}", device,
                              _inference(cls, device, steps, batch, hidden), unit="GFLOP/s", peak="flops",
                              target=_inference_target(cls, batch),
                              peak_target=_inference_peak_target(cls, batch),
                              quick=(steps, batch, hidden) not in _FULL_ONLY))
            # Training at every shape inference runs (the list); its targets are at (100, 32, 256).
            for steps, batch, hidden in _LAYER_SHAPES:
                register(Case(family, f"training T={steps} B={batch} H={hidden}", device,
                              _training(cls, device, steps, batch, hidden), unit="GFLOP/s", peak="flops",
                              target=_training_target(cls, (steps, batch, hidden)), note="forward + backward",
                              quick=(steps, batch, hidden) not in _FULL_ONLY))
            if cls != "RNN":
                register(Case(family, "torch.func.grad T=100 B=32 H=256", device,
                              _func_grad(cls, device, 100, 32, 256, False), unit="GFLOP/s", peak="flops",
                              note="both under torch.func.grad"))
                register(Case(family, "per-sample grads (vmap of grad) T=100 B=32 H=256", device,
                              _func_grad(cls, device, 100, 32, 256, True), unit="GFLOP/s", peak="flops",
                              note="torch.nn: a loop (it has no vmap rule)"))
            for layers in (1, 2):
                register(Case(family, f"decode step T=1 B=1 H=256 layers={layers}", device,
                              _decode(cls, device, 1, 256, layers), unit="GFLOP/s", peak="flops", target=1.0,
                              note="one token per call, hx given", quick=layers == 1))
            register(Case(family, "compiled decode step T=1 B=1 H=256", device,
                          _decode(cls, device, 1, 256, 1, compiled=True), unit="GFLOP/s", peak="flops",
                          note="both under torch.compile (Inductor)", quick=False))
            register(Case(family, "training loop T=50 B=1 H=256 layers=2", device,
                          _cell_loop(cls, device, 50, 1, 256, layers=2), unit="GFLOP/s", peak="flops",
                          note="one token per call, forward + backward"))
            register(Case(family, "packed B=32 lengths 10..100", device, _packed(cls, device, 32, 256, 100, 10),
                          unit="GFLOP/s", peak="flops", target=2.0, note="H=256, vs torch's packed path"))
            register(Case(family, "packed B=32 lengths 10..100 vs our padded T=100", device,
                          _packed_vs_padded(cls, device, 32, 256, 100, 10), unit="GFLOP/s", peak="flops",
                          target=_padding_target(32, 100, 10),
                          note="'torch' side: our padded call; target 1/(1.2 x valid share)"))
            if cls == "LSTM":
                register(Case(family, "proj_size=128 inference T=100 B=32 H=256", device,
                              _inference(cls, device, 100, 32, 256, proj=128), unit="GFLOP/s", peak="flops",
                              note="torch: no oneDNN path with proj" if device == "cpu" else ""))
                register(Case(family, "bfloat16 inference T=100 B=32 H=256", device,
                              _inference(cls, device, 100, 32, 256, dtype=torch.bfloat16), unit="GFLOP/s",
                              peak="bf16_flops", target=1.0, note="% of the bfloat16 peak"))
            for batch in (8, 32):
                register(Case(family, f"autocast bfloat16 inference T=100 B={batch} H=256", device,
                              _inference(cls, device, 100, batch, 256, autocast=torch.bfloat16), unit="GFLOP/s",
                              peak="bf16_flops", note="float32 modules in a torch.autocast region"))
            if cls != "RNN":
                register(Case(family, "autocast bfloat16 training T=100 B=32 H=256", device,
                              _training(cls, device, 100, 32, 256, autocast=torch.bfloat16), unit="GFLOP/s",
                              peak="bf16_flops", note="forward in the region, backward after"))
        for cls in ("LSTMCell", "GRUCell", "RNNCell"):
            for batch, hidden, target in ((1, 256, 5.0), (32, 512, 1.3)):
                register(Case("rnn_cell", f"{cls} B={batch} H={hidden}", device, _cell(cls, device, batch, hidden),
                              unit="GFLOP/s", peak="flops", target=target, note="one step per call"))
            for batch in (1, 32):
                register(Case("rnn_cell", f"{cls} training loop T=50 B={batch} H=256", device,
                              _cell_loop(cls, device, 50, batch, 256), unit="GFLOP/s", peak="flops",
                              note="a step per call, forward + backward"))
    register_cuda()


register_all()
