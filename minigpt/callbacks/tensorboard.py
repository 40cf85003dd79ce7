"""Where the callbacks put pictures and text: every TensorBoard logger of the run (other loggers take scalars only)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from matplotlib.image import imsave
from torch.utils.tensorboard import SummaryWriter

from minigpt import plots


def writers(trainer: L.Trainer) -> list[SummaryWriter]:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def add_figure(trainer: L.Trainer, tag: str, figure: Figure, path: Path | None = None) -> None:
    """Log `figure` as image `tag` at the current step, and save it as a PNG at `path` if one is given."""
    targets = writers(trainer)
    if not targets and path is None:
        return
    pixels = plots.to_array(figure)  # drawn once for both
    for writer in targets:
        writer.add_image(tag, pixels, trainer.global_step, dataformats="HWC")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        imsave(path, pixels)
