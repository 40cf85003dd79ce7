"""The run's configuration: the resolvers its YAML files use, and the checks of settings that no library makes.

minigpt/schema.py gives every setting its type, which OmegaConf checks; `validate` holds what no type states:
ranges, relations between settings, settings that a run measured in steps ignores, and process counts under
torchrun, each with a message that names the setting to give instead.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

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
# The other processes of a multi-process run (Lightning's re-runs of train.py for ranks > 0, and every task but the
# first under torchrun or SLURM) write no .hydra folder and no log file, and log warnings only. Lightning reads the
# rank from the environment (RANK, LOCAL_RANK, SLURM_PROCID) when it is imported.
OmegaConf.register_new_resolver(
    "on_rank_zero", lambda value, otherwise: value if rank_zero_only.rank == 0 else otherwise, replace=True
)


def quiet_known_noise() -> None:
    """Leave out messages a user can do nothing about."""
    # Lightning 2.6 advertises its cloud logger each time a Trainer starts: not news about the run.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in str(r.msg))
    # The training stream is an endless iterable that builds whole batches by one gather: workers would only add cost.
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    # Raised inside Lightning 2.6 by newer PyTorch (the second by its all_gather under DDP).
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*torch.distributed.nn.functional.all_gather is deprecated.*")


# Trainer settings counted in epochs, which a run of one endless epoch of random windows never finishes, and the
# batch limits of an epoch, which would restart its windows: each with what to use instead.
IN_STEPS = {
    "max_epochs": "trainer.max_steps (optimizer steps)",
    "min_epochs": "trainer.max_steps (optimizer steps)",
    "max_time": "trainer.max_steps (optimizer steps), or stop the run with Ctrl-C: it can be resumed",
    "limit_train_batches": "trainer.max_steps, or the debug group: debug=fdr, debug=smoke",
    "limit_val_batches": "data.val_batches (how many fixed validation batches)",
    "overfit_batches": "data.train_fraction or a small data.path text",
}


def validate(cfg: DictConfig) -> None:
    """Refuse what OmegaConf, Hydra and Lightning let through, before anything is written."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if multirun and cfg.ckpt_path:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path} in a multirun: a resumed run goes on in its own folder, so every job would "
            "continue the same run and overwrite each other's checkpoints. Resume one run at a time: python "
            "train.py ckpt_path=<run folder>."
        )
    choice = HydraConfig.get().runtime.choices.get("optimizer") if HydraConfig.initialized() else None
    if choice and choice != "null" and cfg.optimizer.name != choice:  # the module would pass AdamW's own settings on
        raise ValueError(
            f"optimizer.name={cfg.optimizer.name} renames optimizer={choice} and keeps its settings (lr "
            f"{cfg.optimizer.lr}, ...): choose optimizer={cfg.optimizer.name}, which brings its own."
        )
    if cfg.data.block_size > cfg.model.block_size:
        raise ValueError(
            f"data.block_size={cfg.data.block_size} is longer than the model's context, model.block_size="
            f"{cfg.model.block_size}: data.block_size follows model.block_size by default. Leave data.block_size "
            f"out, or (in a new run) set model.block_size={cfg.data.block_size} instead."
        )
    validate_trainer(cfg.trainer)
    if cfg.scheduler.warmup_steps >= cfg.trainer.max_steps:
        log.warning(
            "scheduler.warmup_steps=%d is not below trainer.max_steps=%d: the learning rate never reaches its peak",
            cfg.scheduler.warmup_steps,
            cfg.trainer.max_steps,
        )


def validate_trainer(trainer: DictConfig) -> None:
    for key, instead in IN_STEPS.items():
        if trainer.get(key) is not None:
            raise ValueError(
                f"trainer.{key}={trainer[key]}: a minigpt run is one endless epoch of random windows, counted in "
                f"steps, so {key} would be ignored or would repeat the same windows. Use {instead}."
            )
    # max_steps too: a run is one endless epoch, which Lightning's max_steps=-1 ("no limit") would never end
    for key, unit in (
        ("max_steps", "optimizer steps"),
        ("accumulate_grad_batches", "batches"),
        ("val_check_interval", "batches"),
        ("log_every_n_steps", "optimizer steps"),
    ):
        if trainer[key] <= 0:
            raise ValueError(f"trainer.{key} must be a positive whole number of {unit}, got {trainer[key]}")
    every, accumulate = trainer.val_check_interval, trainer.accumulate_grad_batches
    if every % accumulate:
        raise ValueError(
            f"trainer.val_check_interval={every} batches is not a whole number of optimizer steps of "
            f"trainer.accumulate_grad_batches={accumulate} batches: the validation's checkpoint would fall part-way "
            f"through a step and could not be resumed exactly. Use a multiple of {accumulate}."
        )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and clip < 0:
        raise ValueError(
            f"trainer.gradient_clip_val must be a norm >= 0 (0 or null: no clipping), got {clip!r}: a negative one "
            "turns the gradients around"
        )
    if every > trainer.max_steps * accumulate:
        log.warning(
            "trainer.val_check_interval=%d batches is beyond trainer.max_steps=%d: this run will never validate, so "
            "it reports no val/loss and keeps no best checkpoint",
            every,
            trainer.max_steps,
        )
    check_torchrun_processes(trainer)
    if trainer.accelerator in ("gpu", "cuda"):
        check_gpus(trainer)
    elif trainer.accelerator == "cpu":
        check_cpu_processes(trainer)


def check_torchrun_processes(trainer: DictConfig) -> None:
    """Under torchrun, which starts every process itself, trainer.devices and num_nodes must say how many it
    started; Lightning finds out only once training starts, and without saying which settings to give."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = int(os.environ.get("WORLD_SIZE", per_node)) // per_node
    devices, num_nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    # devices=-1 (every GPU) or auto: Lightning counts them and compares
    if num_nodes != nodes or (isinstance(devices, int) and devices > 0 and devices != per_node):
        raise ValueError(
            f"torchrun started {per_node} processes per node on {nodes} node(s), which trainer.devices={devices} "
            f"trainer.num_nodes={num_nodes} do not match: give trainer.devices={per_node} trainer.num_nodes={nodes} "
            "(torchrun's --nproc-per-node and --nnodes)"
        )


def check_cpu_processes(trainer: DictConfig) -> None:
    """On the CPU, trainer.devices is how many processes to start: a whole number; more than the cores is slower."""
    devices = trainer.get("devices", 1)
    if devices == "auto":
        return
    if not (isinstance(devices, int) and devices > 0):
        raise ValueError(
            f"trainer.devices={devices!r}: on the CPU it is how many processes train (one, or with "
            "trainer=ddp_cpu several, 2 by default), a whole number of at least 1; -1 (every device) is for GPUs"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if devices > cores:
        log.warning(
            "trainer.devices=%d CPU processes on %d cores: they share them, each slower than one process alone "
            "would be (trainer.devices=%d or fewer)",
            devices,
            cores,
            cores,
        )


def check_gpus(trainer: DictConfig) -> None:
    """Refuse a GPU trainer on a machine without GPUs: Lightning says only "No supported gpu backend found!"."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={trainer.accelerator} asks for a GPU, but PyTorch sees none (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Train on the CPU with trainer=cpu (or "
            "trainer=default, which picks the best device there is); trainer=ddp_cpu tries DDP with CPU processes."
        )
