"""Tokens per second and model FLOPs utilisation (MFU), with Lightning's ThroughputMonitor, and the tokens a run has
trained on, which a resumed run continues.

Lightning's monitor logs, per logging step, `train/device/items_per_sec` (tokens/s of one device),
`train/items_per_sec` (of every device, when there are several), `train/device/flops_per_sec` and
`train/device/mfu` (the share of the device's peak, from Lightning's table of GPUs for the run's precision, or
`peak_flops`), averaged over the last `window_size` batches; validation's go under `validate/`. This callback adds
`train/tokens` and a console line.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from minigpt.model import GPT
from minigpt.module import split_linear_weights

log = logging.getLogger(__name__)


def training_flops_per_token(model: GPT) -> int:
    """FLOPs of one forward and backward pass per token, as MFU counts them: 6 per weight of a linear layer (2 forward,
    4 backward), plus 12 x layers x width x context for attention's scores and mixing over a full context (PaLM's
    appendix B formula, as nanoGPT's estimate_mfu; the causal half is not subtracted, and a fused kernel's
    recomputation in backward is not work the model needs). Embedding lookups, norms and biases are not matmuls."""
    config = model.config
    weights, _ = split_linear_weights(model)  # the output head's included
    return 6 * sum(w.numel() for w in weights) + 12 * config.n_layer * config.n_embd * config.block_size


def windows_in(batch: tuple[Any, Any]) -> int:
    return batch[0].size(0)


def tokens_in(batch: tuple[Any, Any]) -> int:
    return batch[0].numel()


class Throughput(ThroughputMonitor):
    def __init__(self, peak_flops: float | None = None, window_size: int = 100):
        """peak_flops: the device's peak FLOP/s for MFU (e.g. 989e12 for an H100's dense bf16); None = Lightning's
        table (`lightning.fabric.utilities.throughput.get_available_flops`), which knows no CPU."""
        super().__init__(batch_size_fn=windows_in, length_fn=tokens_in, window_size=window_size)
        self.peak_flops = peak_flops
        self.tokens = 0  # trained on by every process since the run began, resumes included
        self._flops_per_token = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        peak = self.peak_flops
        if peak is None and self.available_flops is None and device.type == "cuda":
            # Lightning's table misses the name "NVIDIA H200" (it looks for SXM1 or NVL1 in it) and lists the H200's
            # bf16 peak with 2:4 sparsity (2.0e15); dense, as MFU is counted, it is the H100 SXM's 989.4e12
            if "H200" in torch.cuda.get_device_name(device) and "bf16" in str(trainer.precision):
                peak = 989.4e12
        if peak is not None:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():  # (Lightning's, made in super().setup: no setter for it)
                throughput.available_flops = self.available_flops
        self._flops_per_token = training_flops_per_token(pl_module.model)  # before FSDP shards the parameters
        if self.available_flops is None and trainer.is_global_zero:
            log.info("No peak FLOP/s known for %s: MFU is not logged (set peak_flops)", device)

    def _set_flops(self, trainer: L.Trainer, pl_module: L.LightningModule, passes: int) -> None:
        """ThroughputMonitor reads `flops_per_batch` from the module: a training batch's forward and backward (3
        passes), or a validation batch's forward (1)."""
        batch_size = trainer.datamodule.hparams.batch_size
        pl_module.flops_per_batch = self._flops_per_token * passes // 3 * batch_size * pl_module.model.config.block_size

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_flops(trainer, pl_module, passes=3)
        super().on_train_start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_flops(trainer, pl_module, passes=1)
        super().on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set_flops(trainer, pl_module, passes=3)
        super().on_validation_end(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *args):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        self.tokens += tokens_in(batch) * trainer.world_size  # every rank's batch has the same size
        batches = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        if batches % trainer.accumulate_grad_batches or trainer.global_step % trainer.log_every_n_steps:
            return  # not the end of an optimizer step that the loggers write
        for logger in trainer.loggers:  # in Lightning's count, after the step (minigpt/loggers.py)
            logger.log_metrics({"train/tokens": self.tokens}, step=trainer.global_step - 1)
        # the rates Lightning's monitor just logged (its Throughput objects have no public accessor)
        training = self._throughputs.get(RunningStage.TRAINING)
        metrics = training.compute() if training is not None and trainer.is_global_zero else {}
        if "device/items_per_sec" in metrics:  # once the window holds its batches
            mfu = f", MFU {metrics['device/mfu']:.1%}" if "device/mfu" in metrics else ""
            log.info(
                "step %d: %s tokens/s (%s per device)%s, %.4g tokens so far",
                trainer.global_step,
                f"{metrics.get('items_per_sec', metrics['device/items_per_sec']):,.0f}",  # (one device: no total)
                f"{metrics['device/items_per_sec']:,.0f}",
                mfu,
                self.tokens,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = state_dict["tokens"]
