"""Faults the reliability tests inject into runs: a SIGKILL at a chosen step, a NaN in the weights, a kill mid-save.

The callbacks are added from the command line like any other, e.g.
`+callbacks.kill._target_=tests.crash.SigkillAt +callbacks.kill.step=27`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class SigkillAt(Callback):
    """Kill this process, as a pre-empted job or the out-of-memory killer would, when step `step` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class InterruptAt(Callback):
    """Ctrl-C when step `step` begins: Lightning catches the KeyboardInterrupt, shuts down and exits."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class RaiseAt(Callback):
    """A bug: a RuntimeError when step `step` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"a bug at step {self.step}")


class PoisonAt(Callback):
    """Make the loss NaN from step `step` on, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.transformer.wte.weight.fill_(float("nan"))


def die_while_saving(path: str) -> None:
    """Save a checkpoint to `path` with AtomicCheckpointIO, and be SIGKILLed half-way through writing it."""
    import minigpt.checkpoint_io as checkpoint_io

    def half_a_save(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 the first bytes of a zip archive, and then nothing")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_io.torch.save = half_a_save
    checkpoint_io.AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, path)


if __name__ == "__main__":
    die_while_saving(sys.argv[1])
