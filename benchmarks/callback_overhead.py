"""What the see-inside-training callbacks cost: the lesson's recipe on this machine, with and without them.

    python -m benchmarks.callback_overhead [--steps 500] [--pairs 3] [--device cpu]

Runs `--steps` optimizer steps of experiment=seed (one validation at the end, as every 500 steps in the recipe)
alternately with the default callbacks and without the five that look inside (gradient_health, attention_maps,
text_samples, computation_graph, run_summary), and prints the medians of:
  - the training loop (first to last step, validation included): the steady cost, paid every 500 steps;
  - the whole fit, which adds the once-per-run costs (the graph at the start, the loss curve at the end).
Alternating runs in pairs cancels slow drifts of a shared machine; the medians ignore a disturbed run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import train

CONF = Path(__file__).resolve().parents[1] / "conf"
INSIDE = ["gradient_health", "attention_maps", "text_samples", "computation_graph", "run_summary"]


LOOP_SECONDS: list[float] = []


class LoopTimer(L.Callback):
    """Wall time from the first training step to the end of training: the last callback, so it starts after the
    others' on_train_start (the graph) and stops before their on_fit_end (the loss curve)."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        LOOP_SECONDS.append(time.perf_counter() - self.start)


def run(steps: int, device: str, inside: bool) -> tuple[float, float]:
    overrides = [
        "experiment=seed",
        f"trainer={device}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.enable_model_summary=false",
        "+trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "~callbacks.early_stopping",
    ]
    if not inside:
        overrides += [f"~callbacks.{name}" for name in INSIDE]
    overrides.append(f"+callbacks.loop_timer._target_={__name__}.LoopTimer")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as run_dir, open_dict(cfg):
        cfg.run_dir = run_dir
        start = time.perf_counter()
        train.train(cfg)
        fit = time.perf_counter() - start
    return LOOP_SECONDS[-1], fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()
    times = {True: [], False: []}
    for pair in range(args.pairs):
        for inside in (pair % 2 == 0, pair % 2 == 1):  # alternate which goes first
            times[inside].append(run(args.steps, args.device, inside))
            print(
                f"pair {pair}, callbacks {'on ' if inside else 'off'}: loop {times[inside][-1][0]:.2f} s, "
                f"fit {times[inside][-1][1]:.2f} s",
                flush=True,
            )
    for i, what in enumerate(["training loop", "whole fit"]):
        on = statistics.median(t[i] for t in times[True])
        off = statistics.median(t[i] for t in times[False])
        print(
            f"{what}: {off:.2f} s without, {on:.2f} s with the callbacks: {100 * (on / off - 1):+.1f}% "
            f"(median of {args.pairs}, {args.steps} steps)"
        )


if __name__ == "__main__":
    main()
