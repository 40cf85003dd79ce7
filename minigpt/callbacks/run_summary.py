"""At the end of a run: its loss curve as a picture, and its hyperparameters against its best validation loss.

`loss_curve.png` (train and validation loss against step, learning rate on a second axis) is drawn from the
TensorBoard events the run just wrote, not from a copy kept in memory; the hyperparameters and `val/loss_best`
go to TensorBoard's HParams tab, where the jobs of a sweep line up side by side.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from minigpt.build import global_batch
from minigpt.report import loss_curve_title, read_scalars, write_loss_curve


class RunSummary(Callback):
    def __init__(self, dirpath: str | None = None):
        """dirpath: where to write `loss_curve.png`; None = only the HParams entry."""
        self.dirpath = Path(dirpath) if dirpath else None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if not trainer.is_global_zero or logger is None:
            return
        logger.experiment.flush()  # everything logged so far is on disk before it is read back
        scalars, _ = read_scalars(logger.log_dir)
        if self.dirpath is not None:
            write_loss_curve(scalars, self.dirpath / "loss_curve.png", loss_curve_title(self.dirpath, scalars))
        value = pl_module.best_val_loss
        if not math.isnan(value):
            params = self.hyperparameters(trainer, pl_module)
            # in Lightning's count, which the run's loggers turn into the steps done (minigpt/loggers.py)
            logger.log_hyperparams(params, {"val/loss_best": value}, step=trainer.global_step - 1)

    @staticmethod
    def hyperparameters(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """What a sweep varies: the module's settings (not its tokenizer), the batch and the length of the run."""
        params = dict(pl_module.settings)
        datamodule = trainer.datamodule
        if datamodule is not None and "batch_size" in datamodule.hparams:
            params["data"] = {"batch_size": datamodule.hparams.batch_size}
            if "block_size" in datamodule.hparams:
                params["global_batch"] = global_batch(
                    trainer, datamodule.hparams.batch_size, datamodule.hparams.block_size
                )
        params["trainer"] = {
            "max_steps": trainer.max_steps,
            "gradient_clip_val": trainer.gradient_clip_val,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }
        return params
