"""A run's folder: naming it back to the user, and refusing to start a new run in one that already holds a run.

A second run in a used folder would overwrite the first one's checkpoints, and TensorBoard, the loss curve and the
sweep report would read both runs' events as one. Hydra writes the run's `.hydra` record into the folder before
the task starts, so the check is a Hydra callback (conf/train.yaml, `hydra.callbacks`), which runs before that.
It also locks the folder while the run writes it: two runs started in the same second get the same dated folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from hydra.core.override_parser.types import Quote, QuotedString
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from minigpt.checkpoint import find_checkpoint, run_folder_of

# What a run leaves that a second run in its folder would overwrite or mix with its own
RUN_OUTPUTS = ("checkpoints/*.ckpt", "tensorboard/events.out.tfevents.*", "csv/metrics.csv")


def hydra_value(text: str) -> str:
    """`text` as an override's value that Hydra reads back unchanged: quoted (by Hydra's own rules) unless it holds
    only path characters. A multirun job's folder name holds `=` and `,`, which its grammar takes for syntax."""
    return text if re.fullmatch(r"[\w./:+-]+", text) else QuotedString(text=text, quote=Quote.double).with_quotes()


def ckpt_path_arg(path: str) -> str:
    """`ckpt_path=<path>` as one shell word, to print in a command for the user to run."""
    return shlex.quote(f"ckpt_path={hydra_value(path)}")


def shown(path: str) -> str:
    """`path` as a user would type it here: relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def run_outputs(folder: Path) -> list[Path]:
    """The checkpoints, event files and metrics an earlier run left in `folder`."""
    return sorted(p for pattern in RUN_OUTPUTS for p in folder.glob(pattern))


def claim(folder: Path, key: str) -> int | None:
    """Take `folder` for this process, or refuse if another process has it. The lock (flock on the folder itself:
    nothing is written) lasts while the returned descriptor stays open, and ends with the process however it ends."""
    if folder.exists() and not folder.is_dir():
        raise SystemExit(
            f"error: {key}={shown(str(folder))} is a file, not a folder: give a folder for the run to "
            "write to (or leave it out for a new dated one)."
        )
    if fcntl is None:  # Windows: not checked
        return None
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise SystemExit(
            f"error: {key}={shown(str(folder))} is being written by another run that is still going on this machine "
            "(two runs started in the same second get the same dated folder). Start this one in another folder, or "
            "once the other has finished."
        ) from None
    return descriptor


def refuse_used(folder: Path, only_checkpoints: bool = False) -> None:
    """Refuse a new run in `folder` if an earlier run left its outputs there (with `only_checkpoints`, checkpoints)."""
    found = [p for p in run_outputs(folder) if p.suffix == ".ckpt" or not only_checkpoints]
    if not found:
        return
    where = shown(str(folder))
    listed = ", ".join(shown(str(p)) for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    # SystemExit: Hydra turns an Exception raised in a callback into a warning and goes on
    if any(p.suffix == ".ckpt" for p in found):
        harm = "would overwrite its checkpoints and mix its curves with the new run's"
        resume = f"Resume that run with: python train.py {ckpt_path_arg(where)} (and its settings), or start"
    else:  # stopped before its first checkpoint (diverged, interrupted): nothing to resume
        harm = "would mix its curves with the new run's (it saved no checkpoint, so it cannot be resumed)"
        resume = "Start"
    raise SystemExit(
        f"error: hydra.run.dir={where} already holds a run ({listed}): a new one there {harm}. {resume} the new "
        f"one in another folder (another hydra.run.dir, or none for a new dated one), or delete {where} first."
    )


class RefuseUsedRunFolder(Callback):
    """Refuse a new run (not a resume) or multirun whose folder already holds a run or is being written by another."""

    def __init__(self) -> None:
        self.locks: dict[Path, int] = {}  # the folders this process holds, and their locks

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:
            # Rank zero holds the folder, and may have begun to write it: a DDP run's other ranks are started with
            # its folder, or (torchrun, srun) start beside it. Checkpoints are the one thing rank zero cannot have
            # written yet, as it trains only with them: a folder that holds some is an earlier run's (a requeued
            # SLURM job's), which rank zero refuses too, and these ranks would wait for it until DDP's timeout.
            if not config.get("ckpt_path"):
                refuse_used(Path(config.hydra.run.dir), only_checkpoints=True)
            return
        try:
            self.check_run_folder(config)
        except BaseException:  # refused: the locks go now, not when this process ends
            self.release()
            raise

    def check_run_folder(self, config: DictConfig) -> None:
        folder = Path(config.hydra.run.dir)
        self.hold(folder, "hydra.run.dir")
        if config.get("ckpt_path"):  # a resumed run: it also writes to its checkpoint's run folder
            with contextlib.suppress(FileNotFoundError, ValueError):  # the run says what is wrong with the path
                if (resumed := run_folder_of(find_checkpoint(config.ckpt_path, prefer="last"))) is not None:
                    self.hold(resumed, "ckpt_path")
            record = config.hydra.output_subdir  # null: this process writes no record (a DDP sweep job's)
            if record and (folder / record).is_dir():  # e.g. hydra.run.dir=<the run's own folder>
                where = shown(str(folder))
                raise SystemExit(
                    f"error: hydra.run.dir={where} holds a run's record ({record}), which this resumed run's own "
                    "record would replace: a resumed run writes its settings and train.log to a folder of its own "
                    "and goes on writing checkpoints and curves in its checkpoint's run folder. Give the resume "
                    f"another hydra.run.dir (e.g. {where}-resumed; under torchrun or srun, the same for every "
                    "process), or none for a new dated one."
                )
            return
        refuse_used(folder)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # under torchrun or srun every process runs the sweep: rank zero checks
            return
        sweep = Path(config.hydra.sweep.dir)
        self.hold(sweep, "hydra.sweep.dir")
        jobs = [job for job in sorted(sweep.iterdir()) if job.is_dir() and run_outputs(job)] if sweep.is_dir() else []
        if jobs:
            where = shown(str(sweep))
            raise SystemExit(
                f"error: hydra.sweep.dir={where} already holds the runs of {len(jobs)} jobs (checkpoints, events or "
                f"metrics.csv in {jobs[0].name}{' and others' if len(jobs) > 1 else ''}): a new sweep there "
                "would overwrite them and mix their curves with its own. Start it in another folder (another "
                f"hydra.sweep.dir, or none for a new dated one), or delete {where} first."
            )

    def hold(self, folder: Path, key: str) -> None:
        folder = folder.resolve()
        if folder not in self.locks and (lock := claim(folder, key)) is not None:
            self.locks[folder] = lock

    def release(self, *args: Any, **kwargs: Any) -> None:
        while self.locks:
            os.close(self.locks.popitem()[1])

    on_run_end = on_multirun_end = release
