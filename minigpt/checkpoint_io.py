"""How the Trainer writes and reads checkpoint files: atomically, and without unpickling code.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction, which on a local disk stages the file in
the system temp folder and `shutil.move`s it into place: when that folder is on another filesystem (a tmpfs
/tmp, a container volume), the move is a copy straight into `last.ckpt`, and a run killed during it leaves a
half-written `last.ckpt`. Nothing is fsynced either, so a power cut can leave an empty file behind a rename.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from minigpt.atomic import atomic_write
from minigpt.checkpoint import load_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint through `atomic_write` (readers see the previous checkpoint or the new one, never a
    mix); loads with `weights_only=True` always, with errors that name the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        # object stores replace a key atomically on their own; Lightning's writer also refuses storage_options
        if get_protocol(str(path)) != "file" or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self, path: str | Path, map_location: Callable | str | None = "cpu", weights_only: bool | None = True
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("minigpt loads checkpoints with weights_only=True only: a checkpoint must not run code")
        if get_protocol(str(path)) != "file":
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(path, map_location)
