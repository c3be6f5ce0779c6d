"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    update = sign(beta1 * m + (1 - beta1) * g)
    p     <- p * (1 - lr * weight_decay) - lr * update
    m     <- beta2 * m + (1 - beta2) * g

Every operation is elementwise, so it runs unchanged on ZeRO's flat partitions. The momentum is
stored as `exp_avg`, the key DeepSpeed's ZeRO fragment helpers know for optimizer state.
"""

from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: invalid lr={lr} or betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                update = torch.lerp(p.grad, m, beta1).sign_()  # beta1 * m + (1 - beta1) * g
                p.mul_(1.0 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.lerp_(p.grad, 1.0 - beta2)  # beta2 * m + (1 - beta2) * g
        return loss
