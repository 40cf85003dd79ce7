"""Which windows each process trains on: a fingerprint of every rank's first training batch, logged by rank zero.

Data parallelism learns from N times the windows only if the N processes draw different ones; a seed that ignored
the rank would silently train N copies on the same batch. At the first batch of a run, each rank hashes its
inputs, the hashes are gathered (a collective: every rank takes part), and rank zero logs them, with a warning
if two ranks drew the same windows. A single process logs its own, which a rerun with the same seed repeats.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


def fingerprint(inputs: torch.Tensor) -> int:
    """A 63-bit hash of a batch's token ids: equal for equal batches, and all but surely different otherwise."""
    data = inputs.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


class BatchFingerprints(Callback):
    def __init__(self) -> None:
        self.logged = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.logged:
            return
        self.logged = True  # once per process: every rank reaches its first batch, so every rank gathers
        mine = torch.tensor([fingerprint(batch[0])], device=pl_module.device)
        prints = [int(p) for p in pl_module.all_gather(mine).reshape(-1).tolist()]  # (world_size,)
        if not trainer.is_global_zero:
            return
        log.info(
            "First training batch (step %d) of each rank: %s",
            trainer.global_step,
            ", ".join(f"rank {rank} {p:016x}" for rank, p in enumerate(prints)),
        )
        if len(set(prints)) < len(prints):
            log.warning(
                "Ranks drew the same training windows: data parallelism learns nothing from the copies. "
                "Each rank must seed its windows with its rank (minigpt.data.RandomWindows does)."
            )
