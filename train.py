"""Train a MiniGPT: python train.py [group=option ...] [key=value ...]  (python train.py --help lists them)."""

from __future__ import annotations

import time

LAUNCHED = time.perf_counter()  # before the imports below, which take seconds: part of the start-up a run reports

import logging  # noqa: E402
import math
import os
import sys
import traceback
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from minigpt.budget import apply_token_budget, processes_of
from minigpt.callbacks.divergence import NonFiniteLossError
from minigpt.callbacks.run_summary import global_batch
from minigpt.callbacks.startup import StartupTimes
from minigpt.callbacks.step_checkpoint import last_saved_step
from minigpt.checkpoint_io import AtomicCheckpointIO
from minigpt.checks import as_typed, is_number, is_whole
from minigpt.corpus import TokenFileChanged
from minigpt.data import WindowsDataModule
from minigpt.model import CAN_RUN_EAGERLY, check_compile, compile_model
from minigpt.module import OPTIMIZERS, MiniGPTModule
from minigpt.multirun import (
    JobFailed,
    JobProcessFailed,
    SweepDivergenceMarker,
    check_plugins,
    report_to_job,
    restarts_script,
    run_job_in_new_process,
    runs_for_a_job,
    sweep_score,
)
from minigpt.resume import (
    check_resumable,
    check_same_data,
    keep_validation_windows,
    resume_point,
    warn_of_changed_global_batch,
    warn_of_changed_settings,
    warn_of_changed_text,
)
from minigpt.run_folder import ckpt_path_arg, shown

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
# The other processes of a multi-process run (Lightning's re-runs of this script for ranks > 0, and every task but the
# first under torchrun or SLURM) write no .hydra folder and no log file, and log warnings only: rank zero writes the
# run's. Lightning reads the rank from the environment (RANK, LOCAL_RANK, SLURM_PROCID) when it is imported.
OmegaConf.register_new_resolver(
    "on_rank_zero", lambda value, otherwise: value if rank_zero_only.rank == 0 else otherwise, replace=True
)
# Lightning 2.6 advertises its cloud logger each time a Trainer starts: not news about the run.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "litlogger" not in str(record.msg))
# The training stream is an endless iterable that builds whole batches by one gather: workers would only add overhead.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
# Raised inside Lightning 2.6 by newer PyTorch (the second by its all_gather under DDP); nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
warnings.filterwarnings("ignore", message=r".*torch.distributed.nn.functional.all_gather is deprecated.*")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model as `cfg` says and return the final metrics, with `val/loss_best` for sweeps.

    With `cfg.ckpt_path`, the run resumes from that checkpoint (or a run folder's last.ckpt) and, when the
    checkpoint lies in a run folder, continues in that folder: `cfg.run_dir` is pointed at it.
    """
    startup = StartupTimes(take_launch_time(), compiled=cfg.compile is not False)
    startup.mark("imports")  # and composing the config
    check_compile(cfg.compile)
    if not is_whole(cfg.seed):
        raise ValueError(f"seed must be a whole number, got {as_typed(cfg.seed)}")
    if is_whole(cfg.data.block_size) and is_whole(cfg.model.block_size) and cfg.data.block_size > cfg.model.block_size:
        raise ValueError(
            f"data.block_size={cfg.data.block_size} is longer than the model's context, model.block_size="
            f"{cfg.model.block_size}: data.block_size follows model.block_size by default. Leave "
            f"data.block_size out, or (in a new run) set model.block_size={cfg.data.block_size} instead."
        )
    if cfg.data.get("tokens_per_step") is not None or cfg.get("tokens") is not None:  # a budget in tokens (pretrain)
        apply_token_budget(cfg, processes_of(planned_strategy(cfg)))
    L.seed_everything(cfg.seed, workers=True)
    ckpt_file, checkpoint = resume_point(cfg)  # a damaged or unsafe checkpoint fails here, before any output
    if checkpoint is None:  # a resumed run has said where it writes
        log.info("Run folder: %s", shown(cfg.run_dir))
    else:
        check_same_data(cfg, checkpoint, ckpt_file)
        warn_of_changed_settings(cfg, checkpoint)
        keep_validation_windows(cfg, checkpoint)
    datamodule: WindowsDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")  # the tokenizer, and so the model's size, comes from the text

    module = make_module(cfg, datamodule)
    if checkpoint is not None:
        check_resumable(checkpoint, module, ckpt_file)
        warn_of_changed_text(checkpoint, datamodule)
    # in place: parameter names, and so checkpoints, stay free of `_orig_mod.`
    compile_model(module.model, cfg.compile, cfg.compile_mode)  # compiles lazily, in the first step
    if cfg.compile is not False and not CAN_RUN_EAGERLY:  # the model summary's pass of one window would compile
        module.example_input_array = None  # a graph of its own
    startup.mark("data and model")

    callbacks, loggers = make_callbacks_and_loggers(cfg, None if checkpoint is None else checkpoint["global_step"])
    if runs_for_a_job():  # a multirun job run in a process of its own (run_job_in_new_process)
        callbacks.append(SweepDivergenceMarker())
    trainer = make_trainer(cfg, callbacks + [startup], loggers)
    if cfg.scheduler.get("warmup_steps", 0) >= trainer.max_steps:
        log.warning(
            "scheduler.warmup_steps=%d is not below trainer.max_steps=%d: the learning rate never reaches its peak",
            cfg.scheduler.warmup_steps,
            trainer.max_steps,
        )
    if checkpoint is not None:
        warn_of_changed_global_batch(checkpoint, trainer)
    if checkpoint is not None and checkpoint["global_step"] >= trainer.max_steps:  # before anything is written
        raise ValueError(
            f"ckpt_path={ckpt_file} is at step {checkpoint['global_step']}, and trainer.max_steps="
            f"{trainer.max_steps}: there is nothing left to train. Give a larger trainer.max_steps to "
            "train on (the learning-rate schedule then spans the new length), or sample from it with "
            "sample.py."
        )
    log_global_batch(cfg, trainer, loggers, module)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_file) if ckpt_file else None, weights_only=True)
    except SystemExit:  # Lightning's answer to Ctrl-C: it shuts down and exits; say where the run can go on from
        if trainer.interrupted:
            saved = max(last_saved_step(trainer), checkpoint["global_step"] if checkpoint is not None else 0)
            if saved:
                log.info(
                    "Interrupted at step %d; the last checkpoint is from step %d. Resume with: python train.py "
                    "%s (and the same settings)",
                    trainer.global_step,
                    saved,
                    ckpt_path_arg(shown(cfg.run_dir)),
                )
            else:
                log.info(
                    "Interrupted at step %d, before the run saved a checkpoint: there is nothing to resume. "
                    "Start again in a new folder (or delete %s first)",
                    trainer.global_step,
                    shown(cfg.run_dir),
                )
        raise

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics["val/loss_best"] = module.best_val_loss  # this fit's validations and those before its checkpoint
    metrics["step"] = trainer.global_step
    latest = f"val/loss {metrics['val/loss']:.4f}" if "val/loss" in metrics else "no validation in this process"
    log.info(
        "Finished at step %d: %s, best val/loss %.4f. Run folder: %s",
        trainer.global_step,
        latest,
        metrics["val/loss_best"],
        shown(cfg.run_dir),
    )
    if trainer.checkpoint_callbacks:
        log.info("Generate text from it: python sample.py %s", ckpt_path_arg(shown(cfg.run_dir)))
    return metrics


def make_module(cfg: DictConfig, datamodule: WindowsDataModule) -> MiniGPTModule:
    """The LightningModule for `cfg`'s model, optimizer and schedule, sized by the data module's tokenizer."""
    return MiniGPTModule(
        **datamodule.tokenizer.hparams(),  # the character vocabulary, or the BPE's JSON
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
    )


def make_callbacks_and_loggers(cfg: DictConfig, resumed_step: int | None = None) -> tuple[list, list]:
    """`cfg.callbacks` and `cfg.logger`, instantiated; an entry set to null (as experiments do to drop one) is skipped.

    A run resumed from a checkpoint at `resumed_step` has its loggers hide what a killed run logged after it, so the
    curve has no repeats (the values at the checkpoint's own step, its validation and the loss of the batch that made
    it, came before it).
    """
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    purge = {"purge_step": resumed_step + 1} if resumed_step is not None else {}
    loggers = [
        hydra.utils.instantiate(c, **(purge if c._target_.endswith(("TensorBoardLogger", "CSVLogger")) else {}))
        for c in (cfg.get("logger") or {}).values()
        if c is not None
    ]
    if not loggers:  # logger=none: the learning-rate monitor has nowhere to write and would refuse to start
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks, loggers


def take_launch_time() -> float:
    """When train.py started, for the first run of this process; now, for the next ones (a multirun's next job)."""
    global LAUNCHED
    launched, LAUNCHED = (LAUNCHED if LAUNCHED is not None else time.perf_counter()), None
    return launched


def log_global_batch(cfg: DictConfig, trainer: L.Trainer, loggers: list, module: MiniGPTModule) -> None:
    """Say how many windows and tokens one optimizer step learns from, over every device and node, and record it
    with the module's settings."""
    batch = global_batch(trainer, cfg.data.batch_size, cfg.data.block_size)
    log.info(
        "Global batch: %d windows per device x %d accumulated x %d devices x %d nodes = %d windows of %d "
        "tokens, %d tokens per optimizer step",
        cfg.data.batch_size,
        trainer.accumulate_grad_batches,
        trainer.num_devices,
        trainer.num_nodes,
        batch["windows"],
        cfg.data.block_size,
        batch["tokens"],
    )
    for logger in loggers:  # hparams.yaml and the HParams tab
        logger.log_hyperparams({**module.settings, "global_batch": batch})


def make_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    check_torchrun_processes(cfg.trainer)
    if cfg.trainer.accelerator in ("gpu", "cuda"):
        check_gpus(cfg.trainer)
    elif cfg.trainer.accelerator == "cpu":
        check_cpu_processes(cfg.trainer)
    for key, unit in (
        ("max_steps", "optimizer steps"),
        ("accumulate_grad_batches", "batches"),
        ("val_check_interval", "batches"),
        ("log_every_n_steps", "optimizer steps"),
    ):
        value = cfg.trainer.get(key, None if key == "max_steps" else 1)  # a run of one endless epoch needs max_steps
        if not (is_whole(value) and value > 0):
            raise ValueError(f"trainer.{key} must be a positive whole number of {unit}, got {as_typed(value)}")
    every, accumulate = cfg.trainer.val_check_interval, cfg.trainer.get("accumulate_grad_batches", 1)
    if every % accumulate:
        raise ValueError(
            f"trainer.val_check_interval={every} batches is not a whole number of optimizer steps of "
            f"trainer.accumulate_grad_batches={accumulate} batches: the validation's checkpoint would fall part-way "
            f"through a step and could not be resumed exactly. Use a multiple of {accumulate}."
        )
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None and not (is_number(clip) and clip >= 0):
        raise ValueError(
            f"trainer.gradient_clip_val must be a norm >= 0 (0 or null: no clipping), got {clip!r}: "
            "a negative one turns the gradients around"
        )
    if every > cfg.trainer.max_steps * accumulate:
        log.warning(
            "trainer.val_check_interval=%d batches is beyond trainer.max_steps=%d: this run will never "
            "validate, so it reports no val/loss and keeps no best checkpoint",
            every,
            cfg.trainer.max_steps,
        )
    # Lightning adds a checkpoint callback and a progress bar (counting epochs) of its own unless told not to: a run
    # whose config drops them (callbacks=none, the speed runs, ~callbacks.progress_bar) has none.
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    progress_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    # Checkpoints are written atomically and read without unpickling code (see minigpt/checkpoint_io.py).
    return hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        enable_checkpointing=checkpointing,
        enable_progress_bar=progress_bar,
    )


def check_torchrun_processes(trainer: DictConfig) -> None:
    """Under torchrun, which starts every process itself, trainer.devices and num_nodes must say how many it
    started; Lightning finds out only once training starts, and without saying which settings to give."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        return
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = int(os.environ.get("WORLD_SIZE", per_node)) // per_node
    devices, num_nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    # devices=-1 (every GPU) or auto: Lightning counts them and compares
    if num_nodes != nodes or (is_whole(devices) and devices > 0 and devices != per_node):
        raise ValueError(
            f"torchrun started {per_node} processes per node on {nodes} node(s), which trainer.devices="
            f"{devices} trainer.num_nodes={num_nodes} do not match: give trainer.devices={per_node} "
            f"trainer.num_nodes={nodes} (torchrun's --nproc-per-node and --nnodes)"
        )


def check_cpu_processes(trainer: DictConfig) -> None:
    """On the CPU, trainer.devices is how many processes to start: a whole number; more than the cores is slower."""
    devices = trainer.get("devices", 1)
    if devices == "auto":
        return
    if not (is_whole(devices) and devices > 0):
        raise ValueError(
            f"trainer.devices={as_typed(devices)}: on the CPU it is how many processes train (one, or "
            "with trainer=ddp_cpu several, 2 by default), a whole number of at least 1; -1 (every "
            "device) is for GPUs"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if devices > cores:
        log.warning(
            "trainer.devices=%d CPU processes on %d cores: they share them, each slower than one process "
            "alone would be (trainer.devices=%d or fewer)",
            devices,
            cores,
            cores,
        )


def check_gpus(trainer: DictConfig) -> None:
    """Refuse a GPU trainer on a machine without GPUs, or one that asks for more GPUs than PyTorch sees."""
    available, devices = torch.cuda.device_count(), trainer.devices
    if not available:
        raise ValueError(
            f"trainer.accelerator={trainer.accelerator} asks for a GPU, but PyTorch sees none (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Train on the CPU with trainer=cpu (or "
            "trainer=default, which picks the best device there is); trainer=ddp_cpu tries DDP with CPU processes."
        )
    wanted = len(devices) if OmegaConf.is_list(devices) else devices
    if isinstance(wanted, int) and wanted > available:
        raise ValueError(
            f"trainer.devices={devices} asks for {wanted} GPUs, but PyTorch sees {available} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Use trainer.devices=-1 for "
            f"every GPU there is, or at most {available}; several machines take trainer.num_nodes (README: Scaling out)."
        )


def planned_strategy(cfg: DictConfig) -> Strategy:
    """The strategy (DDP, single device, ...) that the run's Trainer will have, found without the Trainer's messages:
    the run's own Trainer says them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.INFO)
        try:
            return make_trainer(cfg, [], []).strategy
        finally:
            logging.disable(logging.NOTSET)


# Mistakes in the input, diverged runs and data changed under a run: reported in one paragraph, not as a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NonFiniteLossError, JobProcessFailed, TokenFileChanged)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # Lightning logs through its own handler unless told otherwise; send it to Hydra's console and train.log.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
        logging.getLogger(name).setLevel(logging.NOTSET)  # the root's level: INFO, or WARNING on ranks > 0
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN and cfg.ckpt_path:
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path} in a multirun: a resumed run goes on in its own folder, so "
                "every job would continue the same run and overwrite each other's checkpoints. Resume "
                "one run at a time: python train.py ckpt_path=<run folder>."
            )
        choice = HydraConfig.get().runtime.choices.get("optimizer")
        if choice in OPTIMIZERS and cfg.optimizer.name != choice:  # the signature check passes AdamW's own settings
            raise ValueError(
                f"optimizer.name={cfg.optimizer.name} renames optimizer={choice} and keeps its settings "
                f"(lr {cfg.optimizer.lr}, ...): choose optimizer={cfg.optimizer.name}, which brings its own."
            )
        if HydraConfig.get().mode == RunMode.MULTIRUN and restarts_script(planned_strategy(cfg)):
            return run_job_in_new_process(HydraConfig.get(), Path(__file__).resolve())
        metrics = train(cfg)
        report_to_job(metrics)
        return sweep_score(metrics["val/loss_best"])
    except Exception as err:
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        if not isinstance(cause, USER_ERRORS):  # a bug, not a bad input: keep the traceback, in train.log too
            write_to_log_files(f"The run failed:\n{traceback.format_exc().rstrip()}")
            raise
        message = user_message(cause)
        write_to_log_files(message)  # into this job's train.log; the console gets `error:` below
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            if isinstance(cause, NonFiniteLossError):  # an outcome, not a mistake: the sweep goes on and ranks it last
                print(f"error: {message} In this sweep the job scores inf.", file=sys.stderr)
                return math.inf
            # An Exception lets Hydra run the other jobs; it reports the first failure and exits non-zero at the end.
            raise JobFailed(f"error: {message}") from None
        raise SystemExit(f"error: {message}") from None


def write_to_log_files(message: str) -> None:
    """Write `message` as an error to the log files (train.log) only: the console shows the error its own way."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None))


def user_message(err: BaseException) -> str:
    """The error's own message. Raised in a DataLoader worker, it comes back with the worker's traceback in front
    (PyTorch's ExceptionWrapper): that part is dropped, the last line, `<module>.<class>: <message>`, kept."""
    message = str(err)
    if "Original Traceback" in message:
        message = message.rsplit(f"{type(err).__name__}: ", 1)[-1].strip()
    return message


if __name__ == "__main__":
    check_plugins(sys.argv[1:])
    main()
