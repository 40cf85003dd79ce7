"""Train a MiniGPT: python train.py [group=option ...] [key=value ...]  (python train.py --help lists them)."""

from __future__ import annotations

import logging
import warnings

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from minigpt.data import TextDataModule
from minigpt.module import MiniGPTModule, find_checkpoint

log = logging.getLogger(__name__)

OmegaConf.register_new_resolver(
    "best_precision",
    lambda: "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true",
    replace=True,
)
# The training stream is an endless iterable that builds whole batches by one gather: workers would only add overhead.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Raised inside Lightning 2.6 by newer PyTorch; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model as `cfg` says and return the final metrics, with `val/loss_best` for sweeps."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule: TextDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")  # the vocabulary, and so the model's size, comes from the text

    module = MiniGPTModule(
        vocab=datamodule.tokenizer.vocab,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
    )
    if cfg.compile:
        module.model.compile(mode=cfg.compile_mode)  # in place: parameter names, and so checkpoints, stay free of `_orig_mod.`

    # An entry set to null (as experiments do to drop one) is skipped.
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write and would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = make_trainer(cfg, callbacks, loggers)

    ckpt_path = str(find_checkpoint(cfg.ckpt_path, prefer="last")) if cfg.ckpt_path else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    best = next((c.best_model_score for c in callbacks if isinstance(c, ModelCheckpoint) and c.best_model_score is not None), None)
    metrics["val/loss_best"] = float(best) if best is not None else metrics.get("val/loss", float("nan"))
    metrics["step"] = trainer.global_step
    log.info("Finished at step %d: val/loss %.4f, best val/loss %.4f", trainer.global_step,
             metrics.get("val/loss", float("nan")), metrics["val/loss_best"])
    return metrics


def make_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"trainer.accelerator={cfg.trainer.accelerator} asks for a GPU, but PyTorch sees none "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            "Train on the CPU with trainer=cpu (or trainer=default, which picks the best device there is)."
        )
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Lightning logs through its own handler unless told otherwise; send it to Hydra's console and train.log.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return train(cfg)["val/loss_best"]  # the value a Hydra sweeper minimises


if __name__ == "__main__":
    main()
