"""Wall time from launching `python train.py ...` until its validation loss first reaches a target.

    python benchmarks/time_to_quality.py --target 1.88 experiment=nanogpt_cpu
    python benchmarks/time_to_quality.py --target 1.88 --seeds 1337,1,2 experiment=speedrun_cpu

The clock starts before the process is launched, so imports, data loading and compilation count. The run is
stopped once the target is reached. Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_results, machine_summary  # noqa: E402
from minigpt.callbacks.startup import PREFIX as STARTUP  # noqa: E402  (the run's own account of its start-up)

VALIDATION = re.compile(
    r"(?<!at )step (\d+): .*?val/loss (\d+\.\d+|nan)"
)  # each validation's console line, not "Finished at step"


def time_to_target(
    overrides: list[str], target: float, timeout: float
) -> tuple[float | None, list[tuple[float, int, float]], str, int]:
    """Seconds until val/loss <= target (None if never), the (seconds, step, val/loss) of each validation, the
    run's start-up line (imports, data and model, trainer set-up, first step) and its exit status (-9: stopped here)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "train.py", *overrides, "hydra.run.dir=outputs/benchmarks/${now:%Y-%m-%d_%H-%M-%S}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    history: list[tuple[float, int, float]] = []
    reached = None
    tail: list[str] = []
    startup = "not reported"
    try:
        for line in process.stdout:
            tail = (tail + [line])[-15:]
            if time.perf_counter() - start > timeout:
                break
            if STARTUP in line:
                startup = line[line.index(STARTUP) :].strip()
                print(f"  {startup}", flush=True)
            if match := VALIDATION.search(line):
                elapsed, step, loss = time.perf_counter() - start, int(match[1]), float(match[2])
                history.append((elapsed, step, loss))
                print(f"  {elapsed:6.1f} s  step {step:5d}  val/loss {loss:.4f}", flush=True)
                if loss <= target:
                    reached = elapsed
                    break
    finally:
        process.kill()
        status = process.wait()
    if reached is None:
        print("target not reached; the run's last lines:\n" + "".join(tail), flush=True)
    return reached, history, startup, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=1.88)
    parser.add_argument(
        "--reps", type=int, default=1, help="runs of the same command (same seed: same losses on a CPU)"
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, one run each (replaces --reps): "
        "how far the loss at a given time varies with the initialisation and the batches",
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--device", default="cpu", help="for the machine line of the report")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py")
    args = parser.parse_args()

    runs = (
        [[*args.overrides, f"seed={seed}"] for seed in args.seeds.split(",")]
        if args.seeds
        else [args.overrides] * args.reps
    )
    times, last_history, stops, failed = [], [], [], 0
    for rep, overrides in enumerate(runs):
        print(f"rep {rep}: python train.py {' '.join(overrides)}", flush=True)
        reached, last_history, startup, status = time_to_target(overrides, args.target, args.timeout)
        failed += status not in (0, -9)  # the run itself failed (a finished run exits 0, a stopped one -9)
        times.append(reached)
        step, loss = last_history[-1][1:] if last_history else (0, float("nan"))  # where the run was stopped
        stops.append((overrides[-1] if args.seeds else f"run {rep}", reached, step, loss))
    reached_all = [t for t in times if t is not None]
    summary = (
        f"median {statistics.median(reached_all):.1f} s from launch to val/loss <= {args.target}"
        if len(reached_all) == len(times)
        else f"target {args.target} not reached in {len(times) - len(reached_all)} of {len(times)} runs"
    )
    table = "\n".join(
        ["| s from launch | step | val/loss |", "|---|---|---|"]
        + [f"| {t:.1f} | {s} | {v:.4f} |" for t, s, v in last_history]
    )
    runs_table = "\n".join(
        ["| run | s from launch to the target | step | val/loss |", "|---|---|---|---|"]
        + [f"| {name} | {'not reached' if t is None else f'{t:.1f}'} | {s} | {v:.4f} |" for name, t, s, v in stops]
    )
    body = (
        f"{summary} (runs: {', '.join('-' if t is None else f'{t:.1f} s' for t in times)}).\n\n{runs_table}\n\n"
        f"Last run's own account of its start-up: {startup}\n\nLast run's validations:\n\n{table}"
    )
    append_results(
        args.results,
        f"Time to val/loss {args.target}: {' '.join(args.overrides)}",
        "python benchmarks/time_to_quality.py " + " ".join(sys.argv[1:]),
        machine_summary(args.device),
        body,
    )
    print(summary)
    if failed:
        raise SystemExit(f"{failed} of {len(runs)} runs failed: their last lines are above")


if __name__ == "__main__":
    main()
