"""The thin inference routes: from a module's call straight to a kernel entry bound to its parameters.

A cell step at B=1, H=256 is a few microseconds of kernel, and the general route (rnn_cell / rnn_layer:
argument checks, _Seq, caches, scratch, capsules) was several times that. So what depends only on the
parameters (their checked shapes and dtypes, packed weights, input panel, folded biases, and the compiled
entry `_C.RnnCellStep` bound to them) is one plan per weights (_CellPlan), found with one lookup a call,
and each route checks only the call's own tensors inline:
  cell_fast   one cell step (nn/_cell.py, rnn_cell); recorded steps go to rnn_cell_train.step
  step_fast   one time step of stacked one-direction layers (nn/_sequence.py's decode step)
  seq_fast    a plain inference sequence through stacked layers, one direction or two, padded or packed
Each returns None where anything differs from what the plans were checked for (then the general route
runs, which checks and says what is wrong), and runs the same kernel, path and bits as that route.
Plans are cached like the packed weights (ops/param_cache.py) and made only after the general route's
checks passed for their parameters (make_cell_plan, make_seq_plans). Also here: the general route's
planned step when the compiled entry does not take the call (cell_inference) and the CUDA cell step's
thin route (_cuda_cell). See docs/DESIGN.md, "Cells" and "Recorded one-step calls".
"""
from __future__ import annotations

import torch

from .. import _backend
from .._handoff import capsule, num_threads
from . import rnn_autocast as _autocast
from . import rnn_gemms as _gemms
from . import rnn_paths as _paths
from .param_cache import LOCK, NO_VERSION, anchored, put, sharded
# (what makes a plan's cached tensors and the bound on _SEQ_PATHS through the module, so that a test's patch
# of them where they live is seen here too: DESIGN, "Ops")
from . import rnn as _rnn
from .rnn import (_acc_dtype, _DIRECT_DTYPES, _none, _own_x_gates_numel, _plain_eager_cuda, _prepare,
                  _projecting_buffers, _sizes, _unobserved)
from .rnn_seq import _listable, _listed_seq, _Seq
from .rnn_modes import GATES, MODES
from .rnn_scratch import _cell_workspace, normal

_STRIDED = torch.strided

_C = _backend._C

# Cells up to this batch project their input inside the kernel: at B=1, H=256 torch's GEMV of x W_ih^T
# took 18.6 us of a 55 us LSTMCell call (W_ih, 1 MB, streamed by one thread), where each kernel
# thread projects its own gate columns from a panel that stays in its cache between calls. The same
# held up to 64 rows (in-process against torch's GEMM, H=512: LSTMCell B=16 / 32 / 64 2.22 / 1.75 /
# 1.08x torch.nn against 1.26 / 1.33 / 1.00x, RNNCell 2.56 / 1.75 / 1.23x against 0.90 / 0.99 / 0.88x);
# at 256 rows both paths come out equal (0.94 / 0.97x).
_INPUT_PANEL_MAX_BATCH = 64


# The thin cell path's per-weights plan: what depends only on the parameters (their checked shapes and
# dtypes, packed weights, input panel, folded biases, and the kernel entry bound to them), found with
# one lookup per call instead of one per cache and a re-check of every weight (together 10 of an RNNCell
# call's 27 us at B=1, H=256). Keyed like the caches it draws on (storage and version counter of each
# parameter, ISA level).
_CELL_PLANS: dict = anchored({})
# Per weight_hh, the plan of the modules the newest one replaced, where they were other modules (another
# weight_ih or bias, mode or reset_after: `_cell_owner`), not the same ones at other versions: two cells or
# layers tied on weight_hh alone, called in turn, re-planned every call (196 us a pair of GRUCell calls at
# B=1, H=256 against 48 untied; two GRU layers (20,1,256) 672 against 277-293). Bounded: one such entry per
# weight_hh, each pinning its tensors (param_cache.pinned) until replaced, its anchor dies, or empty_cache().
_CELL_PLANS_OTHER: dict = anchored({})


class _CellPlan:
    """`step`: the compiled entry with the parameters bound (_C.RnnCellStep), where the kernel projects
    the input itself (an input panel exists for this dtype, size and level); it takes data pointers of
    the call's own tensors, which the caller has checked."""

    __slots__ = ("dtype", "input", "hidden", "code", "panel", "packed", "bias", "b_hn", "step")

    def __init__(self, mode, reset_after, w_ih, w_hh, b_ih, b_hh):
        self.code, self.hidden = MODES[mode], w_hh.shape[0] // GATES[mode]
        self.dtype, self.input = w_hh.dtype, w_ih.shape[1]
        bias, self.b_hn = _rnn._folded_bias(mode, reset_after, self.hidden, b_ih, b_hh)
        self.bias = None if bias is None else bias.contiguous()
        self.panel = _rnn._input_panel(self.code, reset_after, self.hidden, w_ih)
        self.packed = _rnn._packed(self.code, reset_after, self.hidden, 0, w_hh, None, False)
        self.step = None
        if self.panel is not None:
            self.step = _C.RnnCellStep(self.code, reset_after, self.hidden, self.input, str(self.dtype)[6:],
                                       capsule(self.packed), capsule(self.panel), _none(self.bias),
                                       _none(self.b_hn))


def _cell_key(mode, reset_after, w_ih, w_hh, b_ih, b_hh):
    # ids too: a parameter replaced by a new tensor at the freed one's address (and version) is another
    # tensor (w_hh's own id is the dict key, and its entry goes when it dies)
    # (raises NO_VERSION for inference tensors). Contiguity where _packed's key holds strides: shapes are
    # checked, so that tells `p.data = p.data.t()` apart at half the cost of stride() on every step.
    # Shapes too: a parameter re-pointed at a view of its own start (`p.data = p.data[:12]`) keeps its
    # address and version, and the old plan ran with the old sizes (a fuzzer, stop 32).
    # The first _OWNER_FIELDS name the modules rather than their state (_cell_owner).
    return (mode, reset_after, id(w_ih), None if b_ih is None else id(b_ih), None if b_hh is None else id(b_hh),
            w_ih.data_ptr(), w_ih._version, w_ih.is_contiguous(), w_ih.shape,
            w_hh.data_ptr(), w_hh._version, w_hh.is_contiguous(), w_hh.shape,
            None if b_ih is None else (b_ih.data_ptr(), b_ih._version),
            None if b_hh is None else (b_hh.data_ptr(), b_hh._version), _backend._ISA.name)


_OWNER_FIELDS = 5


def _cell_owner(key):
    """Mode, reset_after and the ids of w_ih and the biases: the modules a _cell_key names (w_hh's own
    id anchors the entry)."""
    return key[:_OWNER_FIELDS]


def cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh):
    """The _CellPlan for these parameters if cached and current, else None."""
    entry = _CELL_PLANS.get(id(w_hh))
    if entry is None or sharded():
        return None
    try:
        key = _cell_key(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
    except NO_VERSION:
        return None
    if entry[0] != key:
        entry = _CELL_PLANS_OTHER.get(id(w_hh))
        if entry is None or entry[0] != key:
            return None
    # One pinned address checked, not four (param_cache.hit's loop was 0.6 us of a 14 us RNNCell step): w_hh's,
    # pinned first. Module.share_memory() moves every parameter, w_hh with them.
    # The key holds every parameter's address, so the sample reads live memory (param_cache.fingerprint).
    pin, address = entry[2][0]
    return entry[1] if pin.data_ptr() == address and (entry[3] is None or entry[3].matches()) else None


def make_cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh):
    """Called after the full argument checks passed for these parameters."""
    try:
        key = _cell_key(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
    except NO_VERSION:
        key = None
    if key is not None:
        with LOCK:  # (as param_cache.put's store: a concurrent _drop of this anchor cannot interleave)
            newest = _CELL_PLANS.get(id(w_hh))
            if newest is not None and _cell_owner(newest[0]) != _cell_owner(key):
                _CELL_PLANS_OTHER[id(w_hh)] = newest
    plan = lambda: normal(lambda: _CellPlan(mode, reset_after, w_ih, w_hh, b_ih, b_hh))  # noqa: E731
    return put(_CELL_PLANS, w_hh, key, plan, w_hh, w_ih, b_ih, b_hh)  # (w_hh first: cell_plan checks it)


def plan_takes(plan, t, rows, cols):
    """t is a plain CPU tensor [rows, cols] of the plan's dtype (RnnCellStep reads it made contiguous)."""
    return (type(t) is torch.Tensor and t.dtype == plan.dtype and t.is_cpu and t.dim() == 2 and t.shape[0] == rows
            and t.shape[1] == cols)


def cell_fast(mode, reset_after, x, states, w_ih, w_hh, b_ih, b_hh, spread=False):
    """One cell step straight to the planned kernel entry, or None when anything differs from what the
    plan was checked for (then the caller takes the full path, which checks and explains). states: None
    (zeros) or (h,) / (h, c). Returns (h_n,) or (h_n, c_n). At B=1, H=256 every microsecond of Python
    here is a visible share of the step, so this is the only code between the module and the kernel,
    and it checks each tensor inline (as plan_takes would; 1.4-1.8 us less per call than calling it).
    A step that autograd records goes to ops/rnn_cell_train.py's route instead (None where it declines)."""
    if _autocast.any_enabled():  # (rnn_cell casts, then comes back here with autocast off)
        return None
    if torch.is_grad_enabled() and (w_hh.requires_grad or w_ih.requires_grad or getattr(x, "requires_grad", False)
                                    or any(getattr(t, "requires_grad", False) for t in (b_ih, b_hh, *(states or ())))):
        if type(reset_after) is not bool:  # (the full path says what it must be)
            return None
        return _cell_train.step(mode, reset_after, x, states, w_ih, w_hh, b_ih, b_hh)  # (training: its own route)
    plan = cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
    if plan is None or plan.step is None or type(x) is not torch.Tensor:
        return _cuda_cell(mode, reset_after, x, states, w_ih, w_hh, b_ih, b_hh) if _plain_eager_cuda(x) else None
    dtype, shape = plan.dtype, x.shape
    if len(shape) != 2:
        return None
    B = shape[0]
    if not (0 < B <= _INPUT_PANEL_MAX_BATCH and shape[1] == plan.input and x.dtype is dtype and x.is_cpu):
        return None
    h = c = 0
    hs = (B, plan.hidden)
    if states is not None:  # (a contiguous copy stays referenced until the call)
        if len(states) != (2 if plan.code == 0 else 1):
            return None
        h_t, c_t = states[0], states[-1]  # (c_t is h_t but for lstm)
        if not (type(h_t) is torch.Tensor and h_t.shape == hs and h_t.dtype is dtype and h_t.is_cpu
                and h_t.layout is _STRIDED and (c_t is h_t or type(c_t) is torch.Tensor and c_t.shape == hs
                                                and c_t.dtype is dtype and c_t.is_cpu and c_t.layout is _STRIDED)):
            return None
        h_t = h_t if h_t.is_contiguous() else h_t.contiguous()
        h = h_t.data_ptr()
        if plan.code == 0:
            c_t = c_t if c_t.is_contiguous() else c_t.contiguous()
            c = c_t.data_ptr()
    if _backend._REFERENCE_FORCED or not _unobserved():  # (_plain_eager's own type and device checks: above)
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    # The outputs by torch's cheapest allocation here: sizes as ints and a dtype keyword only where it is
    # not the default (a shape tuple and the keyword cost 0.6-0.9 us more per tensor), c_n like h_n.
    # In-process, 21 pairs at B=1, H=256, time per module call: LSTMCell 0.91x, GRUCell 0.96x, RNNCell 0.93x.
    if dtype is torch.get_default_dtype():
        h_n = torch.empty(B, plan.hidden)
    else:
        h_n = torch.empty(B, plan.hidden, dtype=dtype)
    if plan.code != 0:
        plan.step.run(B, x.data_ptr(), h, 0, h_n.data_ptr(), 0, num_threads(), spread)
        return (h_n,)
    c_n = torch.empty_like(h_n)
    plan.step.run(B, x.data_ptr(), h, c, h_n.data_ptr(), c_n.data_ptr(), num_threads(), spread)
    return h_n, c_n


def step_fast(mode, reset_after, x, h0, c0, params, out_shape, state_shape, spread):
    """One time step of stacked one-direction layers through their planned cell entries by data pointers
    (nn/_sequence.py's decode step), or None where anything differs from what the plans were checked for,
    or where autograd would record (then the layer-by-layer path runs, with its checks and errors).
    x: the step's B rows of I values, contiguous (a one-step sequence, batch_first or not, or unbatched);
    h0, c0: None (zeros) or contiguous `state_shape` ([L, B, H], unbatched [L, H]), c0 exactly for lstm;
    params: each layer's (w_ih, w_hh, b_ih, b_hh). Returns (y of `out_shape`, h_n, c_n or None). No view of
    the caller's tensors and no copy: the kernel reads x and each layer's states where they are, and
    writes each layer's h_n and c_n into their slots of the results (the next layer's input is its
    predecessor's slot) and the last layer's output into y as well. Layer by layer through cell_fast,
    a decoding step's select, state slices, unsqueezes and the output's copy were half its Python (GRU
    T=1, B=1, H=256: 13.7 of 27.2 us a module call)."""
    lstm = mode == "lstm"
    grad = torch.is_grad_enabled()
    states = () if h0 is None else (h0, c0) if lstm else (h0,)
    # (a recorded step's states and input first: a training loop's steps return here at once)
    if type(x) is not torch.Tensor or (c0 is not None) != (lstm and h0 is not None) or grad and (
            x.requires_grad or any(type(t) is torch.Tensor and t.requires_grad for t in states)):
        return None
    if _autocast.any_enabled() or _backend._REFERENCE_FORCED or not x.is_cpu or not _unobserved():
        return None
    dtype, size, hidden = x.dtype, x.shape[-1], state_shape[-1]
    for t in states:
        if not (type(t) is torch.Tensor and t.shape == state_shape and t.dtype is dtype and t.is_cpu
                and t.is_contiguous()):
            return None
    B = 1 if len(state_shape) == 2 else state_shape[1]
    if not 0 < B <= _INPUT_PANEL_MAX_BATCH:
        return None
    plans = []
    for w_ih, w_hh, b_ih, b_hh in params:
        if grad and (w_ih.requires_grad or w_hh.requires_grad or b_ih is not None and b_ih.requires_grad
                     or b_hh is not None and b_hh.requires_grad):
            return None
        plan = cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
        if plan is None or plan.step is None or plan.dtype is not dtype or plan.input != size or plan.hidden != hidden:
            return None
        plans.append(plan)
        size = hidden
    # (sizes as ints, the dtype keyword only where it is not the default: 0.7 us less a tensor; cell_fast)
    if dtype is torch.get_default_dtype():
        y, h_n, c_n = torch.empty(*out_shape), torch.empty(*state_shape), torch.empty(*state_shape) if lstm else None
    else:
        y, h_n = torch.empty(*out_shape, dtype=dtype), torch.empty(*state_shape, dtype=dtype)
        c_n = torch.empty(*state_shape, dtype=dtype) if lstm else None
    slot = B * hidden * x.element_size()  # (one layer's [B, H] in the states and results)
    xp, hn = x.data_ptr(), h_n.data_ptr()
    h = h0.data_ptr() if h0 is not None else 0
    c = c0.data_ptr() if c0 is not None else 0
    cn = c_n.data_ptr() if lstm else 0
    threads, last = num_threads(), len(plans) - 1
    for layer, plan in enumerate(plans):
        at = layer * slot
        plan.step.run(B, xp, h and h + at, c and c + at, hn + at, cn and cn + at, threads, spread,
                      y.data_ptr() if layer == last else 0)
        xp = hn + at
    return y, h_n, c_n


# The projecting path of plain inference sequences by shape (seq_fast): rnn_paths._projection_path's answer for
# (mode, reset_after, hidden, input, dtype, steps, batch, level), None where the level has no input panel for
# the dtype and input size (the full path then lets torch project, as _forward_projecting does: bfloat16 at
# an odd input size on avx512bf16, whose pair sections want an even one); bounded as _SIZES is.
_SEQ_PATHS: dict = {}
# seq_fast's answer where the sequence would take its path but a layer has no plan yet: the caller runs
# the full path, which checks every argument, and then makes the plans (make_seq_plans).
NO_PLAN = object()


def _seq_path(mode, reset_after, hidden, size, dtype, steps, batch, rows):
    key = (mode, reset_after, hidden, size, dtype, steps, batch, rows, _backend._ISA.name)
    path = _SEQ_PATHS.get(key, _SEQ_PATHS)
    if path is _SEQ_PATHS:
        # (meta tensors of the sequence's shape and rows: the path reads shapes and the dtype only)
        xm = torch.empty((steps, batch, size), dtype=dtype, device="meta")
        path = _paths._projection_path(mode, _sizes(MODES[mode], reset_after, hidden, 0, batch, dtype),
                                       _Seq(xm, None, False), torch.empty((rows, size), dtype=dtype, device="meta"),
                                       dtype, hidden, 0, GATES[mode] * hidden * hidden)
        if len(_SEQ_PATHS) >= _rnn._SIZES_MAX:
            _SEQ_PATHS.clear()
        _SEQ_PATHS[key] = path
    return path


def seq_fast(mode, reset_after, x, h0, c0, params, hidden, batch_first, batch_sizes=None, directions=1):
    """A plain inference sequence through stacked layers of `hidden` units (no projection), one direction or
    two (`directions`: each layer's outputs side by side in one row, as the full path's cat lays them)
    straight to their planned kernel entries by data pointers (_C.RnnCellStep.run_seq), where each
    layer takes the path on which the kernel projects its input (rnn_paths._projection_path; the same kernel, path
    and bits as rnn_layer's); else None (then the full path runs), or NO_PLAN where only a layer's plan
    is missing. x: [T, B, I] ([B, T, I] with batch_first: rows read in place, batch-major, as the layers
    in between write theirs; the last layer writes time-major, as torch.nn lays out a batch_first output,
    and y is its transposed view), unbatched [T, I], or a packed batch's data [N, I] with its `batch_sizes` (the
    forms _listed_seq lists), contiguous; h0, c0: None (zeros) or contiguous [L, B, H]
    ([L, H] unbatched; L = layers x directions), c0 exactly for lstm; params: (w_ih, w_hh, b_ih, b_hh) of
    each layer and direction, in h_n's order (layer * directions + direction). Returns (y,
    h_n, c_n or None). The full path's checks, _Seq, caches, scratch and capsules took 60-90 us of a
    module call (RNN (100,1,256): 64 of 282 us)."""
    lstm = mode == "lstm"
    states = () if h0 is None else (h0, c0) if lstm else (h0,)
    if type(x) is not torch.Tensor or (c0 is not None) != (lstm and h0 is not None):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(type(t) is torch.Tensor and t.requires_grad for t in states)
                                    or any(t is not None and t.requires_grad for p in params for t in p)):
        return None
    if _autocast.any_enabled() or _backend._REFERENCE_FORCED or not x.is_cpu or not _unobserved():
        return None
    forms = None
    if batch_sizes is not None:
        forms = _listed_seq(batch_sizes, x.shape[0]) if _listable(batch_sizes) and x.dim() == 2 else None
        if forms is None:  # (malformed, or not summing to x's rows)
            return None
        T, B, rows = forms[0].shape[0], forms[2].shape[0], forms[3]
    elif x.dim() == 3:
        B, T = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
        rows = T * B
    else:
        B, T = 1, x.shape[0]
        rows = T
    dtype, L, D = x.dtype, len(params), directions
    if T < (1 if forms else 2) or B < 1 or dtype not in _DIRECT_DTYPES or not x.is_contiguous():
        return None
    state_shape = (L, B, hidden) if x.dim() == 3 or forms else (L, hidden)
    for t in states:
        if not (type(t) is torch.Tensor and t.shape == state_shape and t.dtype is dtype and t.is_cpu
                and t.is_contiguous()):
            return None
    plans, paths = [], []
    for idx, (w_ih, w_hh, b_ih, b_hh) in enumerate(params):
        size = x.shape[-1] if idx < D else D * hidden
        if w_ih.dim() != 2 or w_ih.shape[1] != size:  # (the full path explains)
            return None
        plan = cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
        if plan is not None and (plan.step is None or plan.dtype is not dtype or plan.input != size
                                 or plan.hidden != hidden):
            return None
        if plan is None:
            try:  # (parameters without a version counter, made under inference_mode, are never planned)
                _cell_key(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
            except NO_VERSION:
                return None
        path = _seq_path(mode, reset_after, hidden, size, dtype, T, B, rows)
        if path is None:
            return None
        plans.append(plan)
        paths.append(path)
    if None in plans:
        return NO_PLAN
    out_shape = x.shape[:-1] + (D * hidden,)
    if dtype is torch.get_default_dtype():
        h_n, c_n = torch.empty(*state_shape), torch.empty(*state_shape) if lstm else None
    else:
        h_n, c_n = torch.empty(*state_shape, dtype=dtype), torch.empty(*state_shape, dtype=dtype) if lstm else None
    t_stride, b_stride = (1, T) if batch_first else (B, 1)
    slot = B * hidden * x.element_size()  # (one layer's [B, H] in the states and results)
    hn = h_n.data_ptr()
    h = h0.data_ptr() if h0 is not None else 0
    c = c0.data_ptr() if c0 is not None else 0
    cn = c_n.data_ptr() if lstm else 0
    threads, code = num_threads(), MODES[mode]
    sizes = _sizes(code, reset_after, hidden, 0, B, dtype)
    seq_ptrs = (forms[0].data_ptr(), forms[1].data_ptr(), forms[2].data_ptr(), rows) if forms else (0, 0, 0, 0)
    y = x
    time_major_out = batch_first and x.dim() == 3
    for idx, (plan, (each_step, ring)) in enumerate(zip(plans, paths)):
        direction = idx % D
        last = time_major_out and idx >= L - D
        if direction == 0:  # (the layer's input, the last one's output, stays referenced through its calls)
            layer_input = y
            y = torch.empty((T, B, D * hidden) if last else out_shape, dtype=dtype)
        # (a layer's buffers live only inside its call, as _run_forward's)
        ws, buf = _projecting_buffers(sizes, code, B, hidden, dtype, rows, each_step, ring)
        at = idx * slot
        plan.step.run_seq(T, B, t_stride, b_stride, layer_input.data_ptr(), h and h + at, c and c + at,
                          y.data_ptr() + direction * hidden * x.element_size(), hn + at, cn and cn + at,
                          ws.data_ptr(), ws.numel(), 0 if buf is None else buf.data_ptr(),
                          0 if buf is None else buf.shape[0], threads, *seq_ptrs, direction == 1, D * hidden, last,
                          ring)
    return (y.transpose_(0, 1) if time_major_out else y), h_n, c_n  # (in place: no view, as torch.nn's GRU)


def make_seq_plans(mode, reset_after, params):
    """The plans seq_fast wanted (NO_PLAN), made after the full path's checks passed for `params`."""
    for w_ih, w_hh, b_ih, b_hh in params:
        if cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh) is None:
            make_cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh)


def cell_step_args(mode, x, states, w_ih, w_hh, b_ih, b_hh, here):
    """(B, H, h, c) of one cell step on x [B, I] whose weights, biases and states (None, (h,) or (h, c))
    have x's dtype, the step's shapes and here(t) true (the device), h and c made contiguous (None where
    not given); None where anything differs, so that the general route checks and explains. The thin
    routes' shared checks (_cuda_cell; rnn_cell_train.step with here = is_cpu)."""
    dtype, (B, I) = x.dtype, x.shape
    G = GATES[mode]
    # (no units: rnn_cell runs the equations, the kernels want hidden >= 1)
    if B == 0 or w_ih.dim() != 2 or w_hh.dim() != 2 or w_ih.shape[1] != I or w_ih.shape[0] != w_hh.shape[0] or \
            w_hh.shape[0] % G or w_hh.shape[0] == 0:
        return None
    H = w_hh.shape[0] // G
    if w_hh.shape[1] != H or any(w.dtype != dtype or not here(w) for w in (w_ih, w_hh)) or any(
            b is not None and (b.dtype != dtype or not here(b) or b.shape != (G * H,)) for b in (b_ih, b_hh)):
        return None
    h = c = None
    if states is not None:
        if len(states) != (2 if mode == "lstm" else 1):
            return None
        for t in states:
            if (type(t) is not torch.Tensor or t.shape != (B, H) or t.dtype != dtype or not here(t)
                    or t.layout is not _STRIDED):
                return None
        h = states[0].contiguous()
        c = states[1].contiguous() if mode == "lstm" else None
    return B, H, h, c


_CUDA_CELL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _cuda_cell(mode, reset_after, x, states, w_ih, w_hh, b_ih, b_hh):
    """One CUDA inference step with only what it needs around the kernel: the general route's calls
    (_prepare, then the CUDA impl, as rnn_layer's CUDA inference route makes them) after inline checks
    of this call's tensors, or None where anything differs (the general route then checks and explains).
    The module, rnn_cell and rnn_layer layers of checks were ~40 of ~65 us of host time a step, which
    is the step's whole time on a GPU at small sizes (CPU stand-in, LSTMCell H=8). Returns (h_n,) or
    (h_n, c_n)."""
    dtype, dev = x.dtype, x.device
    if x.dim() != 2 or dtype not in _CUDA_CELL_DTYPES or mode not in GATES or _backend.use_reference("rnn_layer", dev):
        return None  # (a build without CUDA kernels: the general route runs the reference, and says so)
    if any(type(t) not in _PLAIN_TYPES for t in (w_ih, w_hh, b_ih, b_hh) if t is not None):
        return None  # (a tensor subclass goes the general route, where its __torch_function__ sees the ops)
    args = cell_step_args(mode, x, states, w_ih, w_hh, b_ih, b_hh, lambda t: t.device == dev)
    if args is None:
        return None
    B, _, h, c = args
    code, hidden, _, x_gates, b_hn, packed, x_bias = _prepare(mode, reset_after, x, w_ih, w_hh, b_ih, b_hh, None,
                                                              False)
    _, h_n, c_n, _ = rnn_cuda._forward_cuda(code, reset_after, hidden, 0, 1, B, x_gates, b_hn, h, c, packed, None,
                                            None, None, B, 1, False, False, x_bias)
    return (h_n, c_n) if code == 0 else (h_n,)


def cell_inference(mode, x, h, c, w_ih, w_hh, b_ih, b_hh, reset_after, plan=None):
    """One inference step on plain CPU tensors, arguments already checked: the thin path (a cell at B=1
    is a few microseconds of kernel, so every allocation and Python call here shows). For one step the
    output row of each sequence is its final state, so y and h_n share one buffer (rnn.h allows it).
    Small batches project the input inside the kernel (_INPUT_PANEL_MAX_BATCH)."""
    batch, dtype = x.shape[0], x.dtype
    if plan is None:
        plan = make_cell_plan(mode, reset_after, w_ih, w_hh, b_ih, b_hh)
    hidden, code, panel, packed, bias, b_hn = plan.hidden, plan.code, plan.panel, plan.packed, plan.bias, plan.b_hn
    if batch == 0:  # (torch.nn gives empty states; the kernel's arguments want rows)
        return x.new_empty(0, hidden), (x.new_empty(0, hidden) if code == 0 else None)
    if batch > _INPUT_PANEL_MAX_BATCH:
        panel = None
    sizes = _sizes(code, reset_after, hidden, 0, batch, dtype)
    if panel is None:  # (the bias as the autograd path adds it, for the same bits)
        x_gates, x_bias = _gemms._input_projection(x, w_ih, bias)
        extra = 0
    else:
        x_gates, x_bias = bias, None
        extra = _own_x_gates_numel(sizes, code, batch, hidden)
    ws_numel = sizes[2] + extra
    h_n = torch.empty(batch, hidden, dtype=dtype)
    c_n = torch.empty(batch, hidden, dtype=dtype) if code == 0 else None
    workspace = _cell_workspace(ws_numel, _acc_dtype(dtype))
    hn_c = capsule(h_n)
    _C.rnn_forward(code, reset_after, hidden, 0, 1, batch, None, None, None, batch, 1, False, _none(x_gates),
                   _none(b_hn), _none(h), _none(c), hn_c, hidden, hn_c, _none(c_n), capsule(packed), None,
                   capsule(workspace), num_threads(), x=None if panel is None else capsule(x),
                   packed_in=None if panel is None else capsule(panel), x_bias=_none(x_bias))
    return h_n, c_n


from . import rnn_cuda  # noqa: E402
from . import rnn_cell_train as _cell_train  # noqa: E402  (recorded cell steps: cell_fast sends them there)
