"""Train a MiniGPT: python train.py [group=option ...] [key=value ...]  (python train.py --help lists them)."""

import time

LAUNCHED = time.perf_counter()  # before the imports below, which take seconds: part of the start-up a run reports

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from minigpt import config, multirun, resume, schema  # noqa: E402  (config registers the resolvers the YAML files use)
from minigpt.budget import apply_token_budget  # noqa: E402
from minigpt.build import (  # noqa: E402
    log_global_batch,
    make_callbacks_and_loggers,
    make_module,
    make_trainer,
    planned_strategy,
)
from minigpt.callbacks.startup import StartupTimes  # noqa: E402
from minigpt.errors import reported  # noqa: E402
from minigpt.model import compile_model  # noqa: E402
from minigpt.run_folder import ckpt_path_arg, shown  # noqa: E402

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit a model as `cfg` says and return the final metrics, with `val/loss_best` for sweeps.

    With `cfg.ckpt_path`, the run resumes from that checkpoint (or a run folder's last.ckpt) and, when the
    checkpoint lies in a run folder, continues in that folder: `cfg.run_dir` is pointed at it.
    """
    startup = StartupTimes(take_launch_time(), compiled=cfg.compile is not False)
    startup.mark("imports")  # and composing the config
    schema.check(cfg, schema.Train)  # types first: the token budget computes with them
    apply_token_budget(cfg)  # where the run's length and batch are given in tokens (experiment=pretrain)
    config.validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    ckpt_file, checkpoint = resume.resume_point(cfg)  # a damaged or unsafe checkpoint fails here, before any output
    if checkpoint is None:  # a resumed run has said where it writes
        log.info("Run folder: %s", shown(cfg.run_dir))
    else:
        resume.check_data_and_settings(cfg, checkpoint, ckpt_file)

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")  # the tokenizer, and so the model's size, comes from the text
    module = make_module(cfg, datamodule)
    compile_model(module.model, cfg.compile, cfg.compile_mode)  # in place, lazily: compiles in the first step
    startup.mark("data and model")

    callbacks, loggers = make_callbacks_and_loggers(cfg, None if checkpoint is None else checkpoint["global_step"])
    if multirun.runs_for_a_job():  # a multirun job run in a process of its own (run_job_in_new_process)
        callbacks.append(multirun.SweepDivergenceMarker())
    trainer = make_trainer(cfg, callbacks + [startup], loggers)
    if checkpoint is not None:
        resume.check_run(checkpoint, ckpt_file, module, datamodule, trainer)
    log_global_batch(cfg, trainer, loggers, module)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_file) if ckpt_file else None, weights_only=True)
    except SystemExit:  # Lightning's answer to Ctrl-C: it shuts down and exits; say where the run can go on from
        if trainer.interrupted:
            resume.say_where_to_resume(trainer, checkpoint, cfg.run_dir)
        raise

    return finished(trainer, module, cfg.run_dir)


def finished(trainer: L.Trainer, module: L.LightningModule, run_dir: str) -> dict[str, float]:
    """The run's final metrics, with `val/loss_best` and `step`, said on the console with where the run is."""
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    metrics["val/loss_best"] = module.best_val_loss  # this fit's validations and those before its checkpoint
    metrics["step"] = trainer.global_step
    latest = f"val/loss {metrics['val/loss']:.4f}" if "val/loss" in metrics else "no validation in this process"
    best = metrics["val/loss_best"]
    log.info(
        "Finished at step %d: %s, best val/loss %.4f. Run folder: %s", trainer.global_step, latest, best, shown(run_dir)
    )
    if trainer.checkpoint_callbacks:
        log.info("Generate text from it: python sample.py %s", ckpt_path_arg(shown(run_dir)))
    return metrics


def take_launch_time() -> float:
    """When train.py started, for the first run of this process; now, for the next ones (a multirun's next job)."""
    global LAUNCHED
    launched, LAUNCHED = (LAUNCHED if LAUNCHED is not None else time.perf_counter()), None
    return launched


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@reported
def main(cfg: DictConfig) -> float:
    config.quiet_known_noise()
    if HydraConfig.get().mode == RunMode.MULTIRUN and multirun.restarts_script(planned_strategy(cfg)):
        return multirun.run_job_in_new_process(HydraConfig.get(), Path(__file__).resolve())
    metrics = train(cfg)
    multirun.report_to_job(metrics)
    return multirun.sweep_score(metrics["val/loss_best"])


if __name__ == "__main__":
    multirun.check_plugins(sys.argv[1:])
    main()
