"""Lightning's early stopping, saying when it stopped a run, and taking a new patience on resume."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch import callbacks
from lightning.pytorch.utilities import rank_zero_info


class EarlyStopping(callbacks.EarlyStopping):
    """`lightning.pytorch.callbacks.EarlyStopping`, with two changes: the log says so when it stops a run before
    `trainer.max_steps` (Lightning's says so only with verbose=True, which also logs every improvement), and a
    resumed run keeps the `patience` its command line gives (Lightning restores the checkpoint's)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopping_reason_message and trainer.global_step < trainer.max_steps:
            rank_zero_info(
                f"Stopped early at step {trainer.global_step} of {trainer.max_steps}: "
                f"{self.stopping_reason_message.removesuffix(' Signaling Trainer to stop.')}"
            )
