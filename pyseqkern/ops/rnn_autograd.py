"""The recurrent layer op's autograd and torch.func support (the kernels' side of them).

_RnnLayer is one layer and direction on the kernels as an autograd.Function in the setup_context form
with a vmap rule; its first-order backward is the backward kernel plus torch GEMMs (_kernel_grads).
Under torch.func (grad and vjp ask for a graph of every gradient; vmap needs rules) the backward runs
inside _RnnLayerGrad, whose forward is that same kernel backward and whose own backward (only where a
gradient is differentiated again) is the reference's vector-Jacobian product, differentiated
(_reference_vjp). The vmap rules fold the mapped dimension into the batch of one kernel call, or call
the kernels once per member where the weights are mapped or the data packed. _transformed says which
transforms the kernels serve; rnn_layer sends the others to the reference. See docs/DESIGN.md,
"Autograd beyond first order".

Imported at the end of ops/rnn.py, whose helpers it uses (import pyseqkern.ops.rnn, not this module).
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.autograd import forward_ad as _fwad

from .. import _backend
from ..reference import rnn as _reference
from . import rnn_autocast as _autocast
from . import rnn_cuda as _cuda
from ._library import LIB
from .rnn import (_backward_impl, _dispatch_stack_len, _forward_impl, _forward_projecting, _functorch_active,
                  _pack_for_rows, _plain_eager, _plain_eager_cuda, _prepare)
from .rnn_seq import _is_functorch_wrapped, _Seq
from . import rnn_paths as _paths
from .rnn_gemms import _Gemms, _mm
from .rnn_modes import GATES, MODES
from .rnn_scratch import _proj_scratch, _scratch
from .rnn_direct import _step_impl as _step_direct_impl


def _transformed() -> bool:
    """torch.func transforms the kernels have no rule for, or forward-mode AD, are in use: then a layer runs
    its reference, plain torch ops, composable with every transform (torch.nn's own layers have no vmap
    rule at all). The kernels run under any stack of grad/vjp levels (they need only the Functions'
    backward, whose own gradient is the reference's, _RnnLayerGrad) with at most one vmap level, the
    outermost: per-sample gradients (vmap of grad), jacrev, ensembles, batched inference. The vmap rules
    (_RnnLayer.vmap, _RnnLayerGrad.vmap) fold the mapped dimension into the batch, or loop over it.
    (Below a grad level, the folded backward's raw ops would have to be differentiable.)"""
    if torch.compiler.is_compiling():
        return False
    if _fwad._current_level >= 0:  # inside forward_ad.dual_level()
        return True
    if _functorch_active is None or not _functorch_active():
        return False
    if _functorch_interpreters is None:
        return True
    keys = [i.key() for i in _functorch_interpreters()]  # outermost first
    return any(k != _GRAD_TRANSFORM for k in keys[1:]) or keys[0] not in (_GRAD_TRANSFORM, _VMAP_TRANSFORM)


try:  # (private; absent or moved, every transform takes the reference as before)
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _functorch_interpreters
    _GRAD_TRANSFORM = torch._C._functorch.TransformType.Grad
    _VMAP_TRANSFORM = torch._C._functorch.TransformType.Vmap
    _is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
except (ImportError, AttributeError):
    _functorch_interpreters = _is_legacy_batched = None


# Function.apply binds each call's arguments through inspect.signature wherever a Function defines
# setup_context (to fill in defaults for torch.func): 20-40 us a call, more than a cell step's kernel, paid
# by every training step of a cell in a loop. Outside torch.func and compilation, `apply` goes to what
# Function.apply itself calls then, torch's C apply, with every argument given (our forwards have no
# defaults) and dead functorch wrappers unwrapped as Function.apply does. Where torch has moved either
# piece, Function.apply.
try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead
    if [c for c in torch.autograd.Function.__mro__ if "apply" in c.__dict__] != [torch.autograd.Function,
                                                                                    torch._C._FunctionBase]:
        raise ImportError
except ImportError:
    _unwrap_dead = None


# The raw ops have no gradient of their own: _RnnLayer and _RnnLayerGrad are their autograd and call them
# with grad mode off, or, in the backward's vmap rule under a grad transform, where no gradient of them is
# wanted (_own_call). With no kernel at the Autograd key, a raw call that autograd records anyway went
# through torch's fallback, which records nothing: the parameters' .grad came out None, silently (seen
# under torch.compile's "eager" backend over a torch.vmap whose frame Dynamo split at a graph break: the
# resumed frame saw the vmapped parameters as not requiring grad and inlined _RnnLayer.forward). Such a
# call is an error now; every other goes on below autograd, one Python call later (the plain eager paths
# call the impls directly and never come here).
_OWN = threading.local()


@contextlib.contextmanager
def _own_call():
    """Raw op calls of the Functions' own backward, whose gradients are not wanted (_RnnLayerGrad's).
    (Not while Dynamo traces a backward: the ops become graph nodes, run with grad mode off.)"""
    if torch.compiler.is_compiling():
        yield
        return
    _OWN.depth = getattr(_OWN, "depth", 0) + 1
    try:
        yield
    finally:
        _OWN.depth -= 1


def _plain_cpu_below(args) -> bool:
    """Nothing below autograd would see these arguments but the CPU kernel: plain CPU tensors, no
    dispatch or function modes, no functorch transforms (a compiled graph's step at run time)."""
    return (all(a is None or not isinstance(a, torch.Tensor) or (type(a) is torch.Tensor and a.is_cpu)
                for a in args)
            and _dispatch_stack_len is not None and _dispatch_stack_len() == 0
            and _functorch_active is not None and not _functorch_active()
            and not torch._C._is_torch_function_mode_enabled())


def _no_gradient_of_its_own(name, cpu_impl=None):
    """`cpu_impl`: the op's CPU kernel, called straight from here where _plain_cpu_below holds (the
    redispatch to it costs ~7 us, half of a decoding step's kernel)."""
    op = getattr(torch.ops.pyseqkern, name).default

    def kernel(*args, **kwargs):
        if torch.is_grad_enabled() and not getattr(_OWN, "depth", 0) and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
            raise RuntimeError(
                f"pyseqkern::{name} was called on tensors that require grad with grad mode on, outside the "
                "autograd.Function that differentiates it (pyseqkern.ops.rnn.rnn_layer): its gradients would "
                "be lost. Under torch.compile with backend='eager' around torch.vmap (an ensemble), use "
                "backend='aot_eager' or 'inductor', or vmap outside torch.compile.")
        if cpu_impl is not None and not kwargs and _plain_cpu_below(args):
            return cpu_impl(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **kwargs)

    LIB.impl(name, kernel, "Autograd")


for _name in ("rnn_pack", "rnn_forward", "rnn_backward"):
    _no_gradient_of_its_own(_name)
_no_gradient_of_its_own("rnn_step_direct", _step_direct_impl)


def apply(fn, *args):
    """fn.apply(*args), without Function.apply's argument binding where it does nothing."""
    if _unwrap_dead is None or _functorch_active is None or _functorch_active() or torch.compiler.is_compiling():
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*_unwrap_dead(args))


class _RnnLayer(torch.autograd.Function):
    """One layer and direction on the kernels. In the setup_context form with a vmap rule, which torch.func
    requires (grad, vjp and an outermost vmap run here, at kernel speed; the other transforms take the
    reference, see _transformed). The reserve and the packed weights are outputs only so that
    setup_context can save them; rnn_layer drops them."""

    @staticmethod
    def forward(mode, reset_after, seq, training, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        eager = _plain_eager(x2d)
        # (a training sequence that the inference rule would have the kernel project: rnn_paths._records_projecting;
        # one step a call goes as cells go, below)
        if (eager and training and seq.steps > 1 and x2d.shape[0]
                and _paths._records_projecting(mode, x2d.dtype, seq.batch)):
            got = _forward_projecting(mode, reset_after, seq, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, True)
            if got is not None:
                return got
        # (one step a call, as a cell in a training loop: the pack of the call before, where still current)
        code, hidden, proj, x_gates, b_hn, packed, x_bias = _prepare(
            mode, reset_after, x2d, w_ih, w_hh, b_ih, b_hh, w_hr, training, _proj_scratch() if eager else None,
            reuse=eager and seq.steps == 1, narrow_batch=seq.batch if eager and training else None)
        # (plain eager: straight to the kernel, as inference and the backward go; the dispatcher's round trip
        # through the raw op's autograd kernel, below, is for everything that must see the op)
        # (CUDA in plain eager mode: the CUDA impl straight, as inference goes, rnn.py's rnn_layer)
        impl = (_forward_impl if eager else _cuda._forward_cuda if _plain_eager_cuda(x2d)
                else torch.ops.pyseqkern.rnn_forward)
        y, h_n, c_n, reserve = impl(code, reset_after, hidden, proj, seq.steps, seq.batch, x_gates, b_hn, h0, c0,
                                    packed, *seq.args(), training, x_bias, _backend.compiled_isa())
        # (inference: the packed weights are the cache's own tensor, which must not leave as an output)
        return y, h_n, (c_n if code == 0 else None), reserve, (packed if training else reserve)

    @staticmethod
    def setup_context(ctx, inputs, output):
        mode, reset_after, seq, training, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = inputs
        _, _, _, reserve, packed = output
        ctx.mark_non_differentiable(reserve, packed)
        ctx.set_materialize_grads(False)
        hidden = w_hh.shape[0] // GATES[mode]
        ctx.cfg = (mode, MODES[mode], reset_after, hidden, 0 if w_hr is None else w_hr.shape[0], seq)
        ctx.device_type = x2d.device.type
        ctx.kept = None
        if training:
            save_layer(ctx, ctx.needs_input_grad[4:], seq.steps, x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0,
                       w_hh, w_hr)

    @staticmethod
    def vmap(info, in_dims, mode, reset_after, seq, training, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        # The mapped dimension V joins the batch: rows (t, b) of each v become rows (t, v, b) of one
        # call with batch V*B. Mapped weights (ensembles) or packed data: one call per v.
        if seq.batch_sizes is not None or any(d is not None for d in in_dims[7:]):
            return _vmap_loop(lambda *a: apply(_RnnLayer, mode, reset_after, seq, training, *a), info.batch_size,
                              (x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr), in_dims[4:])
        V, T, B = info.batch_size, seq.steps, seq.batch
        dx, dh, dc = in_dims[4:7]
        xf = _fold_rows(x2d, dx, V, T, B)
        h0f = None if h0 is None else _fold_states(h0, dh, V)
        c0f = None if c0 is None else _fold_states(c0, dc, V)
        seqf = _Seq(xf.view(T, V * B, xf.shape[-1]), None, seq.reverse)
        y, h_n, c_n, reserve, packed = apply(_RnnLayer, mode, reset_after, seqf, training, xf, h0f, c0f, w_ih, w_hh,
                                                       b_ih, b_hh, w_hr)
        # The reserve keeps its folded rows: only _RnnLayerGrad.vmap reads it (as [T, V, B, cols], dim 1).
        return ((_unfold_rows(y, V, T, B), h_n.view(V, B, -1), None if c_n is None else c_n.view(V, B, -1),
                 reserve.view(T, V, B, -1) if training else reserve, packed),
                (0, 0, None if c_n is None else 0, 1 if training else None, None))

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _reserve, _packed):
        # (A backward called inside an autocast region must not cast the GEMMs below: rnn_autocast.py.)
        with _autocast.off(ctx.device_type):
            return _RnnLayer._backward(ctx, dy, dh_n, dc_n)

    @staticmethod
    def _backward(ctx, dy, dh_n, dc_n):
        need = ctx.needs_input_grad[4:]  # x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
        # Read once: under activation checkpointing (torch.utils.checkpoint, use_reentrant=False) each
        # read recomputes the forward's saved tensors, and a second read is an error.
        return (None, None, None, None, *layer_grads(ctx.cfg, need, saved_layer(ctx), dy, dh_n, dc_n))


_LAYER_SAVED = ("input", "c0", "weight_ih", None, None, "bias_ih", "bias_hh", "h0", "weight_hh", "weight_hr")


def save_layer(ctx, need, steps, x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0, w_hh, w_hr):
    """Saves what a layer's backward reads, in layer_grads' layout. `need`: needs_input_grad of (x2d, h0,
    c0, w_ih, w_hh, b_ih, b_hh, w_hr); `steps`: the call's time steps. In plain eager mode on the CPU,
    the kernels' first-order backward reads x, W_ih, c0, the reserve and the packed weights; besides
    those, what torch.nn's own graph (ATen's cells, from the equations) would save, so that an in-place
    write between forward and backward raises torch's error where torch.nn's does, and nowhere else:
    - x where W_ih wants a gradient, W_ih where x does (h @ W^T saves each for the other's gradient);
    - W_hh where the recurrence carries a gradient (more than one step, or h0 wants one; always in GRU
      reset_before, whose W_hn (r * h) reads r), h0 where W_hh wants one, W_hr where the projected
      state does (more than one step, or anything else wants a gradient). Kept out of the backward's
      arithmetic (the reserve and the packed copy hold what it reads of them), they were once not saved
      at all: an optimizer step between forward and backward went through without a word where
      torch.nn refuses it (an auditing helper, stop 53);
    - no bias (torch.nn's graph adds it: an in-place bias update between forward and backward raised
      here where torch.nn's did not, stop 35). oneDNN's float32 LSTM, which saves everything, refuses
      bias and W_ih writes as well; the gradients do not read them, so they stay allowed here.
    Inference tensors (torch.inference_mode) have no version to save; they are kept, not saved. The rest
    stays on ctx for create_graph's recomputation, which checks it against in-place writes (saved_layer).
    Under torch.func, compilation or on CUDA, all of it (what those track). The reserve and the pack go as
    integers (opaque) but where compiling or under torch.func; saved_layer gives them back as they were."""
    full = (x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0, w_hh, w_hr)
    ctx.workspace_dtypes = (reserve.dtype, packed.dtype)
    if not _plain_eager(x2d):
        ctx.kept = None
        if not torch.compiler.is_compiling() and not (_functorch_active is not None and _functorch_active()) \
                and type(reserve) is torch.Tensor and type(packed) is torch.Tensor:
            full = (*full[:3], opaque(reserve), opaque(packed), *full[5:])
        ctx.save_for_backward(*full)
        return
    need_x, need_h0, _, need_w_ih, need_w_hh = need[:5]
    mode, _, reset_after = ctx.cfg[:3]
    carried = steps > 1 or need_h0 or (mode == "gru" and not reset_after)
    versioned = lambda t, wanted: t if wanted and t is not None and not t.is_inference() else None  # noqa: E731
    ctx.save_for_backward(x2d if need_w_ih else None, c0, w_ih if need_x else None, opaque(reserve), opaque(packed),
                          None, None, versioned(h0, need_w_hh), versioned(w_hh, carried),
                          versioned(w_hr, steps > 1 or any(need[:7])))
    ctx.kept = full
    # (versions of what saved_layer checks only: the reserve and the pack are ours, and no version of
    # an inference tensor can be read)
    ctx.kept_versions = tuple(None if n is None or t is None or t.is_inference() else t._version
                              for n, t in zip(_LAYER_SAVED, full))


_OPAQUE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def opaque(t):
    """A workspace of ours (a layer's reserve and pack, a recorded cell step's gates) as it is saved for
    backward: its bits as integers, as oneDNN's LSTM saves its workspace (uint8), so that saved-tensor
    hooks which compress floating tensors (to float16 or bfloat16, for memory) leave it alone. Rounded,
    a pack's layout stamp no longer matched and every backward raised, and rounded gates gave an LSTM
    twice torch.nn's gradient error under the same hook (a sweep, stop 56). Hooks that move tensors
    (save_on_cpu, to disk) move these too. None stays None."""
    return None if t is None else t.view(_OPAQUE[t.element_size()])


def unopaque(t, dtype):
    """opaque undone, dense (a saved-tensor hook may unpack an equal tensor with other strides; the
    kernels read rows by pointer). A `dtype` tensor (compiled graphs and torch.func save them as they are)
    comes back dense; one a hook unpacked as another type is refused, not reinterpreted."""
    if t is None:
        return None
    if t.dtype == dtype:
        return t.contiguous()
    if t.is_floating_point() or t.is_complex() or t.element_size() != dtype.itemsize:
        raise RuntimeError(f"pyseqkern: a saved-tensor hook unpacked a workspace saved as {_OPAQUE[dtype.itemsize]} "
                           f"(the bits of {dtype} values) as {t.dtype}: unpack must return what pack was given")
    return t.contiguous().view(dtype)


def saved_layer(ctx):
    """The layout save_layer saved; where grad mode is on (create_graph: the reference recomputes the
    layer from these), with what it kept on ctx, each unchanged since the forward or torch's in-place
    error. What the kernel reads by pointer comes back dense (a saved-tensor hook may unpack an equal tensor
    with other strides), the reserve and the pack as floats again (unopaque)."""
    saved = ctx.saved_tensors
    reserve_dtype, packed_dtype = ctx.workspace_dtypes
    saved = (*(None if t is None else t.contiguous() for t in saved[:3]), unopaque(saved[3], reserve_dtype),
             unopaque(saved[4], packed_dtype), *saved[5:])
    if ctx.kept is None or not torch.is_grad_enabled():
        return saved
    check_unchanged("recurrent layer", _LAYER_SAVED, ctx.kept, ctx.kept_versions)
    return tuple(s if s is not None else k for s, k in zip(saved, ctx.kept))


def check_unchanged(what, names, tensors, versions):
    """torch's in-place error where a tensor kept for create_graph's recomputation (not saved: saved
    ones torch checks itself) was written since the forward (its version then: `versions`). Names None:
    not checked; nor versions None (inference tensors have none: made under torch.inference_mode, an
    input of a training call raised "Inference tensors do not track version counter" where torch.nn,
    saving nothing of it, runs; a fuzzer, stop 35)."""
    for name, t, version in zip(names, tensors, versions):
        if name is not None and t is not None and version is not None and t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: the {what}'s {name} is at version {t._version}; expected version {version} "
                f"instead (create_graph=True recomputes the {what} from its inputs)")


def layer_grads(cfg, need, saved, dy, dh_n, dc_n):
    """The 8 gradients (x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) of a layer call from what its forward
    saved: x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0, w_hh, w_hr (_RnnLayer's and _CellStep's)."""
    if _functorch_graph(saved):
        # Under torch.func (grad and vjp ask for a graph whether or not anything differentiates the
        # result; vmap needs rules; vjp's pull may run after its level ended, on dead wrappers that
        # Function.apply unwraps): the kernels, inside a Function with vmap rules whose own backward
        # differentiates the reference.
        return apply(_RnnLayerGrad, cfg, need, *saved, dy, dh_n, dc_n)
    if not torch.is_grad_enabled():
        return _kernel_grads(cfg, need, saved[:5], dy, dh_n, dc_n)
    # create_graph=True asked for in plain autograd: the gradient will be differentiated (penalties,
    # MAML, Hessian-vector products), so the reference's graph is built right away; the kernels first
    # and the reference in the second pass measured 6-15% slower there.
    x2d, c0, w_ih, _, _, b_ih, b_hh, h0, w_hh, w_hr = saved
    return _reference_vjp(cfg, need, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, dy, dh_n, dc_n, functional=False)


def _reserve_operands(reserve, hidden, K):
    """Views of the reserve's columns the weight gradients read (rnn.h's layout; the accumulation dtype,
    cast where used): h_prev (closing every row; dW_hh), r * h_prev (GRU reset_before's dW_hn) and
    m = o * tanh(c) (LSTM with projection; dW_hr). The last two mean nothing for other modes."""
    return reserve[:, reserve.shape[1] - K:], reserve[:, 3 * hidden:4 * hidden], reserve[:, 5 * hidden:6 * hidden]


def _kernel_grads(cfg, need, saved, dy, dh_n, dc_n):
    """The 8 gradients (x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr; None where `need` says no) of a layer
    from the backward kernel and torch GEMMs. `saved`: x2d, c0, w_ih, reserve, packed. At the forward's
    CPU level: its packed weights and reserve are laid out for that level's vector width, and a backward
    at another (the forward in a thread that set its own level, the backward in the caller's; or a level
    set in between) read them in the wrong layout, gradients O(1) off without an error (stop 27)."""
    with _at_level(cfg[5].isa):
        return _kernel_grads_here(cfg, need, saved, dy, dh_n, dc_n)


def _at_level(level):
    """The thread at CPU level `level` (None: a CUDA call) for the block, where it is at another; while
    tracing, nothing (a compiled graph's ops carry their level: _backend.compiled_isa)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _backend.at_isa("backward", level)


def _kernel_grads_here(cfg, need, saved, dy, dh_n, dc_n):
    mode, code, reset_after, hidden, proj, seq = cfg
    x2d, c0, w_ih, reserve, packed = saved  # (dense: saved_layer)
    # Incoming gradients may be any view (y.sum() gives a stride-0 expand, a bidirectional cat a
    # column slice); the kernel reads dense rows.
    dy, dh_n, dc_n = (None if g is None else g.contiguous() for g in (dy, dh_n, dc_n))
    K = proj if proj > 0 else hidden
    if dy is None and dh_n is None and dc_n is None:
        return (None,) * 8  # (no gradient reached the outputs: every input's is zero)
    # (x2d and w_ih are saved only where a gradient reads them: save_layer. The weights' dtype is the
    # outputs', so the incoming gradients'.)
    wdtype = next(g for g in (dy, dh_n, dc_n) if g is not None).dtype
    # One step's GEMMs are small: there oneDNN's setup, the kernel's transposed copies and the joint
    # operand cost more than they save (recorded cell steps at B=32, H=256, in-process: RNNCell 0.61 ->
    # 0.74x torch.nn, GRUCell 0.73 -> 0.81x, LSTMCell 0.66 -> 0.96x with mm on views), so they take mm.
    g = _Gemms(reserve.shape[0] if seq.steps > 1 else 0, wdtype, reserve.device, GATES[mode] * hidden)
    # autograd.grad(is_grads_batched=True) (torch.autograd.functional.jacobian/hessian with vectorize)
    # runs this under torch's legacy vmap: its batched gradients have no storage for the kernels, so the
    # kernel goes through the op (the legacy vmap calls it once per slice) and the GEMMs through mm.
    legacy = _is_legacy_batched is not None and not torch.compiler.is_compiling() and any(
        t is not None and _is_legacy_batched(t) for t in (dy, dh_n, dc_n))
    if legacy:
        g.fast = False
    gru_after = mode == "gru" and reset_after
    # LSTM and RNN: dW_ih = dG^T x, dW_hh = dG^T h_prev and the bias gradient dG^T 1 in one GEMM,
    # dG^T [x | h_prev | 1] (one pass over dG^T: 10% less time than two GEMMs and a sum), x^T,
    # h_prev^T and a row of ones stacked in one buffer.
    I = 0 if x2d is None else x2d.shape[1]
    with_db = need[5] or need[6]
    joint = None
    use_joint = g.fast and g.joint and mode != "gru" and need[3] and need[4]  # (never under the legacy vmap: g.fast)

    def make_joint(take):
        j = take((I + K + with_db, reserve.shape[0]), wdtype)
        j[:I].copy_(x2d.t())
        if with_db:
            j[I + K].fill_(1)
        return j

    if reserve.device.type == "cpu" and _plain_eager(reserve) and not legacy:
        # Straight to the kernel (as inference does) with the temporaries in this thread's scratch:
        # none of them leaves this function (every gradient returned is a fresh GEMM output).
        scratch = _scratch()
        joint = make_joint(scratch.take) if use_joint else None
        dgx, dgh, dproj, dh0, dc0, dgx_t, dgh_t, hprev_t = _backward_impl(
            code, reset_after, hidden, proj, seq.steps, seq.batch, dy, dh_n, dc_n, c0, reserve, packed,
            *seq.args(), g.fast, scratch=scratch, h_prev_t=None if joint is None else joint[I:I + K])
    else:
        # (CUDA in plain eager mode: the CUDA impl straight; elsewhere the op, which modes and tracers see)
        impl = _cuda._backward_cuda if not legacy and _plain_eager_cuda(reserve) else torch.ops.pyseqkern.rnn_backward
        with _own_call():
            dgx, dgh, dproj, dh0, dc0, dgx_t, dgh_t, hprev_t = impl(
                code, reset_after, hidden, proj, seq.steps, seq.batch, dy, dh_n, dc_n, c0, reserve, packed,
                *seq.args(), g.fast, _backend.compiled_isa())
        if use_joint:  # the same GEMM, so both paths give the same bits
            joint = make_joint(lambda shape, dtype: torch.empty(shape, dtype=dtype, device=reserve.device))
            joint[I:I + K].copy_(hprev_t)
    h_prev, rh, m = _reserve_operands(reserve, hidden, K)
    if not g.fast:  # views for mm
        dgx_t = dgx.t()
        dgh_t = dgh.t() if gru_after else None
        hprev_t = h_prev.to(wdtype).t()
    dx = g.mm_rows(dgx, w_ih) if need[0] else None
    dw_hh = dw_hr = None
    db = None
    if joint is not None:
        dw = g.mm(dgx_t, joint)
        dw_ih, dw_hh = dw[:, :I], dw[:, I:I + K]
        if with_db:
            db = dw[:, I + K].contiguous()
    else:
        dw_ih = g.mm_rows(dgx_t, x2d) if need[3] else None
        db = dgx.sum(0) if with_db else None
    if need[4] and joint is None:
        if gru_after:
            dw_hh = g.mm(dgh_t, hprev_t)
        elif mode == "gru":
            dw_hh = torch.cat([g.mm(dgx_t[:2 * hidden], hprev_t), g.mm(dgx_t[2 * hidden:], g.t(rh.to(wdtype)))])
        else:
            dw_hh = g.mm(dgx_t, hprev_t)
    db_hh = None
    if need[6]:
        db_hh = dgh_t.sum(1) if gru_after else db
    if need[7]:
        dw_hr = g.mm(g.t(dproj), g.t(m.to(wdtype)))
    return (dx, dh0 if need[1] else None, (dc0 if code == 0 else None) if need[2] else None,
            dw_ih, dw_hh, db if need[5] else None, db_hh, dw_hr)


class _RnnLayerGrad(torch.autograd.Function):
    """The backward of _RnnLayer under torch.func (grad and vjp ask for a graph of the gradient whether or
    not anything uses it; vmap needs a rule): the forward is the kernels' backward, so those transforms
    run at kernel speed; the backward (nested grad: a gradient of a gradient) recomputes the layer by its
    reference, takes its vector-Jacobian product with a graph and differentiates that (a Python loop over
    steps, exact to rounding, and differentiable again)."""

    @staticmethod
    def forward(cfg, need, x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0, w_hh, w_hr, dy, dh_n, dc_n):
        grads = _kernel_grads(cfg, need, (x2d, c0, w_ih, reserve, packed), dy, dh_n, dc_n)
        # Outputs of a Function must be distinct tensors of their own: the joint GEMM's two weight
        # gradients are views of one buffer, and LSTM and RNN give both biases the same tensor.
        seen, out = set(), []
        for t in grads:
            if t is not None and (id(t) in seen or t._base is not None):
                t = t.clone()
            if t is not None:
                seen.add(id(t))
            out.append(t)
        return tuple(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        cfg, need, x2d, c0, w_ih, _, _, b_ih, b_hh, h0, w_hh, w_hr, dy, dh_n, dc_n = inputs
        ctx.set_materialize_grads(False)
        ctx.cfg, ctx.need, ctx.device_type = cfg, need, x2d.device.type
        ctx.save_for_backward(x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, dy, dh_n, dc_n)

    @staticmethod
    def vmap(info, in_dims, cfg, need, x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0, w_hh, w_hr, dy, dh_n, dc_n):
        # As _RnnLayer.vmap: one backward call over the folded batch, then each v's weight gradients by
        # batched GEMMs over its own rows (per-sample gradients: the weights are not mapped, dy is); or
        # one call per v where the weights (or the packed weights) are mapped or the data packed.
        mode, code, reset_after, hidden, proj, seq = cfg
        V, T, B = info.batch_size, seq.steps, seq.batch

        def wrapped(t):  # (a tensor of an outer transform's level: an ensemble's mapped weights, say)
            return t is not None and _is_functorch_wrapped is not None and _is_functorch_wrapped(t)
        # Where an outer level may differentiate what this rule returns (grad(vjp -> vmap(pull)), or a Jacobian
        # penalty jacrev(f)(x).square().sum().backward()), the folded call below will not do: its raw kernels
        # and per-v GEMMs are in no graph, and such gradients came back zero or partial, without a word. One
        # Function call per v keeps _RnnLayerGrad's own backward for each.
        differentiated = torch.is_grad_enabled() and any(
            t is not None and (t.requires_grad or wrapped(t))
            for t in (x2d, c0, w_ih, b_ih, b_hh, h0, w_hh, w_hr, dy, dh_n, dc_n))
        looped = (differentiated or seq.batch_sizes is not None
                  or any(in_dims[i] is not None for i in (4, 6, 7, 8, 10, 11)))
        whole = packed
        if not looped:
            # (a forward below the level's split_rows may have packed without the piece sections, which the
            # folded call of V*B rows reads: jacrev's cotangents, a vjp's pull under vmap; a whole pack then,
            # made here only from plain weights)
            if any(wrapped(t) for t in (packed, w_hh, w_hr)):
                whole = None
            else:
                with _at_level(seq.isa):
                    whole = _pack_for_rows(code, reset_after, hidden, proj, packed, w_hh, w_hr, B, V * B, w_ih.dtype)
        if looped or whole is None:
            def one(x2d, c0, w_ih, reserve, *rest):  # (a folded forward's reserve comes as [T, B, cols]: at B=1
                # its rows of one v are T rows V*cols apart, which the reshape keeps as a view)
                return apply(_RnnLayerGrad, cfg, need, x2d, c0, w_ih,
                             reserve.reshape(-1, reserve.shape[-1]).contiguous(), *rest)
            return _vmap_loop(one, info.batch_size, (x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0, w_hh, w_hr, dy,
                                                     dh_n, dc_n), in_dims[2:])
        packed = whole
        K = proj if proj > 0 else hidden
        d = dict(zip(("x2d", "c0", "reserve", "dy", "dh_n", "dc_n"),
                     (in_dims[2], in_dims[3], in_dims[5], in_dims[12], in_dims[13], in_dims[14])))
        xf = _fold_rows(x2d, d["x2d"], V, T, B)
        rf = _fold_rows(reserve, d["reserve"], V, T, B)
        c0f = None if c0 is None else _fold_states(c0, d["c0"], V)
        dyf = None if dy is None else _fold_rows(dy, d["dy"], V, T, B).contiguous()
        dhf = None if dh_n is None else _fold_states(dh_n, d["dh_n"], V).contiguous()
        dcf = None if dc_n is None else _fold_states(dc_n, d["dc_n"], V).contiguous()
        seqf = _Seq(xf.view(T, V * B, xf.shape[-1]), None, seq.reverse)
        with _at_level(seq.isa), _own_call():  # (the forward's level: _kernel_grads)
            dgx, dgh, dproj, dh0, dc0, _, _, _ = torch.ops.pyseqkern.rnn_backward(
                code, reset_after, hidden, proj, T, V * B, dyf, dhf, dcf, c0f, rf, packed, *seqf.args(), False,
                _backend.compiled_isa())
        wdtype = w_ih.dtype

        h_prev, rh, m = _reserve_operands(rf, hidden, K)

        def per_v(a, b):  # sum over each v's rows of a^T b: [V, a cols, b cols]
            return torch.einsum("tvbm,tvbn->vmn", a.reshape(T, V, B, -1), b.to(wdtype).reshape(T, V, B, -1))

        def col_sum(a):
            return a.reshape(T, V, B, -1).sum((0, 2))
        out = [None] * 8
        if need[0]:
            out[0] = _unfold_rows(_mm(dgx, w_ih.t()), V, T, B)
        if need[1]:
            out[1] = dh0.view(V, B, -1)
        if need[2] and code == 0:
            out[2] = dc0.view(V, B, -1)
        if need[3]:
            out[3] = per_v(dgx, xf)
        if need[4]:
            if mode == "gru" and reset_after:
                out[4] = per_v(dgh, h_prev)
            elif mode == "gru":
                out[4] = torch.cat([per_v(dgx[:, :2 * hidden], h_prev), per_v(dgx[:, 2 * hidden:], rh)], 1)
            else:
                out[4] = per_v(dgx, h_prev)
        if need[5]:
            out[5] = col_sum(dgx)
        if need[6]:
            out[6] = col_sum(dgh if mode == "gru" and reset_after else dgx)
        if need[7]:
            out[7] = per_v(dproj, m)
        return tuple(out), tuple(None if t is None else 0 for t in out)

    @staticmethod
    def backward(ctx, *vs):
        with _autocast.off(ctx.device_type):
            return _RnnLayerGrad._backward(ctx, *vs)

    @staticmethod
    def _backward(ctx, *vs):
        saved = ctx.saved_tensors
        n = ctx.needs_input_grad
        idx = [i for i, at in enumerate(_GRAD_SAVED_AT) if n[at] and saved[i] is not None]
        inputs = saved[:8]
        cotangents = any(g is not None for g in saved[8:])
        outs = [j for j in range(8) if vs[j] is not None and ctx.need[j] and inputs[j] is not None and cotangents]
        result = [None] * 15
        if not idx or not outs:
            return tuple(result)

        if not torch.is_grad_enabled():
            # Nothing will differentiate this result (the usual gradient penalty or MAML step): plain
            # autograd on detached leaves, a third of torch.func's overhead on the reference's small ops.
            leaves = [None if t is None else t.detach().requires_grad_(t.dtype.is_floating_point) for t in saved]
            with torch.enable_grad():
                first = _reference_vjp(ctx.cfg, ctx.need, *leaves, functional=False)
                pairs = [(first[j], vs[j]) for j in outs if first[j] is not None]
                got = torch.autograd.grad([f for f, _ in pairs], [leaves[i] for i in idx],
                                          [v for _, v in pairs], allow_unused=True) if pairs else [None] * len(idx)
            for i, g in zip(idx, got):
                result[_GRAD_SAVED_AT[i]] = g
            return tuple(result)

        def first_order(*diff):
            full = list(saved)
            for i, t in zip(idx, diff):
                full[i] = t
            first = _reference_vjp(ctx.cfg, ctx.need, *full)
            return tuple(first[j] for j in outs)
        # A graph is recorded (third order and up): torch.func.vjp, not autograd.grad on the saved
        # tensors, so that the recomputation stays a graph of its own (autograd.grad from it would run on
        # into the caller's graph through dy's history, and free it) and the result is differentiable.
        _, pull = torch.func.vjp(first_order, *(saved[i] for i in idx))
        for i, g in zip(idx, pull(tuple(vs[j] for j in outs))):
            result[_GRAD_SAVED_AT[i]] = g
        return tuple(result)


def _functorch_graph(saved) -> bool:
    """A backward inside a torch.func transform (autograd.grad's is_grads_batched too), or on tensors one
    made (vjp's pull). Never while compiling (Dynamo traces the backward and cannot trace these checks)."""
    if torch.compiler.is_compiling():
        return False
    if _functorch_active is not None and _functorch_active():
        return True
    return _is_functorch_wrapped is not None and any(t is not None and _is_functorch_wrapped(t) for t in saved)


def _vmap_loop(fn, V, args, dims):
    """A vmap rule by one call of fn per v on each argument's slice v (None dims: the whole argument);
    outputs stacked at dim 0 (None stays None)."""
    outs = [fn(*(a if d is None or a is None else a.select(d, v) for a, d in zip(args, dims))) for v in range(V)]
    stacked = tuple(None if o[0] is None else torch.stack([each[i] for each in outs])
                    for i, o in enumerate(zip(*outs)))
    return stacked, tuple(None if t is None else 0 for t in stacked)


def _fold_rows(t, dim, V, T, B):
    """Rows (t, b) of sequence data mapped over V at `dim` (None: the same for every v) as the rows
    (t, v, b) of one batch of V*B: [T*V*B, cols]."""
    t = t.unsqueeze(0).expand(V, *t.shape) if dim is None else t.movedim(dim, 0)
    # (contiguous: where T*B is 1, the reshape of an expanded t is a view with stride 0 over V)
    return t.reshape(V, T, B, -1).transpose(0, 1).reshape(T * V * B, -1).contiguous()


def _fold_states(t, dim, V):
    """States [B, cols] mapped over V as the rows (v, b) of one batch: [V*B, cols]."""
    t = t.unsqueeze(0).expand(V, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(V * t.shape[1], -1).contiguous()  # (B = 1: a stride-0 view otherwise)


def _unfold_rows(t, V, T, B):
    """_fold_rows undone: [T*V*B, cols] as [V, T*B, cols]."""
    return t.reshape(T, V, B, -1).transpose(0, 1).reshape(V, T * B, -1)


# Where _RnnLayerGrad's saved tensors (x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, dy, dh_n, dc_n) stand
# among its forward's arguments (cfg, need, x2d, c0, w_ih, reserve, packed, b_ih, b_hh, h0, w_hh, w_hr, dy,
# dh_n, dc_n).
_GRAD_SAVED_AT = (2, 9, 3, 4, 10, 7, 8, 11, 12, 13, 14)


def _reference_vjp(cfg, need, x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, dy, dh_n, dc_n, functional=True):
    """The 8 first-order gradients of _kernel_grads (None where `need` says no or the input is None),
    computed by the reference with a graph. Through torch.func.vjp, or with `functional=False` by
    autograd.grad(create_graph=True) w.r.t. the given tensors (the wanted ones must require grad)."""
    mode, code, reset_after, hidden, proj, seq = cfg
    inputs = (x2d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    wanted = [i for i, (t, w) in enumerate(zip(inputs, need)) if w and t is not None]
    cots = [(k, g) for k, g in enumerate((dy, dh_n, dc_n)) if g is not None and (k < 2 or code == 0)]
    grads = [None] * len(inputs)
    if not wanted or not cots:
        return grads

    def layer(*diff):
        full = list(inputs)
        for i, t in zip(wanted, diff):
            full[i] = t
        x = full[0] if seq.batch_sizes is not None else full[0].reshape(seq.steps, seq.batch, full[0].shape[1])
        y, h_n, c_n = _reference.rnn_layer(mode, x, seq.batch_sizes, *full[1:], seq.reverse, reset_after)
        outs = (y.reshape(-1, y.shape[-1]), h_n, c_n)
        return tuple(outs[k] for k, _ in cots)
    if functional:
        _, pull = torch.func.vjp(layer, *(inputs[i] for i in wanted))
        got = pull(tuple(g for _, g in cots))
    else:
        # Partial derivatives: with respect to an alias of each wanted tensor (a node of its own), not the
        # tensor itself. Where an input depends on another (x computed from this layer's earlier
        # output, so from its weights: a layer applied twice, a cell loop), autograd.grad w.r.t. the
        # tensors gave the total derivative, the path through x counted here and again by the outer
        # engine (weight gradients 0.2-2x off under create_graph). The result stays differentiable
        # w.r.t. the originals through the aliases.
        alias = [inputs[i].view_as(inputs[i]) for i in wanted]
        got = torch.autograd.grad(layer(*alias), alias, [g for _, g in cots], create_graph=True, allow_unused=True)
    for i, g in zip(wanted, got):
        grads[i] = g
    return grads
