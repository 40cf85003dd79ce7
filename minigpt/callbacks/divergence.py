"""Stop a run whose loss or weights became non-finite, before anything non-finite is saved.

Each step only keeps its loss (a tensor on the device); they are checked (one host sync) every
`check_every_n_steps` steps, which default to the logging steps that sync anyway, and always before a
checkpoint is written, before a validation and at the end of training. A checkpoint is written only if the
weights are finite, so `last.ckpt` is always the last good state. Under DDP the ranks agree on the verdict (one
small all-reduce per check), so they stop together.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from minigpt.callbacks.step_checkpoint import last_saved_step


class NonFiniteLossError(FloatingPointError):
    """The run diverged: its loss or weights are NaN or infinite."""


class StopOnNonFiniteLoss(Callback):
    def __init__(self, check_every_n_steps: int = 50, max_names: int = 8):
        if check_every_n_steps <= 0:
            raise ValueError(
                f"callbacks.stop_on_non_finite.check_every_n_steps (trainer.log_every_n_steps by default) "
                f"must be positive, got {check_every_n_steps}"
            )
        self.check_every_n_steps, self.max_names = check_every_n_steps, max_names
        self._losses: list[torch.Tensor] = []  # the loss of each batch since the last check, on the device
        self._steps: list[int] = []  # the optimizer step each of those batches makes, counted as the loggers do
        self._started_at = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started_at = trainer.global_step  # > 0: resumed from the checkpoint of that step

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._steps.append(trainer.global_step + 1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any) -> None:
        # Lightning's own detached copy of the batch's loss: kept as it is, no operation per step (and no sync)
        self._losses.append(outputs["loss"] if isinstance(outputs, dict) else outputs.detach())
        if trainer.global_step % self.check_every_n_steps == 0:
            self._check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Raising here aborts the save before the file is written: last.ckpt keeps the last good state.
        self._check(trainer, pl_module, weights_too=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module, weights_too=True)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, weights_too: bool = False) -> None:
        losses, steps = self._losses, self._steps[: len(self._losses)]
        self._losses, self._steps = [], self._steps[len(self._losses) :]
        no_step = torch.iinfo(torch.int64).max
        first_bad = no_step
        if losses and not (flags := torch.isfinite(torch.stack(losses)).cpu()).all():  # the one host sync
            first_bad = steps[int((~flags).int().argmax())]
        # Under DDP each rank has its own loss: every rank takes the earliest bad step of any of them, so they all
        # stop together instead of leaving the others waiting in the next collective. One process: no communication.
        if trainer.world_size > 1:
            first_bad = int(trainer.strategy.reduce(torch.tensor(first_bad, device=pl_module.device), reduce_op="min"))
        if first_bad != no_step:
            raise NonFiniteLossError(
                f"train/loss became non-finite at step {first_bad}. {self._diagnosis(trainer, pl_module)}"
            )
        if weights_too:
            weights = list(pl_module.parameters())
            if weights and not torch.stack([torch.isfinite(p).all() for p in weights]).all():
                bad = [n for n, p in pl_module.named_parameters() if not torch.isfinite(p).all()]
                raise NonFiniteLossError(
                    f"The weights became non-finite by step {trainer.global_step} ({self._names(bad)}). "
                    f"{self._diagnosis(trainer, pl_module)}"
                )

    def _diagnosis(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        named = list(pl_module.named_parameters())
        bad_grads = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        bad_weights = [n for n, p in named if not torch.isfinite(p).all()]
        kinds = (
            [("Parameters with non-finite gradients and weights", bad_grads)]
            if bad_grads == bad_weights
            else [("Parameters with non-finite gradients", bad_grads), ("Non-finite weights", bad_weights)]
        )
        found = "".join(
            f"{what} at step {trainer.global_step}: {self._names(names)}. " for what, names in kinds if names
        )
        saved = max(last_saved_step(trainer), self._started_at)  # a resumed run's own checkpoint counts too
        if not saved:
            return (
                f"{found}The run was stopped before it saved a checkpoint. Start again with a lower optimizer.lr, more "
                "warmup (scheduler.warmup_steps) or harder clipping (trainer.gradient_clip_val)."
            )
        return (
            f"{found}The run was stopped and nothing non-finite was saved: the last checkpoint, from step {saved}, "
            "is the last good state. Start again with a lower optimizer.lr (a resumed run keeps the optimizer "
            "settings it was trained with), or resume with ckpt_path=<this run's folder> and more warmup "
            "(scheduler.warmup_steps) or harder clipping (trainer.gradient_clip_val)."
        )

    def _names(self, names: list[str]) -> str:
        more = f" and {len(names) - self.max_names} more" if len(names) > self.max_names else ""
        return ", ".join(names[: self.max_names]) + more
