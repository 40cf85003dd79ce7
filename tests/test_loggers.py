"""Every logger of a run puts a value at the optimizer steps done, also one a user adds (W&B, MLflow, ...)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lightning.pytorch.loggers import Logger
from omegaconf import open_dict

import train
from minigpt.report import read_scalars


class StepRecorder(Logger):
    """A logger of the user's own, known to minigpt only through its config entry: it records each value's step."""

    steps: dict[str, list[int]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        for key in metrics:
            StepRecorder.steps[key].append(step)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_a_logger_a_user_adds_puts_values_at_the_same_steps_as_tensorboard(cfg_tiny):
    StepRecorder.steps.clear()
    with open_dict(cfg_tiny):
        cfg_tiny.logger.recorder = {"_target_": f"{__name__}.StepRecorder"}
    train.train(cfg_tiny)
    scalars = read_scalars(Path(cfg_tiny.run_dir) / "tensorboard")[0]
    for key in ("train/loss", "val/loss"):
        assert StepRecorder.steps[key] == scalars[key].steps, key
    assert scalars["val/loss"].steps == [20, 40]  # a validation at the step of its checkpoint (step000020-...ckpt)
    assert "epoch" not in StepRecorder.steps  # Lightning's epoch, always 0 in a run of one endless epoch
