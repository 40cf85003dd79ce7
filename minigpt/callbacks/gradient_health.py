"""Gradient health: does the gradient reach every layer, and how large is each step against the weights?

Every `every_n_steps` optimizer steps (by default the steps the loggers write), before gradient clipping:

    grad/norm_total               the L2 norm of the whole gradient
    grad/norm/<parameter>         each parameter's gradient norm
    grad/layer/<layer>            each layer's gradient norm, layers grouped as a reader thinks of them
    grad/clip_scale               what clipping multiplies this gradient by: min(1, trainer.gradient_clip_val /
                                  grad/norm_total); below 1 on the steps it clips (with clipping by norm only)
    grad/update_ratio/<layer>     |w_after - w_before| / |w_before| over the measured step: the optimizer's actual
                                  update (after clipping, momentum, Adam's scaling, weight decay) against the weights
                                  (~1e-3 is the usual healthy order; much smaller learns nothing, much larger thrashes)

and a warning in the log when a layer's gradient vanishes or explodes. At each validation, the latest of those
measurements is drawn as a gradient-flow chart (mean and max |grad| per layer, image `grad/flow`).
A measured step costs a copy of the weights and two device-to-host copies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from minigpt import plots
from minigpt.callbacks.tensorboard import add_figure

log = logging.getLogger(__name__)


def layer_of(name: str) -> str:
    """The layer of a parameter: `embeddings`, `h.<i>.attn`, `h.<i>.mlp`, `ln_f` or `lm_head`.

    A block's first LayerNorm only feeds its attention and its second only feeds its MLP, so each is counted
    with the sublayer it serves.
    """
    parts = name.removeprefix("transformer.").split(".")
    if parts[0] in ("wte", "wpe"):
        return "embeddings"
    if parts[0] == "h" and len(parts) > 2:
        sublayer = {"ln_1": "attn", "ln_2": "mlp"}.get(parts[2], parts[2])
        return f"h.{parts[1]}.{sublayer}"
    return parts[0]


@dataclass
class LayerStats:
    """Gradient statistics of one layer, from the per-parameter ones."""

    name: str
    grad_norm: float
    mean_abs: float
    max_abs: float


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def measure(model: nn.Module) -> tuple[dict[str, float], list[LayerStats]]:
    """Per-parameter gradient norms and per-layer statistics, layers in the model's order (input first).

    A parameter that got no gradient counts as zero.
    """
    named = trainable(model)
    rows = [
        torch.stack([p.grad.norm(), p.grad.abs().mean(), p.grad.abs().amax()])
        if p.grad is not None
        else torch.zeros(3, device=p.device)
        for _, p in named
    ]
    values = torch.stack(rows).float().cpu().tolist()  # the one host sync of a measurement
    grad_norms = {name: row[0] for (name, _), row in zip(named, values)}

    layers: dict[str, dict[str, float]] = {}
    for (name, p), (g_norm, g_mean, g_max) in zip(named, values):
        acc = layers.setdefault(layer_of(name), dict(g_sq=0.0, abs_sum=0.0, n=0, max=0.0))
        acc["g_sq"] += g_norm**2
        acc["abs_sum"] += g_mean * p.numel()
        acc["n"] += p.numel()
        acc["max"] = max(acc["max"], g_max)
    stats = [LayerStats(name, math.sqrt(a["g_sq"]), a["abs_sum"] / a["n"], a["max"]) for name, a in layers.items()]
    return grad_norms, stats


def update_ratios(model: nn.Module, before: list[torch.Tensor]) -> dict[str, float]:
    """Per layer, |w - w_before| / |w_before|: how far the step from `before` (the trainable parameters' values, in
    order) moved the weights, against their size."""
    rows = torch.stack(
        [torch.stack([(p.detach() - w).norm(), w.norm()]) for (_, p), w in zip(trainable(model), before)]
    )
    sums: dict[str, list[float]] = {}
    for (name, _), (step, weight) in zip(trainable(model), rows.float().cpu().tolist()):  # one host sync
        acc = sums.setdefault(layer_of(name), [0.0, 0.0])
        acc[0] += step**2
        acc[1] += weight**2
    return {
        layer: math.sqrt(step_sq / weight_sq) if weight_sq > 0 else float("nan")
        for layer, (step_sq, weight_sq) in sums.items()
    }


class GradientHealth(Callback):
    def __init__(
        self,
        every_n_steps: int | None = None,
        vanish_below: float = 1e-7,
        explode_above: float = 100.0,
        dirpath: str | None = None,
    ):
        """
        Args:
            every_n_steps: optimizer steps between measurements; None = `trainer.log_every_n_steps`, the steps
                the loggers write (a value that is not a multiple of it is measured but not written).
            vanish_below: warn when a layer's gradient norm is at or below this.
            explode_above: warn when a layer's gradient norm is above this (before clipping).
            dirpath: where to save the latest gradient-flow chart as `gradient_flow.png`; None = TensorBoard only.
        """
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(
                f"callbacks.gradient_health.every_n_steps (trainer.log_every_n_steps by default) must be "
                f"positive or null, got {every_n_steps}"
            )
        self.every_n_steps = every_n_steps
        self.vanish_below, self.explode_above = vanish_below, explode_above
        self.dirpath = Path(dirpath) if dirpath else None
        self.latest: tuple[int, list[LayerStats]] | None = None
        self._weights_before: list[torch.Tensor] | None = None  # on a measured step, until the optimizer has stepped

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_steps is None:
            self.every_n_steps = trainer.log_every_n_steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # Lightning calls this after unscaling (mixed precision) and before clipping: the true raw gradient. Under
        # DDP the gradients are already averaged over the ranks, and only rank zero's loggers write: measure there.
        if (trainer.global_step + 1) % self.every_n_steps or not trainer.is_global_zero:
            return
        grad_norms, layers = measure(pl_module.model)
        total = math.sqrt(sum(n**2 for n in grad_norms.values()))
        metrics = {
            "grad/norm_total": total,
            **{f"grad/norm/{name}": value for name, value in grad_norms.items()},
            **{f"grad/layer/{s.name}": s.grad_norm for s in layers},
        }
        clip = trainer.gradient_clip_val
        if clip and trainer.gradient_clip_algorithm in (None, "norm"):  # what clipping will scale this gradient by
            metrics["grad/clip_scale"] = min(1.0, clip / total) if total > 0 else 1.0
        # Straight to the loggers (which write on rank zero only), at the step Lightning gives the training loss:
        # `self.log` costs about a millisecond of bookkeeping per value, and these are ~100 plain floats.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)  # the run's loggers put it at the step it makes
        self.latest = (trainer.global_step + 1, layers)  # named by the step these gradients make, as logged
        self.warn(trainer.global_step + 1, layers)
        self._weights_before = [p.detach().clone() for _, p in trainable(pl_module.model)]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._weights_before is None:  # not a measured step, or (under accumulation) not its last batch yet
            return
        before, self._weights_before = self._weights_before, None
        ratios = {f"grad/update_ratio/{layer}": r for layer, r in update_ratios(pl_module.model, before).items()}
        for logger in trainer.loggers:
            logger.log_metrics(ratios, step=trainer.global_step - 1)  # after the step: at the step it made

    def warn(self, step: int, layers: list[LayerStats]) -> None:
        vanished = [f"{s.name} ({s.grad_norm:.1e})" for s in layers if s.grad_norm <= self.vanish_below]
        exploded = [f"{s.name} ({s.grad_norm:.1e})" for s in layers if s.grad_norm > self.explode_above]
        if vanished:
            log.warning(
                f"step {step}: the gradient vanishes (norm <= {self.vanish_below:.0e}) in {', '.join(vanished)}: these "
                "layers are not learning. Look for a dead activation, a detached tensor or a learning rate that is "
                "far too high."
            )
        if exploded:
            log.warning(
                f"step {step}: the gradient explodes (norm > {self.explode_above:.0e}) in {', '.join(exploded)}. Lower "
                "optimizer.lr, add warmup (scheduler.warmup_steps) or clip harder (trainer.gradient_clip_val)."
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.latest is None:
            return
        step, layers = self.latest
        figure = plots.gradient_flow(layers, f"gradient flow at step {step} (before clipping)")
        add_figure(trainer, "grad/flow", figure, self.dirpath and self.dirpath / "gradient_flow.png")
