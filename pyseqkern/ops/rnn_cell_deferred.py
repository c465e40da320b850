"""Recorded float32/float64 cell steps at small batches: one autograd node a step, and the weight
gradients of a whole loop of steps formed at once, in the backward of a node that runs after them all.

A cell stepped in a training loop (teacher forcing, attention decoders) records one step per call. On
the CPU at small batches its cost is not arithmetic: torch.nn's backward of each step writes dW_ih and
dW_hh afresh (two outer products of 768 KB-1 MB at H=256) and the engine adds each into the
parameter's gradient buffer, a few MB of memory traffic per step for a few KB of gate gradients; its
activations are ~12 autograd nodes a step. The kernel route (_CellStep) paid the same, plus a check of
the packed weights against W_hh and ~60 Python calls a step: 0.72-0.85x torch.nn at B=1.

Here a step is one node (_Step): the gates' products as torch.nn computes them (x W_ih^T + b_ih,
h W_hh^T + b_hh), then the activations in one call (_C.cell_*, pyseqkern/cell_pointwise.h), whose
derivatives its backward takes in one call too. The backward forms the gradients of x and h, and leaves
its gate gradients with its x and h in the loop's accumulator. Every step of a loop also takes one
empty tensor (the token) that _WeightGrads made from the parameters, so autograd runs
_WeightGrads.backward after every step of the backward pass; it forms dW = dG^T [x; h] and db = dG^T 1
for all the steps in one GEMM each. A step's outputs carry the token to the step that takes them (or a
view of their memory) as states (_LOOPS), until the token's backward has run; a state that carries none
(h0, or a state computed from the outputs) starts a new loop. The accumulator keys what it holds by
autograd's graph task, so two backward passes over one token (retain_graph, autograd.grad of another
output) each get their own steps' gradients; where the engine will not run the token (autograd.grad
asked only for inputs), a step leaves nothing.

create_graph=True (a gradient that will be differentiated): a step's backward returns its gradients as
a graph of the reference's equations instead, nothing deferred. Above _DEFER_MAX_BATCH rows, where the
products dominate and one GEMM over all steps saves nothing, a step is plain torch ops (_composite:
F.linear and torch's activations, torch.nn's own arithmetic). GRU with reset_after=False (mode
"gru_before": W_hn multiplies r * h, known only after r) runs its second product and activations as
torch's ops inside the one node.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .. import _backend, _C
from .rnn_seq import _Seq
from .rnn_gemms import _mm
from .rnn_modes import GATES, MODES
from .rnn_autograd import (_at_level, _is_functorch_wrapped, _is_legacy_batched, _reference_vjp, _unwrap_dead,
                           check_unchanged, opaque, unopaque)

# Up to this many rows (by mode) a recorded step is a _Step with deferred weight gradients; above,
# _composite. In-process against torch.nn (H=256, T=50, x requiring grad, forward + backward, 7-11
# rotations), deferred / composite: LSTMCell B=16 1.23 / 0.99x, B=32 1.16 / 0.99x, B=64 1.12 / 0.98x;
# GRUCell 1.27 / 0.99x, 0.96 / 0.92x, 1.06 / 1.00x; RNNCell B=8 1.05 / 0.98x but B=16 0.86 / 1.01x,
# B=32 0.77-0.85 / 0.98-1.07x, B=64 0.78-0.92 / 0.97-1.00x (a plain RNN step's per-step products are
# small and torch's nodes cheap; the deferred GEMM over all steps gains nothing there). The accumulator
# holds every step's gate gradients until the token runs (T*B*G*H values, 13 MB for an LSTM at T=50,
# B=64, H=256).
_DEFER_MAX_BATCH = {"lstm": 64, "gru": 64, "gru_before": 64, "rnn_tanh": 8, "rnn_relu": 8}
_NO_GRAD = torch.empty(0)  # (the token's gradient: a step has none to give it)
_graph_task_id = torch._C._current_graph_task_id
_will_run = torch._C._will_engine_execute_node


class _Accumulator:
    """A loop's deferred gate gradients: per graph task, lists of dG_x (and dG_h where they differ, GRU),
    x and h rows, and r * h (GRU reset_before: W_hn's operand). `node` is the token's backward node;
    `spent` once it has run."""

    __slots__ = ("pair", "before", "node", "spent", "by_task", "__weakref__")

    def __init__(self, mode):
        self.pair, self.before = mode == "gru", mode == "gru_before"
        self.node, self.spent, self.by_task = None, False, {}

    def leave(self, dgi, dgh, x, h, rh=None):
        lists = self.by_task.get(_graph_task_id())
        if lists is None:
            lists = self.by_task[_graph_task_id()] = ([], [], [], [], [])
        lists[0].append(dgi)
        if self.pair:
            lists[1].append(dgh)
        lists[2].append(x)
        lists[3].append(h)
        if self.before:
            lists[4].append(rh)


def _rows(ts):
    return ts[0] if len(ts) == 1 else torch.cat(ts)


class _WeightGrads(torch.autograd.Function):
    """token = _WeightGrads(acc, w_ih, w_hh, b_ih, b_hh): an empty tensor every deferring step takes;
    its backward forms the parameters' gradients from what those steps left in acc."""

    @staticmethod
    def forward(ctx, acc, w_ih, w_hh, b_ih, b_hh):
        ctx.acc = acc
        return w_ih.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        acc = ctx.acc
        acc.spent = True
        lists = acc.by_task.pop(_graph_task_id(), None)
        if lists is None:
            return None, None, None, None, None
        dgi = _rows(lists[0])
        dgh = _rows(lists[1]) if acc.pair else dgi
        need = ctx.needs_input_grad
        dw_ih = _rows_product(dgi, _rows(lists[2])) if need[1] else None
        dw_hh = None
        if need[2]:
            dw_hh = _before_w_hh_grad(dgi, _rows(lists[3]), _rows(lists[4])) if acc.before else \
                _rows_product(dgh, _rows(lists[3]))
        return None, dw_ih, dw_hh, dgi.sum(0) if need[3] else None, dgh.sum(0) if need[4] else None


def _before_w_hh_grad(dg, h, rh):
    """GRU reset_before's dW_hh: its r and z rows multiply h, its n rows r * h."""
    hidden = dg.shape[1] // 3
    return torch.cat([_rows_product(dg[:, :2 * hidden], h), _rows_product(dg[:, 2 * hidden:], rh)])


def _rows_product(a, b):
    """a^T b summed over the steps' rows (_mm: in blocks of rows where the product is narrow)."""
    return _mm(a.t(), b.t())


def _ptr(t):
    return 0 if t is None else t.data_ptr()


class _Step(torch.autograd.Function):
    """One step in one node: the gate products as torch computes them (x W_ih^T + b_ih, h W_hh^T + b_hh;
    summed for LSTM and RNN, apart for GRU), and the activations and their derivatives in one call each
    (_C.cell_*, pyseqkern/cell_pointwise.h). With acc, the weight gradients are left for the token's
    backward (module docstring); without, each step forms its own. h, c: contiguous (h zeros where the
    caller gave none; c None there)."""

    @staticmethod
    def forward(ctx, mode, acc, x, h, c, token, w_ih, w_hh, b_ih, b_hh):
        # Saved (so checked against in-place writes before the backward) only what the first-order
        # backward reads, as torch.nn's ops save theirs: x where W_ih wants a gradient, W_ih where x
        # does, never a bias. An in-place bias update between forward and backward raised here and
        # not in torch.nn (found by a fuzzing helper). The weights as aliases made now: a later
        # `p.data = ...` rebinds the parameter, not what this step multiplied. The inputs themselves
        # stay on ctx for create_graph, which recomputes the step (_inputs_for_graph).
        # A GRU's backward reads h itself (dz = dh (h - n)): where W_hh wants no gradient it keeps a copy, as
        # torch.nn's fused GRU cell keeps h in its workspace, so a write to h before the backward (a frozen
        # GRU's state reused in place) is not refused where torch.nn's is not (a fuzzer, stop 33).
        need = ctx.needs_input_grad
        gru = mode in ("gru", "gru_before")
        kept = (x if need[6] else None, h if need[7] else h.clone() if gru else None, c,
                w_ih.detach() if need[2] else None, w_hh.detach() if need[3] or mode == "gru_before" else None)
        ctx.inputs = (x, h, c, w_ih, w_hh, b_ih, b_hh)
        ctx.versions = tuple(None if t is None or t.is_inference() else t._version for t in ctx.inputs)
        gi = torch.addmm(b_ih, x, w_ih.t()) if b_ih is not None else x.mm(w_ih.t())
        gh = None if mode == "gru_before" else torch.addmm(b_hh, h, w_hh.t()) if b_hh is not None else \
            h.mm(w_hh.t())
        batch, hidden = h.shape
        f64 = x.dtype == torch.float64
        ctx.mode, ctx.acc, ctx.isa, ctx.dtype = mode, acc, _backend.active_isa(), x.dtype
        ctx.set_materialize_grads(False)
        if mode == "lstm":
            gates = gi.add_(gh)
            c_n, tanh_c, h_n = torch.empty_like(h), torch.empty_like(h), torch.empty_like(h)
            _C.cell_lstm_forward(f64, batch, hidden, gates.data_ptr(), _ptr(c), c_n.data_ptr(), tanh_c.data_ptr(),
                                 h_n.data_ptr())
            ctx.save_for_backward(*kept, opaque(gates), opaque(tanh_c))
            return h_n, c_n
        if mode == "gru_before":  # (W_hn multiplies r * h: its product waits for r; torch's ops)
            two = 2 * hidden
            gh = torch.addmm(b_hh[:two], h, w_hh[:two].t()) if b_hh is not None else h.mm(w_hh[:two].t())
            rz = gh.add_(gi[:, :two]).sigmoid_()
            rh = rz[:, :hidden] * h
            n = torch.addmm(b_hh[two:], rh, w_hh[two:].t()) if b_hh is not None else rh.mm(w_hh[two:].t())
            n = n.add_(gi[:, two:]).tanh_()
            ctx.save_for_backward(*kept, opaque(rz), opaque(n), opaque(rh))
            return torch.addcmul(n, rz[:, hidden:], h - n)
        if mode == "gru":
            act, h_n = torch.empty_like(gi), torch.empty_like(h)
            _C.cell_gru_forward(f64, batch, hidden, gi.data_ptr(), gh.data_ptr(), h.data_ptr(), act.data_ptr(),
                                h_n.data_ptr())
            ctx.save_for_backward(*kept, opaque(act), opaque(gh))
            return h_n
        act = gi.add_(gh)
        _C.cell_rnn_forward(f64, batch, hidden, act.data_ptr(), mode == "rnn_relu")
        ctx.save_for_backward(*kept, opaque(act))
        return act

    @staticmethod
    def backward(ctx, dh_n, dc_n=None):
        with _at_level(ctx.isa):  # (the activations' derivatives at the forward's level, as a layer's)
            return _Step._backward(ctx, dh_n, dc_n)

    @staticmethod
    def _backward(ctx, dh_n, dc_n=None):
        mode, need = ctx.mode, ctx.needs_input_grad
        # create_graph=True, or batched gradients without storage for the kernels: autograd.grad(
        # is_grads_batched=True) (torch.autograd.functional's vectorized jacobian, torch's legacy vmap), or
        # torch.vmap over autograd.grad of an eager graph (a review, stop 56: "Cannot access data pointer")
        if torch.is_grad_enabled() or (_is_legacy_batched is not None and any(
                g is not None and (_is_legacy_batched(g) or _is_functorch_wrapped(g)) for g in (dh_n, dc_n))):
            return _differentiable_grads(mode, need, _inputs_for_graph(ctx), dh_n, dc_n)
        # Dense: a saved-tensor hook may unpack an equal tensor with other strides (autograd asks only for
        # the same values), and the cell kernels read rows by pointer (gradients O(1) off, a sweep, stop 56);
        # the step's own activations as floats again (opaque).
        saved = ctx.saved_tensors
        saved = (*(None if t is None else t.contiguous() for t in saved[:5]),
                 *(unopaque(t, ctx.dtype) for t in saved[5:]))
        x, h, c, w_ih, w_hh = saved[:5]
        if dh_n is None and dc_n is None:
            return (None,) * 10
        dh_n = None if dh_n is None else dh_n.contiguous()
        dc_n = None if dc_n is None else dc_n.contiguous()
        if mode == "gru_before":
            return _before_backward(ctx, need, saved, dh_n)
        act0 = saved[5]  # (the step's activations: x, h may not be saved)
        batch, hidden, f64 = act0.shape[0], act0.shape[1] // GATES[mode], act0.dtype == torch.float64
        dc = dh_direct = None
        if mode == "lstm":
            gates, tanh_c = saved[5:]
            d_gi = d_gh = torch.empty_like(gates)
            dc = gates.new_empty(batch, hidden) if need[4] else None
            _C.cell_lstm_backward(f64, batch, hidden, gates.data_ptr(), _ptr(c), tanh_c.data_ptr(), _ptr(dh_n),
                                  _ptr(dc_n), d_gi.data_ptr(), _ptr(dc))
        elif mode == "gru":
            act, gh = saved[5:]
            d_gi, d_gh = torch.empty_like(act), torch.empty_like(act)
            dh_direct = torch.empty_like(h) if need[3] else None
            _C.cell_gru_backward(f64, batch, hidden, act.data_ptr(), gh.data_ptr(), h.data_ptr(), _ptr(dh_n),
                                 d_gi.data_ptr(), d_gh.data_ptr(), _ptr(dh_direct))
        else:
            act = saved[5]
            d_gi = d_gh = torch.empty_like(act)
            _C.cell_rnn_backward(f64, batch, hidden, act.data_ptr(), dh_n.data_ptr(), d_gi.data_ptr(),
                                 mode == "rnn_relu")
        dx = d_gi.mm(w_ih) if need[2] else None
        dh = d_gh.mm(w_hh) if need[3] else None
        if dh_direct is not None:
            dh.add_(dh_direct)
        acc = ctx.acc
        if acc is not None:
            if _will_run(acc.node):
                acc.leave(d_gi, d_gh, x, h)
            return None, None, dx, dh, dc, _NO_GRAD, None, None, None, None
        return (None, None, dx, dh, dc, None, d_gi.t().mm(x) if need[6] else None,
                d_gh.t().mm(h) if need[7] else None, d_gi.sum(0) if need[8] else None,
                d_gh.sum(0) if need[9] else None)


def _before_backward(ctx, need, saved, dh_n):
    """_Step.backward of a GRU reset_before step (torch's ops: n's pre-activation holds W_hn (r * h))."""
    x, h, c, w_ih, w_hh, rz, n, rh = saved
    hidden = h.shape[1]
    two = 2 * hidden
    r, z = rz[:, :hidden], rz[:, hidden:]
    dg = torch.empty(h.shape[0], 3 * hidden, dtype=h.dtype)
    torch.mul(dh_n * (1 - z), 1 - n * n, out=dg[:, two:])
    torch.mul(dh_n * (h - n), z * (1 - z), out=dg[:, hidden:two])
    d_rh = dg[:, two:].mm(w_hh[two:])
    torch.mul(d_rh * h, r * (1 - r), out=dg[:, :hidden])
    dx = dg.mm(w_ih) if need[2] else None
    dh = (dh_n * z).addcmul_(d_rh, r).addmm_(dg[:, :two], w_hh[:two]) if need[3] else None
    acc = ctx.acc
    if acc is not None:
        if _will_run(acc.node):
            acc.leave(dg, dg, x, h, rh)
        return None, None, dx, dh, None, _NO_GRAD, None, None, None, None
    return (None, None, dx, dh, None, None, dg.t().mm(x) if need[6] else None,
            _before_w_hh_grad(dg, h, rh) if need[7] else None, dg.sum(0) if need[8] else None,
            dg.sum(0) if need[9] else None)


def _inputs_for_graph(ctx):
    """(x, h, c, w_ih, w_hh, b_ih, b_hh) of a step for create_graph's recomputation: the tensors
    themselves (the graph must reach them), unchanged since the forward, as torch's saved tensors are."""
    check_unchanged("cell step", ("x", "h", "c", "weight_ih", "weight_hh", "bias_ih", "bias_hh"), ctx.inputs,
                    ctx.versions)
    return ctx.inputs


def _differentiable_grads(mode, need, inputs, dh_n, dc_n):
    """_Step.backward's gradients from the reference's equations on the saved inputs (rnn_autograd's
    _reference_vjp, the layer route's, for a one-step layer), as a graph; nothing deferred (the token
    gets none). Grad mode on for it: a batched backward runs without."""
    x, h, c, w_ih, w_hh, b_ih, b_hh = inputs
    base = "gru" if mode == "gru_before" else mode
    cfg = (base, MODES[base], mode != "gru_before", h.shape[1], 0, _Seq(x.unsqueeze(0), None, False))
    wanted = (need[2], need[3], need[4], need[6], need[7], need[8], need[9], False)
    with torch.enable_grad():
        g = _reference_vjp(cfg, wanted, x, h, c, w_ih, w_hh, b_ih, b_hh, None, None, dh_n, dc_n, functional=False)
    return None, None, g[0], g[1], g[2], None, g[3], g[4], g[5], g[6]


# step() runs only outside torch.func and compilation (rnn_cell_train.step's checks): torch's C apply
# directly, as _CellStep does.
def _c_apply(fn):
    return fn.apply if _unwrap_dead is None else super(torch.autograd.Function, fn).apply


_step = _c_apply(_Step)
_weight_grads = _c_apply(_WeightGrads)
# The loop a state belongs to: state's data_ptr -> (acc, token, parameter ids, weakref to the output
# there). A step's outputs carry its loop to the next step that takes them, or a view of their memory
# (a layer fed one token a call passes h_n[0] of its last call), as states; the entry goes with the
# output. Any step may share any open token of its parameters (the token runs after every step that
# took it), so a memory match is enough; the table only keeps tokens from outliving what uses them:
# one keyed by the parameters would hold them, through the token's graph, for good. (Nor an attribute
# on the tensor: torch.save pickles a tensor's __dict__.)
_LOOPS: dict = {}


def _loop_of(states, key):
    """The open loop (acc, token, key) one of `states` carries for parameters `key`, or None."""
    for s in states:
        if s is None:
            continue
        entry = _LOOPS.get(s.data_ptr())
        if entry is not None and entry[2] == key and not entry[0].spent and entry[3]() is not None:
            return entry
    return None


def _enter(k, loop, t):
    """The memory at address k carries loop (acc, token, key) while t lives."""
    def drop(ref):  # (only its own entry: the address may carry a newer output's by then)
        if _LOOPS.get(k, (None,) * 4)[3] is ref:
            del _LOOPS[k]

    _LOOPS[k] = (*loop[:3], weakref.ref(t, drop))


def _carry(loop, outputs):
    for t in outputs:
        _enter(t.data_ptr(), loop, t)


def carry_stacked(parts, stacked):
    """stacked = torch.stack(parts): each stacked[i] carries the loop parts[i] carries, while stacked
    lives. A layer fed one token a call stacks its layers' states into h_n (c_n), whose views the next
    call takes as states: without this every step of a module of several layers started a loop of its
    own, and formed its own weight gradients (RNN, 2 layers, B=1, H=256: 0.80x torch.nn)."""
    row = stacked.stride(0) * stacked.element_size()
    for i, t in enumerate(parts):
        entry = _LOOPS.get(t.data_ptr())
        if entry is not None and entry[3]() is not None and not entry[0].spent:
            _enter(stacked.data_ptr() + i * row, entry, stacked)


def step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """(h_n,) or (h_n, c_n) of one recorded step; mode "lstm", "gru" (reset_after), "gru_before" or
    "rnn_tanh" / "rnn_relu"; x [B, I], h and c [B, H] contiguous or None (zeros). The caller has checked
    shapes, dtypes (float32 / float64) and devices."""
    states = (h, c)
    if h is None:  # (zeros, multiplied too, so that W_hh gets the zero gradient torch.nn gives it)
        h = x.new_zeros(x.shape[0], w_hh.shape[1])
    if x.shape[0] > _DEFER_MAX_BATCH[mode]:
        return _composite(mode, x, h, c, w_ih, w_hh, b_ih, b_hh)
    loop = acc = token = None
    if any(t is not None and t.requires_grad for t in (w_ih, w_hh, b_ih, b_hh)):
        # (The mode too: tied GRU cells of both variants must not share an accumulator laid out for one;
        # and which parameters want a gradient: the token's are fixed when it is made.)
        key = (mode, *(id(t) for t in (w_ih, w_hh, b_ih, b_hh)),
               *(t is not None and t.requires_grad for t in (w_ih, w_hh, b_ih, b_hh)))
        loop = _loop_of(states, key)
        if loop is None:
            acc = _Accumulator(mode)
            token = _weight_grads(acc, w_ih, w_hh, b_ih, b_hh)
            acc.node = token.grad_fn
            loop = (acc, token, key)
        acc, token = loop[0], loop[1]
    out = _step(mode, acc, x, h, c, token, w_ih, w_hh, b_ih, b_hh)
    out = out if mode == "lstm" else (out,)
    if loop is not None:
        _carry(loop, out)
    return out


def _composite(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """A step as plain torch ops (torch.nn's own arithmetic, its activations vectorized): above
    _DEFER_MAX_BATCH rows, where the products dominate and one GEMM over all steps saves nothing."""
    if mode == "gru_before":  # (W_hn multiplies r * h)
        two = 2 * h.shape[1]
        x_rz, x_n = F.linear(x, w_ih, b_ih).split([two, two // 2], 1)
        r, z = torch.sigmoid(x_rz + F.linear(h, w_hh[:two], None if b_hh is None else b_hh[:two])).chunk(2, 1)
        n = torch.tanh(x_n + F.linear(r * h, w_hh[two:], None if b_hh is None else b_hh[two:]))
        return (n + z * (h - n),)
    if mode == "gru":
        x_r, x_z, x_n = F.linear(x, w_ih, b_ih).chunk(3, 1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (n + z * (h - n),)
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    if mode == "lstm":
        i, f, g, o = gates.chunk(4, 1)
        # (c zeros multiplied too, as h: skipped, the forget gate's gradient was 0 where torch.nn's is NaN,
        # a NaN input row at B > 64 without hx; found by an auditing helper, stop 52)
        c = x.new_zeros(h.shape) if c is None else c
        c_n = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_n), c_n
    return (torch.tanh(gates) if mode == "rnn_tanh" else torch.relu(gates),)
