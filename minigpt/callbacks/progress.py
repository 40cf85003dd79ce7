"""A console progress bar that counts optimizer steps out of `trainer.max_steps`.

A run is one endless epoch of random windows, so Lightning's epoch bar would read "Epoch 0" over an unknown
total; steps are what `max_steps`, `val_check_interval` and the schedule are measured in.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    @property
    def train_description(self) -> str:
        return "train"

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        self.on_train_epoch_start(trainer)  # Lightning does not call that on a run resumed part-way through its epoch

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        # Not TQDMProgressBar's, which would first show "Epoch 0" over the batches of an epoch
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run starts part-way; the rate counts new steps only
        bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step % self.refresh_rate == 0 or step == self.train_progress_bar.total:  # every `refresh_rate` steps
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run folder already says which run this is
        # The latest logged train/loss, read here at a refresh: logged with prog_bar=True, Lightning would read it to
        # the host at every step (minigpt/module.py)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            metrics["train/loss"] = float(loss)
        return metrics
