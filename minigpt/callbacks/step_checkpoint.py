"""`last.ckpt` every N optimizer steps, between the validations that also write it.

A plain `ModelCheckpoint(every_n_train_steps=N)` also saves on a batch that a validation follows: a run resumed
from there skips that validation (Lightning counts it as done once the batch is), so its curve lacks a point
that the uninterrupted run has. This one leaves those batches to the checkpoint written after the validation,
and saves only on a batch that completes an optimizer step: with gradient accumulation, a checkpoint taken
part-way through a step would lose the gradients accumulated so far.

It also writes `last.ckpt` after a validation when no other ModelCheckpoint does (`~callbacks.model_checkpoint`),
and at the end of training when the last steps fell between saves (`trainer.max_steps` need not be a multiple of
either interval), so a run's `last.ckpt` always holds its last step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        completes_a_step = batches % trainer.accumulate_grad_batches == 0
        validation_follows = (
            trainer.enable_validation
            and isinstance(trainer.val_check_batch, int)
            and batches % trainer.val_check_batch == 0
        )
        if completes_a_step and not validation_follows:
            super().on_train_batch_end(trainer, pl_module, *args)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._save_last_if_behind(trainer)  # a no-op where model_checkpoint (listed before this) just saved

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: L.Trainer) -> None:
        if self.save_last and trainer.global_step != last_saved_step(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def last_saved_step(trainer: L.Trainer) -> int:
    """The step of the newest checkpoint any of the run's ModelCheckpoints wrote in this process (0: none yet).
    Private: ModelCheckpoint keeps no public record of the step it last saved at."""
    return max((getattr(c, "_last_global_step_saved", 0) for c in trainer.checkpoint_callbacks), default=0)
