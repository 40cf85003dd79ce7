"""Lightning's learning-rate monitor, writing once per optimizer step under gradient accumulation."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch import callbacks


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """`lightning.pytorch.callbacks.LearningRateMonitor`, which writes the rate before every training batch of a
    logging step: with `trainer.accumulate_grad_batches=k`, k times at the same step, as k rows of metrics.csv.
    This one writes before the first micro-batch of the step only."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
