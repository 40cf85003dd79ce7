"""What compiling costs at start-up: `python train.py` with compile=false, true (the whole model) and regional
(each block).

    python benchmarks/compile_time.py                                    # the lesson's model on the CPU
    python benchmarks/compile_time.py --device cuda experiment=speedrun  # the GPU speed run's model

Each choice is launched cold (a new, empty compile cache: TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) and then
warm (the same cache again), and stopped after its first optimizer step; the run's own Start-up log line gives the
phases (imports, data and model, trainer set-up with the configured callbacks' start, first step). Steady-state
step times are throughput.py's (`--compile regional`). Results are appended to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_results, machine_summary  # noqa: E402
from minigpt.callbacks.startup import parse_startup  # noqa: E402


def start_up(overrides: list[str], cache_dir: str, timeout: float) -> dict[str, float]:
    """Seconds of each start-up phase of one run stopped after its first step, and `total`."""
    with tempfile.TemporaryDirectory() as run_dir:
        out = subprocess.run(
            [
                sys.executable,
                "train.py",
                *overrides,
                "trainer.max_steps=1",
                "trainer.val_check_interval=1",
                "data.val_batches=1",
                "trainer.num_sanity_val_steps=0",
                "logger=none",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(
                os.environ,
                PYTHONUNBUFFERED="1",
                TORCHINDUCTOR_CACHE_DIR=cache_dir,
                TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"),
            ),  # a GPU's kernels: cold means cold
        )
    log = out.stdout + out.stderr
    phases = parse_startup(log)
    if out.returncode != 0 or phases is None:
        raise SystemExit(f"python train.py {' '.join(overrides)} failed (exit {out.returncode}):\n{log[-3000:]}")
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--choices", default="false,true,regional", help="values of compile= to compare")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for one run")
    parser.add_argument("--device", default="cpu", help="for the machine line of the report")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for train.py")
    args = parser.parse_args()

    rows = [
        "| compile | cold: first step | cold: launch to first step done | warm: first step | "
        "warm: launch to first step done | data and model (warm) |",
        "|---|---|---|---|---|---|",
    ]
    for choice in args.choices.split(","):
        with tempfile.TemporaryDirectory() as cache:
            cold = start_up([*args.overrides, f"compile={choice}"], cache, args.timeout)
            warm = start_up([*args.overrides, f"compile={choice}"], cache, args.timeout)
        print(f"compile={choice}: cold {cold}, warm {warm}", flush=True)
        rows.append(
            f"| {choice} | {cold['first step']:.1f} s | {cold['total']:.1f} s | {warm['first step']:.1f} s | "
            f"{warm['total']:.1f} s | {warm['data and model']:.1f} s |"
        )
    table = "\n".join(rows)
    append_results(
        args.results,
        f"Start-up with and without compilation: {' '.join(args.overrides) or 'the defaults'}",
        "python benchmarks/compile_time.py " + " ".join(sys.argv[1:]),
        machine_summary(args.device),
        table + "\n\nEach run stopped after its first optimizer step; phases from its Start-up log line. "
        "Cold: a new, empty compile cache; warm: the same cache again, right after.",
    )
    print(table)


if __name__ == "__main__":
    main()
