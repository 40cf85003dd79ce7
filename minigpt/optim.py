"""Muon (Jordan et al., 2024) for the hidden weight matrices, with AdamW for every other parameter, as one optimizer.

Muon keeps an SGD momentum per weight matrix and replaces each update by its nearest semi-orthogonal matrix
(all singular values near 1), computed with a few Newton-Schulz iterations. Described in K. Jordan, "Muon: An
optimizer for hidden layers in neural networks" (2024, kellerjordan.github.io/posts/muon), where it set the
nanoGPT speedrun records; its authors use AdamW for embeddings, the output head, norms and biases, as here.

Why not `torch.optim.Muon` (torch 2.9+): it runs the iteration in bfloat16, which CPUs without bf16 units (any
AVX2-only x86) emulate at a fraction of fp32 speed: +95 ms per step of the lesson's model on a 2-core EPYC, more
than the step itself. It also takes only 2-D parameters, so a second optimizer would be needed for the rest,
which Lightning's automatic optimization and one learning-rate schedule do not support. This one iterates in
fp32 on a CPU and bf16 on a GPU, stacks the matrices of one shape into one batched product (the lesson's model
has 16 small matrices in 4 shapes), and updates the other groups with AdamW, so one `LambdaLR` schedules both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

# The quintic iteration's coefficients from Jordan (2024): they maximise the slope at zero, so that 5 steps bring
# every singular value of the normalised update into roughly [0.7, 1.2] (not exactly 1, which training tolerates).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(updates: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T for each matrix U S V^T of a (batch, rows, cols) stack, by Newton-Schulz iteration."""
    a, b, c = NEWTON_SCHULZ
    x = updates.to(torch.bfloat16 if updates.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for parameter groups with `use_muon=True` (2-D weight matrices), AdamW for the other groups.

        Muon([{"params": matrices, "use_muon": True},
              {"params": others, "use_muon": False, "lr": 3e-3}], lr=0.02)

    Muon groups take `lr`, `momentum`, `nesterov`, `ns_steps`, `weight_decay`; the update of an m x n matrix is
    scaled by sqrt(max(1, m / n)) as in Jordan's implementation. AdamW groups take `lr`, `betas`, `eps`,
    `weight_decay`. The learning rate of every group follows the attached scheduler.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        if not lr > 0:
            raise ValueError(f"Muon lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"Muon ns_steps must be 1 or more, got {ns_steps}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            betas=tuple(betas),
            eps=eps,
            use_muon=True,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim != 2 for p in group["params"]):
                shapes = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                raise ValueError(
                    f"Muon orthogonalizes 2-D weight matrices only; got shapes {shapes}: put them in "
                    "a group with use_muon=False"
                )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        momentum = group["momentum"]
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        grads = [p.grad for p in params]
        buffers = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        updates = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        # Matrices of one shape, or of transposed shapes (the MLP's two), are orthogonalized in one batched product.
        by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_shape[(min(p.shape), max(p.shape))].append(i)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        for indices in by_shape.values():
            wide = [updates[i] if updates[i].size(0) <= updates[i].size(1) else updates[i].mT for i in indices]
            directions = orthogonalize(torch.stack(wide), group["ns_steps"])
            for i, direction in zip(indices, directions):
                rows, cols = params[i].shape
                direction = direction if rows <= cols else direction.mT
                params[i].add_(direction.to(params[i].dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    def _adamw(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = []
        for s in states:  # kept on the CPU as a float, so reading it never waits for a GPU
            s["step"] += 1
            steps.append(float(s["step"]))
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1.0 - beta2**t) ** 0.5 for t in steps])  # bias corrections
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denominators, [-group["lr"] / (1.0 - beta1**t) for t in steps])
