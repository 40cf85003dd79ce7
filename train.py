"""Train a MiniGPT: python train.py [group=option ...] [key=value ...]  (python train.py --help lists them)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, InstantiationException
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from minigpt.callbacks.divergence import NonFiniteLossError
from minigpt.checkpoint_io import AtomicCheckpointIO
from minigpt.data import WindowsDataModule
from minigpt.module import MiniGPTModule, find_checkpoint, load_checkpoint

log = logging.getLogger(__name__)

OmegaConf.register_new_resolver(
    "best_precision",
    lambda: "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true",
    replace=True,
)
# A multirun job's folder is named after its overrides, and a file name may have at most 255 bytes: cut it
# short (the job number in front keeps it unique; .hydra/overrides.yaml inside has them all).
OmegaConf.register_new_resolver(
    "first_bytes", lambda text, n: str(text).encode()[:n].decode(errors="ignore"), replace=True
)
# The training stream is an endless iterable that builds whole batches by one gather: workers would only add overhead.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Raised inside Lightning 2.6 by newer PyTorch; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model as `cfg` says and return the final metrics, with `val/loss_best` for sweeps.

    With `cfg.ckpt_path`, the run resumes from that checkpoint (or a run folder's last.ckpt) and, when the
    checkpoint lies in a run folder, continues in that folder: `cfg.run_dir` is pointed at it.
    """
    L.seed_everything(cfg.seed, workers=True)
    ckpt_file, checkpoint = resume_point(cfg)  # a damaged or unsafe checkpoint fails here, before any output
    datamodule: WindowsDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")  # the tokenizer, and so the model's size, comes from the text

    module = MiniGPTModule(
        **datamodule.tokenizer.hparams(),  # the character vocabulary, or the BPE's JSON
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
    )
    if checkpoint is not None:
        check_resumable(checkpoint, module, ckpt_file)
    if cfg.compile:
        module.model.compile(mode=cfg.compile_mode)  # in place: parameter names, and so checkpoints, stay free of `_orig_mod.`

    # An entry set to null (as experiments do to drop one) is skipped.
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # TensorBoard hides the steps a killed run logged after its last checkpoint, so the curve has no repeats
    purge = {"purge_step": checkpoint["global_step"]} if checkpoint is not None else {}
    loggers = [hydra.utils.instantiate(c, **(purge if c._target_.endswith("TensorBoardLogger") else {}))
               for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write and would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer = make_trainer(cfg, callbacks, loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_file) if ckpt_file else None,
                weights_only=True)

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    best = next((c.best_model_score for c in callbacks if isinstance(c, ModelCheckpoint) and c.best_model_score is not None), None)
    metrics["val/loss_best"] = float(best) if best is not None else metrics.get("val/loss", float("nan"))
    metrics["step"] = trainer.global_step
    log.info("Finished at step %d: val/loss %.4f, best val/loss %.4f", trainer.global_step,
             metrics.get("val/loss", float("nan")), metrics["val/loss_best"])
    return metrics


def resume_point(cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint `cfg.ckpt_path` names, loaded (weights only), and the run folder it continues in."""
    if not cfg.ckpt_path:
        return None, None
    ckpt_file = find_checkpoint(cfg.ckpt_path, prefer="last")
    checkpoint = load_checkpoint(ckpt_file)
    if "global_step" not in checkpoint:
        raise ValueError(f"ckpt_path={ckpt_file} holds weights only, not a training state to resume from. "
                         "Resume from a run's last.ckpt, or sample from this file with sample.py.")
    if ckpt_file.parent.name == "checkpoints":  # <run folder>/checkpoints/<file>: checkpoints and events go on there
        cfg.run_dir = os.path.abspath(ckpt_file.parent.parent)
    log.info("Resuming from %s at step %d; writing to %s", ckpt_file, checkpoint["global_step"], cfg.run_dir)
    return ckpt_file, checkpoint


def check_resumable(checkpoint: dict[str, Any], module: MiniGPTModule, ckpt_file: Path) -> None:
    """Refuse a checkpoint of another vocabulary or model size, naming what differs."""
    saved = checkpoint.get("hyper_parameters") or {}
    if not ("vocab" in saved or "bpe" in saved) or "model" not in saved:
        raise ValueError(f"ckpt_path={ckpt_file} is not a minigpt checkpoint: it has no vocabulary or model sizes.")
    if "bpe" in saved or "bpe" in module.hparams:
        if saved.get("bpe") != module.hparams.get("bpe"):
            then, now = ("a byte-level BPE" if "bpe" in hparams else "characters" for hparams in (saved, module.hparams))
            raise ValueError(
                f"ckpt_path={ckpt_file} was trained with another tokenizer ({then}) than this run's data gives "
                f"({now}). Resume with the data and data.tokenizer it was trained with, or start a "
                "new run without ckpt_path."
            )
    elif saved["vocab"] != (vocab := module.hparams.vocab):
        only_saved, only_here = ("".join(sorted(set(a) - set(b))) for a, b in ((saved["vocab"], vocab), (vocab, saved["vocab"])))
        raise ValueError(
            f"ckpt_path={ckpt_file} was trained on a vocabulary of {len(saved['vocab'])} characters, but this run's "
            f"text has {len(vocab)} (only in the checkpoint: {only_saved!r}; only in the text: {only_here!r}). "
            "Resume with the data it was trained on (data.path=...), or start a new run without ckpt_path."
        )
    differences = [f"model.{key}={saved['model'].get(key)} in the checkpoint, {value} here"
                   for key, value in module.hparams.model.items() if saved["model"].get(key) != value]
    if differences:
        raise ValueError(f"ckpt_path={ckpt_file} is a different model: {'; '.join(differences)}. "
                         "Resume with the model settings it was trained with (e.g. the same model=...).")


def make_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={cfg.trainer.accelerator} asks for a GPU, but PyTorch sees none "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            "Train on the CPU with trainer=cpu (or trainer=default, which picks the best device there is)."
        )
    if not (isinstance(cfg.trainer.max_steps, int) and cfg.trainer.max_steps > 0):
        raise ValueError(f"trainer.max_steps must be a positive number of optimizer steps, got {cfg.trainer.max_steps}")
    every, accumulate = cfg.trainer.val_check_interval, cfg.trainer.get("accumulate_grad_batches", 1)
    if isinstance(every, int) and every % accumulate:
        raise ValueError(
            f"trainer.val_check_interval={every} batches is not a whole number of optimizer steps of "
            f"trainer.accumulate_grad_batches={accumulate} batches: the validation's checkpoint would fall part-way "
            f"through a step and could not be resumed exactly. Use a multiple of {accumulate}."
        )
    # Checkpoints are written atomically and read without unpickling code (see minigpt/checkpoint_io.py).
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                   plugins=[AtomicCheckpointIO()])


class JobFailed(CompactHydraException):
    """A multirun job's error, printed by Hydra without a traceback once the other jobs have run."""


# Mistakes in the input and diverged runs: reported in one paragraph, not as a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NonFiniteLossError)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Lightning logs through its own handler unless told otherwise; send it to Hydra's console and train.log.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    try:
        return train(cfg)["val/loss_best"]  # the value a Hydra sweeper minimises
    except Exception as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        if not isinstance(cause, USER_ERRORS):
            raise  # a bug, not a bad input: keep the traceback
        log.error("%s", cause)  # into this job's train.log
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # An Exception lets Hydra run the other jobs; it reports the first failure and exits non-zero at the end.
            raise JobFailed(f"error: {cause}") from None
        raise SystemExit(f"error: {cause}") from None


if __name__ == "__main__":
    main()
