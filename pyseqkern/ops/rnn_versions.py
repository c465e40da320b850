"""Optimizer steps that write parameters without bumping their version counters.

Every inference cache of the recurrent ops (packed weights, input panels, folded biases, cell plans,
autocast casts) is keyed by its parameters' version counters, which every in-place op bumps. torch's
fused optimizer kernels (Adam, AdamW, SGD, Adagrad with fused=True) write the parameters in place
without bumping them, so an inference call after such a step was served the weights from before it
(found by a drop-in sweep, stop 16: outputs off by 0.02-1.5). Around every optimizer step (torch's
global step hooks) the versions of the parameters the step will update (those with a gradient) are
noted, and each one the step leaves at its version is bumped afterwards
(torch.autograd.graph.increment_version, torch's API for kernels that write in place outside autograd):
what the step should have done itself. Only while a cache holds an entry; a step that bumps its
parameters (foreach, for-loop) leaves nothing to do.

Writes by torch.distributed collectives (broadcast, all_reduce of parameters) and through `.data`
bypass the counters too, and no hook sees them: README, "Packed recurrent weights".
"""
from __future__ import annotations

import threading

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import param_cache

_noted = threading.local()


def _before_step(optimizer, args, kwargs):
    pending = getattr(_noted, "by_optimizer", None)
    if pending is None:
        pending = _noted.by_optimizer = {}
    pending.pop(id(optimizer), None)  # (a step that raised left its note)
    if not param_cache.holds_entries():
        return
    noted = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if isinstance(p, torch.Tensor) and p.grad is not None:
                try:
                    noted.append((p, p._version))
                except RuntimeError:  # an inference tensor: no version, never cached
                    pass
    pending[id(optimizer)] = noted


def _after_step(optimizer, args, kwargs):
    noted = getattr(_noted, "by_optimizer", {}).pop(id(optimizer), None)
    if noted:
        unbumped = [p for p, version in noted if p._version == version]
        if unbumped:
            try:
                torch.autograd.graph.increment_version(unbumped)  # (one call: 5 us per 100 tensors, not 30)
            except RuntimeError:  # torch 2.4 takes one tensor at a time ("expect a Tensor as input")
                for p in unbumped:
                    torch.autograd.graph.increment_version(p)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)
