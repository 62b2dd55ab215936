"""Local SGD for the workers: the update of ``torch.optim.SGD`` (learning rate, momentum;
no dampening, Nesterov or weight decay), step for step and bit for bit, without torch.optim.

``torch.optim.Optimizer`` wraps its methods in ``torch._disable_dynamo``, whose first call
imports ``torch._dynamo`` and with it sympy: 1.1 s of CPU in every process that trains, paid
at start-up or in round 1, on every rank at once. The update itself is three tensor
operations, the ones ``torch.optim.SGD`` runs on the CPU (its single-tensor path)::

    buf = grad.clone()                      (momentum, first step)
    buf.mul_(momentum).add_(grad)           (momentum, later steps)
    param.add_(buf or grad, alpha=-lr)
"""
from __future__ import annotations

import torch


class SGD:
    """``torch.optim.SGD(params, lr=lr, momentum=momentum)`` for what the workers use of it:
    ``zero_grad(set_to_none=...)`` and ``step()``. The momentum buffers start from zero (a
    new optimizer each round, as the workers make)."""

    def __init__(self, params, lr: float, momentum: float = 0.0):
        if not lr >= 0.0:
            raise ValueError(f"SGD: lr must be >= 0, got {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"SGD: momentum must be >= 0, got {momentum}")
        self.params = list(params)  # (all of them, as torch.optim: one without a gradient is skipped at each step)
        self.lr, self.momentum = float(lr), float(momentum)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:  # (a parameter the loss did not reach: torch.optim skips it too)
                continue
            if self.momentum != 0.0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)
                grad = buf
            p.add_(grad, alpha=-self.lr)
