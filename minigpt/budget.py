"""A run's global batch and length in tokens: `data.tokens_per_step` and `tokens` turned into the Trainer's
`accumulate_grad_batches`, `max_steps` and `val_check_interval` for the number of processes that train.

nanoGPT and GPT-2 state the batch in tokens (~0.5 M per optimizer step) whatever the hardware: one GPU reaches it
by accumulating many micro-batches, 32 GPUs by accumulating few. Here the same config runs anywhere and each
optimizer step learns from the same tokens.
"""

from __future__ import annotations

import logging
import math

from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig

from minigpt.build import planned_strategy

log = logging.getLogger(__name__)


def processes_of(strategy: Strategy) -> int:
    """How many processes train under `strategy`: devices per node x nodes (1 for a single device)."""
    return len(getattr(strategy, "parallel_devices", None) or [None]) * getattr(strategy, "num_nodes", 1)


def apply_token_budget(cfg: DictConfig, processes: int | None = None) -> None:
    """Set `cfg.trainer`'s accumulation, length and validation interval from the token budget, if the config has one,
    for `processes` (by default, as many as its trainer will train in)."""
    per_step, tokens = cfg.data.get("tokens_per_step"), cfg.get("tokens")
    if per_step is None:
        if tokens is not None:
            raise ValueError(f"tokens={tokens} counts optimizer steps of data.tokens_per_step tokens: set that too")
        return
    processes = processes or processes_of(planned_strategy(cfg))
    batch, block = cfg.data.batch_size, cfg.data.block_size
    micro = batch * block * processes  # tokens of one micro-batch over every process
    if per_step <= 0 or per_step % micro:
        fits = [per_step // micro * micro, (per_step // micro + 1) * micro]
        raise ValueError(
            f"data.tokens_per_step={per_step} is not a whole number of micro-batches of data.batch_size="
            f"{batch} x data.block_size={block} tokens x {processes} process(es) (devices x nodes) = {micro} tokens: "
            f"give a multiple of {micro} (e.g. {' or '.join(str(f) for f in fits if f > 0)}) or another "
            "data.batch_size"
        )
    accumulate = per_step // micro
    cfg.trainer.accumulate_grad_batches = accumulate
    if tokens is not None:
        if not tokens > 0:
            raise ValueError(f"tokens is the run's length in tokens, e.g. tokens=1e9; got {tokens!r}")
        cfg.trainer.max_steps = math.ceil(tokens / per_step)
    if cfg.get("val_every_n_steps") is not None:  # Lightning counts validation in batches, not optimizer steps
        cfg.trainer.val_check_interval = cfg.val_every_n_steps * accumulate
    log.info(
        "Token budget: %d tokens per optimizer step = %d windows of %d tokens per device x %d process(es) x %d "
        "accumulated; %d optimizer steps, %.3g tokens",
        per_step,
        batch,
        block,
        processes,
        accumulate,
        cfg.trainer.max_steps,
        cfg.trainer.max_steps * per_step,
    )
