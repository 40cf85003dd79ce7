"""The parts of a run built from its config: module, callbacks, loggers and Trainer (train.py and the benchmarks)."""

from __future__ import annotations

import logging
import warnings

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig, OmegaConf

from minigpt.checkpoint_io import AtomicCheckpointIO
from minigpt.data import WindowsDataModule
from minigpt.loggers import count_steps_done
from minigpt.module import MiniGPTModule

log = logging.getLogger(__name__)


def make_module(cfg: DictConfig, datamodule: WindowsDataModule) -> MiniGPTModule:
    """The LightningModule for `cfg`'s model, optimizer and schedule, sized by the data module's tokenizer."""
    return MiniGPTModule(
        **datamodule.tokenizer.hparams(),  # the character vocabulary, or the BPE's JSON
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
    )


def make_callbacks_and_loggers(cfg: DictConfig, resumed_step: int | None = None) -> tuple[list, list]:
    """`cfg.callbacks` and `cfg.logger`, instantiated, less entries set to null (as experiments drop one). Resumed
    from a checkpoint at `resumed_step`, the loggers hide what a killed run logged after it: the curve has no repeats.
    """
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    purge = {"purge_step": resumed_step + 1} if resumed_step is not None else {}
    loggers = [
        count_steps_done(
            hydra.utils.instantiate(c, **(purge if c._target_.endswith(("TensorBoardLogger", "CSVLogger")) else {}))
        )
        for c in (cfg.get("logger") or {}).values()
        if c is not None
    ]
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write and would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks, loggers


def make_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """`cfg.trainer` with the run's callbacks and loggers; checkpoints written atomically (minigpt/checkpoint_io.py).
    Lightning adds a checkpoint callback and a progress bar (counting epochs) unless told not to: a config that drops
    them (callbacks=none, the speed runs, ~callbacks.progress_bar) gets none."""
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=any(isinstance(c, ProgressBar) for c in callbacks),
    )


def global_batch(trainer: L.Trainer, batch_size: int, block_size: int) -> dict[str, int]:
    """What one optimizer step learns from, over every device and node: windows and tokens."""
    windows = batch_size * trainer.accumulate_grad_batches * trainer.num_devices * trainer.num_nodes
    return {
        "windows": windows,
        "tokens": windows * block_size,
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
    }


def log_global_batch(cfg: DictConfig, trainer: L.Trainer, loggers: list, module: MiniGPTModule) -> None:
    """Say how many windows and tokens one optimizer step learns from, and record it with the module's settings."""
    batch = global_batch(trainer, cfg.data.batch_size, cfg.data.block_size)
    log.info(
        "Global batch: %d windows per device x %d accumulated x %d devices x %d nodes = %d windows of %d tokens, "
        "%d tokens per optimizer step",
        cfg.data.batch_size,
        trainer.accumulate_grad_batches,
        trainer.num_devices,
        trainer.num_nodes,
        batch["windows"],
        cfg.data.block_size,
        batch["tokens"],
    )
    for logger in loggers:  # hparams.yaml and the HParams tab
        logger.log_hyperparams({**module.settings, "global_batch": batch, "tags": list(cfg.get("tags") or [])})


def planned_strategy(cfg: DictConfig) -> Strategy:
    """The strategy (DDP, single device, ...) that the run's Trainer will have, found without the Trainer's
    messages: the run's own Trainer says them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.INFO)
        try:
            return make_trainer(cfg, [], []).strategy
        finally:
            logging.disable(logging.NOTSET)
