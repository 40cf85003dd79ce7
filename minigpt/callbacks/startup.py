"""Where the time before training went: one log line once the first optimizer step is done.

    Start-up: first optimizer step done 12.4 s after launch: imports 4.1 s, data and model 1.2 s,
    trainer set-up 0.9 s, first step 6.2 s (compilation included)

"trainer set-up" is Lightning's: the trainer, callbacks and loggers, moving the model to its device, the
optimizer, the data loaders, the sanity validation and the callbacks' own start (e.g. drawing the graph).

On a GPU the first step is timed to its end (one synchronisation, once). Short runs and speed runs spend much of
their wall time here; the benchmarks read the line back with `parse_startup`.
"""

from __future__ import annotations

import re
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
        parts = ", ".join(f"{phase} {now - then:.1f} s" for (_, then), (phase, now) in zip(self.marks, self.marks[1:]))
        total = self.marks[-1][1] - self.marks[0][1]
        return f"{PREFIX} {total:.1f} s after launch: {parts}{' (compilation included)' if self.compiled else ''}"


PREFIX = "Start-up: first optimizer step done"
_TOTAL = re.compile(re.escape(PREFIX) + r" ([0-9.]+) s after launch: (.*)")
_PHASE = re.compile(r"([a-z][a-z -]*?) ([0-9.]+) s")


def parse_startup(text: str) -> dict[str, float] | None:
    """The seconds of each phase, and `total`, from the first Start-up line in `text` (a log); None if there is none."""
    match = _TOTAL.search(text)
    if match is None:
        return None
    phases = {name: float(seconds) for name, seconds in _PHASE.findall(match[2].split(" (")[0])}
    return {**phases, "total": float(match[1])}
