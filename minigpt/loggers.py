"""The run's loggers: Lightning's TensorBoard and CSV loggers, with each value at the optimizer steps done.

Lightning gives a logger the number of optimizer steps taken before the batch that produced a value (its
`_batches_that_stepped`): the loss of the batch that makes step 100 lands at 99, and so does the validation after
step 100, although its checkpoint is `step000100-...ckpt`, the console says "step 100" and the pictures of that
validation are at 100. These loggers add the step back, so that every axis counts the optimizer steps done when
the value was measured (the convention of Hugging Face's Trainer): a training loss at the step its gradients
made, a validation loss at the step of its checkpoint. They leave out the `epoch` Lightning adds to each write.

Whoever calls `log_metrics` directly passes a step in Lightning's count: `trainer.global_step` in a hook that runs
before the optimizer step (as gradient health does), `trainer.global_step - 1` after it.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch import loggers


class _StepsDone:
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # Lightning adds `epoch` to every write; a run is one endless epoch of random windows, so it is always 0
        metrics = {name: value for name, value in metrics.items() if name != "epoch"}
        if metrics:
            super().log_metrics(metrics, None if step is None else step + 1)


class TensorBoardLogger(_StepsDone, loggers.TensorBoardLogger):
    """Lightning's TensorBoardLogger, with each value at the optimizer steps done (see the module's docstring)."""


class CSVLogger(_StepsDone, loggers.CSVLogger):
    """Lightning's CSVLogger, with each value at the optimizer steps done (see the module's docstring)."""
