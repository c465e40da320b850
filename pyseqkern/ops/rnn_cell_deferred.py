"""Recorded float32/float64 cell steps as torch's GEMMs and activations, with the weight gradients of a
whole loop of steps formed once, in the backward of the last node to run.

A cell stepped in a training loop (teacher forcing, attention decoders) records one step per call. On
the CPU at small batches its cost is not arithmetic but the weight gradients: torch.nn's backward of
each step writes dW_ih and dW_hh afresh (two outer products of 1 MB at H=256) and adds each into .grad
(AccumulateGrad), a few MB of memory traffic per step for a few KB of gate gradients. The kernel route
(_CellStep) pays the same, plus a check of the packed weights against W_hh and ~60 Python calls a step:
0.72-0.85x torch.nn at B=1.

Here the gates' products run in one autograd node per step (_Gates: x W_ih^T + b_ih and h W_hh^T +
b_hh, as torch.nn computes them), and the activations are torch's own ops. A step's backward forms the
gradients of x and h only and leaves its gate gradients, with its x and h, in the loop's accumulator;
every step of the loop also takes as input one empty tensor made by _WeightGrads from the parameters
(the token), so autograd runs _WeightGrads.backward once, after every step of the backward pass, and
that forms dW = dG^T [x ; h] and db = dG^T 1 for all steps in one GEMM each: one AccumulateGrad per
parameter per backward pass. A step's outputs carry its token to the step that takes them (or a view
of their memory) as states (_LOOPS), until the token's backward has run; a state that carries none
(h0, or a state the caller computed from the outputs) starts a new loop. The accumulator keys what it holds by autograd's graph
task, so two backward passes over a shared token (retain_graph, autograd.grad of another output) each
get their own steps' gradients. Where the engine will not run the token (autograd.grad asked only for
inputs), nothing is left there.

create_graph=True (a gradient that will be differentiated): each step's backward returns its own weight
gradients from differentiable ops instead, nothing deferred. Not deferred either above
_DEFER_MAX_BATCH rows, where the products dominate and one GEMM over all steps saves nothing: the step
runs as plain torch ops (F.linear), which is torch.nn's own arithmetic. GRU with reset_after=False keeps
the kernel route (the product of W_hn with r * h needs r first).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# Up to this many rows a recorded step defers its weight gradients (in-process against torch.nn, H=256,
# T=50, fwd+bwd per step: see docs/DESIGN.md "Recorded cell steps, deferred weight gradients").
_DEFER_MAX_BATCH = 8
_NO_GRAD = torch.empty(0)  # (the token's gradient: a step has none to give it)
_graph_task_id = torch._C._current_graph_task_id
_will_run = torch._C._will_engine_execute_node


class _Accumulator:
    """A loop's deferred gate gradients: per graph task, lists of dG_x (and dG_h where the gates come
    apart, GRU), x and h rows. `node` is the token's backward node; `spent` once it has run."""

    __slots__ = ("pair", "node", "spent", "by_task", "__weakref__")

    def __init__(self, pair):
        self.pair, self.node, self.spent, self.by_task = pair, None, False, {}

    def leave(self, dgi, dgh, x, h):
        lists = self.by_task.get(_graph_task_id())
        if lists is None:
            lists = self.by_task[_graph_task_id()] = ([], [], [], [])
        lists[0].append(dgi)
        if self.pair:
            lists[1].append(dgh)
        lists[2].append(x)
        lists[3].append(h)


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
        dw_ih = dgi.t().mm(_rows(lists[2])) if need[1] else None
        dw_hh = dgh.t().mm(_rows(lists[3])) if need[2] else None
        return None, dw_ih, dw_hh, dgi.sum(0) if need[3] else None, dgh.sum(0) if need[4] else None


class _Gates(torch.autograd.Function):
    """(x W_ih^T + b_ih, h W_hh^T + b_hh) of one step (pair: GRU), or their sum (LSTM, RNN). With acc, the
    weight gradients are deferred to the token's backward (module docstring)."""

    @staticmethod
    def forward(ctx, acc, pair, x, h, token, w_ih, w_hh, b_ih, b_hh):
        gi = torch.addmm(b_ih, x, w_ih.t()) if b_ih is not None else x.mm(w_ih.t())
        ctx.save_for_backward(x, h, w_ih, w_hh)
        ctx.acc, ctx.pair = acc, pair
        if pair:
            return gi, (torch.addmm(b_hh, h, w_hh.t()) if b_hh is not None else h.mm(w_hh.t()))
        return gi.addmm_(h, w_hh.t()).add_(b_hh) if b_hh is not None else gi.addmm_(h, w_hh.t())

    @staticmethod
    def backward(ctx, dgi, dgh=None):
        x, h, w_ih, w_hh = ctx.saved_tensors
        if not ctx.pair:
            dgh = dgi
        need = ctx.needs_input_grad
        dx = dgi.mm(w_ih) if need[2] else None
        dh = dgh.mm(w_hh) if need[3] else None
        acc = ctx.acc
        if acc is not None and not torch.is_grad_enabled():
            if _will_run(acc.node):
                acc.leave(dgi, dgh, x, h)
            return None, None, dx, dh, _NO_GRAD, None, None, None, None
        # create_graph=True (or no parameter needs a gradient): each step's own, from differentiable ops
        return (None, None, dx, dh, None, dgi.t().mm(x) if need[5] else None, dgh.t().mm(h) if need[6] else None,
                dgi.sum(0) if need[7] else None, dgh.sum(0) if need[8] else None)


# step() runs only outside torch.func and compilation (rnn_cell_train.step's checks): torch's C apply
# directly, as _CellStep does.
def _c_apply(fn):
    from .rnn_autograd import _unwrap_dead
    return fn.apply if _unwrap_dead is None else super(torch.autograd.Function, fn).apply


_gates = _c_apply(_Gates)
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


def _carry(loop, outputs):
    for t in outputs:
        k = t.data_ptr()

        def drop(ref, k=k):  # (only its own entry: the address may carry a newer output's by then)
            if _LOOPS.get(k, (None,) * 4)[3] is ref:
                del _LOOPS[k]

        _LOOPS[k] = (*loop[:3], weakref.ref(t, drop))


def step(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """(h_n,) or (h_n, c_n) of one recorded step of an LSTM, GRU (reset_after) or RNN cell, x [B, I], h and
    c [B, H] or None (zeros). The caller has checked shapes, dtypes (float32 / float64) and devices."""
    states = (h, c)
    if h is None:  # (zeros, multiplied too, so that W_hh gets the zero gradient torch.nn gives it)
        h = x.new_zeros(x.shape[0], w_hh.shape[1])
    pair = mode == "gru"
    loop = None
    if x.shape[0] <= _DEFER_MAX_BATCH:
        acc = token = None
        if any(t is not None and t.requires_grad for t in (w_ih, w_hh, b_ih, b_hh)):
            key = (id(w_ih), id(w_hh), id(b_ih), id(b_hh))
            loop = _loop_of(states, key)
            if loop is None:
                acc = _Accumulator(pair)
                token = _weight_grads(acc, w_ih, w_hh, b_ih, b_hh)
                acc.node = token.grad_fn
                loop = (acc, token, key)
            acc, token = loop[0], loop[1]
        gates = _gates(acc, pair, x, h, token, w_ih, w_hh, b_ih, b_hh)
    elif pair:
        gates = F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh)
    else:
        gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    if mode == "lstm":
        i, f, g, o = gates.chunk(4, 1)
        c_n = torch.sigmoid(i) * torch.tanh(g)
        if c is not None:
            c_n = torch.sigmoid(f) * c + c_n
        out = torch.sigmoid(o) * torch.tanh(c_n), c_n
    elif pair:
        x_r, x_z, x_n = gates[0].chunk(3, 1)
        h_r, h_z, h_n = gates[1].chunk(3, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        out = (n + z * (h - n),)
    else:
        out = (torch.tanh(gates) if mode == "rnn_tanh" else torch.relu(gates),)
    if loop is not None:
        _carry(loop, out)
    return out
