"""Where the lesson's own loop ends: its MiniGPT trained for the recipe's 5000 steps, validated as minigpt does.

    python benchmarks/lesson_quality.py [--steps 5000] [--lr 3e-4] [--threads 1]

The faithful re-implementation in benchmarks/lesson.py (hand-written attention, Python-stacked batches drawn
with the global RNG, int64 text) trained with the lesson's optimiser as PyTorch builds it by default: AdamW
(betas 0.9/0.999, weight decay 0.01 on every tensor), cosine annealing to 0 over the run without warmup,
gradient clipping at 1.0. Every 500 steps it reports the mean training loss since the last report and the
validation loss on the same 320 fixed windows as `python train.py` (data.val_batches=10) and on the whole
validation split, so the numbers compare directly with a minigpt run. Appends its table to RESULTS.md.
The run takes about 20 minutes on a 2-core CPU; the loss does not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lesson import LessonGPT, lesson_batch  # noqa: E402
from benchmarks.report import append_results, machine_summary  # noqa: E402
from minigpt.data import TextDataModule, windows  # noqa: E402


@torch.no_grad()
def mean_loss(model: LessonGPT, xy: tuple[torch.Tensor, torch.Tensor], batch_size: int = 64) -> float:
    model.eval()
    x, y = xy
    total = sum(
        model(x[i : i + batch_size].long(), y[i : i + batch_size].long()).item() * len(x[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    )
    model.train()
    return total / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--every", type=int, default=500, help="steps between validations")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    block_size, batch_size = 128, 32
    data = TextDataModule(block_size=block_size, batch_size=batch_size, val_batches=10, seed=args.seed)
    data.prepare_data()
    data.setup("fit")
    fixed = data.val_set.tensors  # the windows `python train.py` validates on
    whole = windows(data.val_tokens, torch.arange(0, len(data.val_tokens) - block_size, block_size), block_size)

    torch.manual_seed(args.seed)
    model = LessonGPT(data.tokenizer.vocab_size, block_size=block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
    train_tokens = data.train_tokens.long()
    rows = [
        "| step | train loss (mean of the last steps) | val/loss, 320 fixed windows | val/loss, whole split | s |",
        "|---|---|---|---|---|",
    ]
    start, running = time.perf_counter(), 0.0
    for step in range(1, args.steps + 1):
        x, y = lesson_batch(train_tokens, batch_size, block_size, torch.device("cpu"))
        loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % args.every == 0 or step == args.steps:
            rows.append(
                f"| {step} | {running / (step % args.every or args.every):.4f} | {mean_loss(model, fixed):.4f} | "
                f"{mean_loss(model, whole):.4f} | {time.perf_counter() - start:.0f} |"
            )
            running = 0.0
            print(rows[-1], flush=True)
    append_results(
        args.results,
        f"The lesson's own loop: val/loss after {args.steps} steps at lr {args.lr:g}",
        " ".join(sys.argv),
        machine_summary("cpu"),
        "\n".join(rows),
    )


if __name__ == "__main__":
    main()
