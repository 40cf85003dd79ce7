"""How a run that fails says so: a mistake in the input, a diverged run or data changed under it is reported in one
paragraph (on the console and in train.log); a bug keeps its traceback, written to train.log too."""

from __future__ import annotations

import functools
import logging
import math
import sys
import traceback
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from minigpt.callbacks.divergence import NonFiniteLossError
from minigpt.corpus import TokenFileChanged
from minigpt.multirun import JobFailed, JobProcessFailed

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, NonFiniteLossError, JobProcessFailed, TokenFileChanged)


def reported(main: Callable[[DictConfig], float]) -> Callable[[DictConfig], float]:
    """Wrap a Hydra main so that user errors end the run with `error: <message>` instead of a traceback.

    In a multirun a failed job lets the sweep go on (Hydra reports the first failure at the end), and a diverged
    job scores inf, ranked last.
    """

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> float:
        try:
            return main(cfg)
        except Exception as err:
            cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
            if not isinstance(cause, USER_ERRORS):  # a bug, not a bad input: keep the traceback, in train.log too
                write_to_log_files(f"The run failed:\n{traceback.format_exc().rstrip()}")
                raise
            message = user_message(cause)
            write_to_log_files(message)  # into this job's train.log; the console gets `error:` below
            if HydraConfig.get().mode == RunMode.MULTIRUN:
                if isinstance(cause, NonFiniteLossError):  # an outcome, not a mistake: the sweep goes on
                    print(f"error: {message} In this sweep the job scores inf.", file=sys.stderr)
                    return math.inf
                raise JobFailed(f"error: {message}") from None
            raise SystemExit(f"error: {message}") from None

    return wrapper


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
