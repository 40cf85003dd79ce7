"""Multirun jobs (`python train.py -m ...`): the Hydra plugins a sweep needs, the score a job returns to the
sweeper, and DDP jobs, which run as single runs in processes of their own.

Lightning starts a DDP run's other ranks by running the script again with its arguments: under a multirun they
would each start the whole sweep again (Lightning issue #11300). Started as a single run with the job's overrides,
in the job's folder, the job starts its ranks the way `python train.py trainer=ddp` does, and reports its metrics
back through a file named by METRICS_FILE.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.strategies.launchers.subprocess_script import (
    _SubprocessScriptLauncher,
)  # private: no public name
from lightning.pytorch.utilities import rank_zero_only

from minigpt.callbacks.divergence import NonFiniteLossError
from minigpt.run_folder import hydra_value

log = logging.getLogger(__name__)

# The environment variable that names the file where a job run by run_job_in_new_process leaves its metrics.
METRICS_FILE = "MINIGPT_METRICS_FILE"
# Prefixes of Hydra overrides of the sweep, not of its jobs (hydra.sweep also hydra.sweeper): job_command drops them.
SWEEP_SETTINGS = tuple(
    "hydra.mode hydra/sweeper hydra/launcher hydra.launcher hydra.sweep hydra.run hydra.output_subdir".split()
)
# Config choices that need a Hydra plugin from one of the project's optional extras: (choice, plugin, extra).
PLUGINS = [
    ("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "search"),
    ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "search"),
    ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    ("hydra/launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm"),
]


class JobFailed(CompactHydraException):
    """A multirun job's error, printed by Hydra without a traceback once the other jobs have run."""


class JobProcessFailed(RuntimeError):
    """The new process that ran a multirun job as a run of its own failed; it has printed its own error."""


def sweep_score(best_val_loss: float) -> float:
    """What a sweeper minimises: the best val/loss, or inf for a run that never validated (Optuna refuses a nan)."""
    return best_val_loss if not math.isnan(best_val_loss) else math.inf


def is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is missing too
        return False


def check_plugins(args: list[str]) -> None:
    """Name the extra to install when the command line picks a sweeper or launcher whose plugin is missing, and
    refuse a SLURM launcher where SLURM is not: Hydra would say only that the config is not among the options it
    knows, and submitit would fail with a traceback after the sweep had started."""
    for arg in args:
        for choice, plugin, extra in PLUGINS:
            if arg.lstrip("+~").startswith(choice) and not is_installed(plugin):
                raise SystemExit(
                    f"error: {arg} needs the Hydra plugin {plugin.split('.')[-1]}, which is not installed. "
                    f'Install it with the project\'s extra: pip install -e ".[{extra}]"'
                )
        if arg in ("hydra/launcher=slurm", "hydra/launcher=submitit_slurm") and shutil.which("sbatch") is None:
            raise SystemExit(
                f"error: {arg} submits SLURM jobs with sbatch, which is not on this machine's PATH. Run "
                "it on the cluster's login node, or try the sweep here with hydra/launcher=submitit_local."
            )


def restarts_script(strategy: Strategy) -> bool:
    """Whether Lightning would start a run's other processes by running its script again (`trainer=ddp` on several
    devices, not under torchrun or SLURM, which start every process themselves)."""
    launcher = strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not strategy.cluster_environment.creates_processes_externally
    )


def job_command(job: HydraConfig, script: Path) -> list[str]:
    """`python <script>` with this multirun job's overrides, as a single run that writes to the job's folder."""
    command = [sys.executable, str(script), f"--config-name={job.job.config_name}"]
    command += [
        f"--config-dir={source.path}" for source in job.runtime.config_sources if source.provider == "command-line"
    ]
    command += [o for o in job.overrides.hydra if not o.lstrip("+~").startswith(SWEEP_SETTINGS)]
    # hydra.output_subdir=null keeps the job's .hydra (its overrides, for `minigpt.report`); both log to train.log.
    # hydra.mode=RUN: a config can ask for a multirun itself (hparams_search/*.yaml do).
    return command + [
        *job.overrides.task,
        f"hydra.run.dir={hydra_value(job.runtime.output_dir)}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",
    ]


def run_job_in_new_process(job: HydraConfig, script: Path) -> float:
    """Run this multirun job as a single run of `script` in a process of its own, and return its sweep score."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "metrics.json"
        log.info("Running this job as a run of its own in a new process, which starts the run's other processes")
        # a process group of its own (with the ranks it starts), which this process stops as a whole
        process = subprocess.Popen(
            job_command(job, script),
            cwd=job.runtime.cwd,
            start_new_session=True,
            env={**os.environ, METRICS_FILE: str(result)},
        )
        try:
            with stops_as_interrupts():  # a job out of reach of its terminal must hear of everything that ends us
                status = process.wait()
        except KeyboardInterrupt:  # Ctrl-C, SIGINT, SIGTERM or SIGHUP: the job gets SIGINT and time to stop
            stop_after_interrupt(process)
            raise SystemExit(
                f"Interrupted: the sweep stopped in the job of {job.runtime.output_dir}, whose last "
                "lines say where it can resume from"
            ) from None
        finally:  # whatever ended it: none of its processes outlives the job (a rank stuck in a collective)
            signal_group(process, SIGKILL)
        metrics = json.loads(result.read_text()) if result.is_file() else {}
    if status != 0 and metrics.get("diverged"):  # it printed its error; in a sweep a divergence is a result
        print("error: this job diverged (its error is above). In this sweep the job scores inf.", file=sys.stderr)
        return math.inf
    if status != 0:
        raise JobProcessFailed(
            f"this job's training process exited with status {status}: see its error above "
            f"and {job.runtime.output_dir}/train.log"
        )
    return sweep_score(metrics["val/loss_best"])


SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)


@contextlib.contextmanager
def stops_as_interrupts() -> Iterator[None]:
    """SIGTERM (as `timeout`, `kill` and schedulers send) and SIGHUP (a closed terminal) raise KeyboardInterrupt
    here, as Ctrl-C does; their own handlers come back after."""
    signals = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])  # no SIGHUP on Windows
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, signal.default_int_handler) for s in signals}  # which raises KeyboardInterrupt
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_after_interrupt(process: subprocess.Popen, grace: float = 60.0) -> None:
    """Interrupt a job's process group as Ctrl-C would and wait for it to shut down, as Lightning does (it logs where
    the run can resume from); kill the group after `grace` seconds or at a second Ctrl-C. (subprocess.run kills the
    job's process alone after a quarter second, leaving its DDP ranks to wait for it.)"""
    log.warning("Interrupted: waiting for the job to stop (Ctrl-C again kills it)")
    signal_group(process, signal.SIGINT)
    try:
        with stops_as_interrupts():
            process.wait(timeout=grace)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        signal_group(process, SIGKILL)
        process.wait()


def signal_group(process: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the process group `process` leads. Without process groups (Windows: not checked) the job
    shares the console, which gives it Ctrl-C itself: only a kill is sent, to the job's process."""
    if not hasattr(os, "killpg"):
        if sig == SIGKILL and process.poll() is None:
            process.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):  # it ended already (and its id may be reused)
        os.killpg(process.pid, sig)


def runs_for_a_job() -> bool:
    """Whether this run is a multirun job that run_job_in_new_process started in a process of its own."""
    return bool(os.environ.get(METRICS_FILE))


def write_job_result(result: dict) -> None:
    """Write `result` where the multirun job that started this process reads it (run_job_in_new_process)."""
    Path(os.environ[METRICS_FILE]).write_text(json.dumps(result))


def report_to_job(metrics: dict[str, float]) -> None:
    """Leave a finished run's metrics for the multirun job that started it (rank zero's, once)."""
    if runs_for_a_job() and rank_zero_only.rank == 0:
        write_job_result(metrics)


class SweepDivergenceMarker(Callback):
    """Tells the multirun job that started this run in a process of its own that the run diverged, as soon as it does:
    when one DDP rank has exited, Lightning's child-process observer may kill rank zero before its error unwinds."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError) and trainer.is_global_zero:
            write_job_result({"diverged": True})
