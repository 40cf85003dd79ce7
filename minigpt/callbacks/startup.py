"""Where the time before training went: one log line once the first optimizer step is done.

    Start-up: first optimizer step done 12.4 s after launch: imports 4.1 s, data and model 1.2 s,
    trainer set-up 0.9 s, first step 6.2 s (compilation included)

"trainer set-up" is Lightning's: the trainer, callbacks and loggers, moving the model to its device, the
optimizer, the data loaders, the sanity validation and the callbacks' own start (e.g. drawing the graph).

On a GPU the first step is timed to its end (one synchronisation, once). Short runs and speed runs spend much of
their wall time here; benchmarks/time_to_quality.py copies the line into its report.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class StartupTimes(Callback):
    def __init__(self, launched: float, compiled: bool = False):
        """launched: time.perf_counter() when the program started; compiled: whether the first step compiles."""
        self.marks: list[tuple[str, float]] = [("launch", launched)]
        self.compiled = compiled
        self._first_step: int | None = None  # the global step that ends the first optimizer step of this run

    def mark(self, phase: str) -> None:
        """Record that `phase` (e.g. "imports") ends now."""
        self.marks.append((phase, time.perf_counter()))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.mark("trainer set-up")
        self._first_step = trainer.global_step + 1  # a resumed run's first step too

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_) -> None:
        if self._first_step is None or trainer.global_step < self._first_step:
            return
        self._first_step = None  # once per run
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the step's kernels, not only their launch
        self.mark("first step")
        rank_zero_info(self.summary())

    def summary(self) -> str:
        times = [now - then for (_, then), (_, now) in zip(self.marks, self.marks[1:])]
        parts = ", ".join(f"{phase} {seconds:.1f} s" for (phase, _), seconds in zip(self.marks[1:], times))
        if self.compiled and self.marks[-1][0] == "first step":
            parts += " (compilation included)"
        total = self.marks[-1][1] - self.marks[0][1]
        return f"Start-up: first optimizer step done {total:.1f} s after launch: {parts}"
