"""Virtual SGD steps that stay differentiable, for meta-learned loss weights (L-MCL).

L-MCL's official code (github.com/winycg/L-MCL, ``losses/meta_optimizers.py``,
``MetaSGD`` lines 26-99, driven by ``main_layer_mcl_cifar_meta.py`` lines 239-255)
takes virtual SGD steps on the networks, evaluates an outer loss at the result and
back-propagates it into the weight network by replaying the steps in reverse
(``meta_backward``), then rolls the networks back. Here the same steps are taken
functionally (``torch.func.functional_call`` on a dict of tensors, with
``create_graph=True``), so autograd differentiates the outer loss through them exactly
and the module's own parameters and buffers are never touched (the rollback is free).

The step is ``torch.optim.SGD``'s without Nesterov, as ``MetaSGD`` inherits it:
d = g + wd * theta; b = d on the first step, else momentum * b + d; theta -= lr * b.
Momentum buffers start empty at every call: ``MetaSGD`` restores its own state with
the networks' (``rollback=True``), so each meta step starts from empty buffers there too.
A parameter the objective does not reach gets a zero gradient, as PyTorch 1.7's
``zero_grad`` (zeros, not None) gave it there: weight decay still moves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]
Objective = Callable[[Params], Tensor]


def sgd_update(
    params: Params,
    grads: Sequence[Tensor | None],
    buffers: Params,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> tuple[Params, Params]:
    """One differentiable SGD step (``torch.optim.SGD``, no dampening, no Nesterov):
    the new parameters and momentum buffers; ``grads`` in ``params`` order, None = 0."""
    stepped, moved = {}, {}
    for (name, theta), grad in zip(params.items(), grads, strict=True):
        direction = weight_decay * theta if grad is None else grad + weight_decay * theta
        if momentum and name in buffers:
            direction = momentum * buffers[name] + direction
        moved[name] = direction
        stepped[name] = theta - lr * direction
    return stepped, moved


def unroll(
    start: Params,
    objectives: Sequence[Objective],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> Params:
    """The parameters after one virtual SGD step on each of ``objectives`` in turn,
    from ``start`` (detached, so only what the objectives close over carries
    gradient: the hypergradient flows into their own learnable inputs)."""
    params = {name: value.detach().requires_grad_() for name, value in start.items()}
    buffers: Params = {}
    for objective in objectives:
        loss = objective(params)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        params, buffers = sgd_update(params, grads, buffers, lr, momentum, weight_decay)
    return params


class Functional:
    """A module evaluated at given parameters with private copies of its buffers, so
    BatchNorm's running statistics of the real module stay as they are (the official
    rollback restores them)."""

    def __init__(self, module: nn.Module, frozen_prefixes: tuple[str, ...] = ()) -> None:
        self.module = module
        self.buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        self.start = {
            name: p for name, p in module.named_parameters() if not name.startswith(frozen_prefixes) and p.requires_grad
        }

    def __call__(self, params: Params, *args, **kwargs):
        return functional_call(self.module, {**params, **self.buffers}, args, kwargs, strict=False)
