"""Lightning's early stopping, saying when it stopped a run, and taking a new patience on resume."""

from __future__ import annotations

import inspect
from typing import Any

import lightning as L
from lightning.pytorch import callbacks
from lightning.pytorch.utilities import rank_zero_info

from minigpt.checks import as_typed, is_number, is_whole


class EarlyStopping(callbacks.EarlyStopping):
    """`lightning.pytorch.callbacks.EarlyStopping`, with two changes: the log says so when it stops a run before
    `trainer.max_steps` (Lightning's says so only with verbose=True, which also logs every improvement), and a
    resumed run keeps the `patience` its command line gives (Lightning restores the checkpoint's)."""

    def __init__(self, *args: Any, **kwargs: Any):
        # Lightning compares these only at a validation, where a mistyped one would end the run with a TypeError
        bound = inspect.signature(callbacks.EarlyStopping).bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        patience = given["patience"]
        if not (is_whole(patience) and patience >= 0):
            raise ValueError(
                f"callbacks.early_stopping.patience must be a whole number of validations, 0 or more, "
                f"got {as_typed(patience)}"
            )
        for key in ("min_delta", "stopping_threshold", "divergence_threshold"):
            if given.get(key) is not None and not is_number(given[key]):
                raise ValueError(f"callbacks.early_stopping.{key} must be a number (or null), got {given[key]!r}")
        super().__init__(*args, **kwargs)

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
