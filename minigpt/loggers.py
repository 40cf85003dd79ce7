"""The run's loggers count steps as optimizer steps done: one deliberate difference from Lightning, applied to
every logger of a run (TensorBoard, CSV, or any a user adds, e.g. `+logger.wandb=...`) by `count_steps_done`.

Lightning gives a logger the number of optimizer steps taken before the batch that produced a value: the loss of the
batch that makes step 100, and the validation after it, land at 99, although the checkpoint, the console and the
pictures say 100. Each logger adds the step back (as Hugging Face's Trainer counts), and leaves out the `epoch`
Lightning adds to each write (a run is one endless epoch).

Whoever calls `log_metrics` directly passes a step in Lightning's count: `trainer.global_step` in a hook that runs
before the optimizer step (as gradient health does), `trainer.global_step - 1` after it.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import loggers
from lightning.pytorch.loggers import Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from minigpt.atomic import atomic_write


def count_steps_done(logger: Logger) -> Logger:
    """`logger`, writing each value at the optimizer steps done (see above) and without Lightning's `epoch`."""
    log_metrics = logger.log_metrics

    def log_at_steps_done(metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = {name: value for name, value in metrics.items() if name != "epoch"}
        if metrics:
            log_metrics(metrics, None if step is None else step + 1)

    logger.log_metrics = log_at_steps_done  # also what the logger's own log_hyperparams(metrics) calls
    return logger


class CSVLogger(loggers.CSVLogger):
    """Lightning's CSVLogger that, given a `purge_step` as TensorBoard's logger is on a resume, keeps the earlier
    rows before that step: Lightning's writer deletes an existing metrics.csv when it starts."""

    def __init__(self, *args: Any, purge_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.purge_step = purge_step

    @property
    def experiment(self) -> Any:
        if self._experiment is not None or self.purge_step is None or rank_zero_only.rank != 0:
            return super().experiment
        file = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        kept = file.with_name(f".{file.name}.resumed")  # the rows wait here while Lightning's writer starts
        if file.is_file():  # the rows before purge_step, less one cut short (a kill in the middle of a write)
            with file.open(newline="") as f:
                reader = csv.DictReader(f)
                rows = [
                    row
                    for row in reader
                    if None not in row and None not in row.values() and row.get("step", "").isdigit()
                    if int(row["step"]) < self.purge_step
                ]
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=sorted(reader.fieldnames or []))  # as Lightning's writer sorts
            writer.writeheader()
            writer.writerows(rows)
            with atomic_write(kept) as f:
                f.write(text.getvalue().encode())
            file.unlink()
        with warnings.catch_warnings():  # "Previous log files in this directory will be deleted": not so here
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            experiment = super().experiment
        if kept.is_file():  # also one that a resume killed right here left behind
            with kept.open(newline="") as f:
                keys = next(csv.reader(f), [])
            os.replace(kept, file)
            experiment.metrics_keys = keys  # its header, which Lightning's writer appends under
        return experiment
