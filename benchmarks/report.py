"""Writes benchmark results to benchmarks/RESULTS.md with the date, machine and command that produced them."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch


def machine_summary(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    summary = f"{cpu}, {os.cpu_count()} CPU threads (torch uses {torch.get_num_threads()}), torch {torch.__version__}"
    if device == "cuda" and torch.cuda.is_available():
        summary = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}); host: {summary}"
    return summary


def append_results(path: str | Path, title: str, command: str, machine: str, body: str) -> None:
    path = Path(path)
    if not path.exists():
        path.write_text("# Benchmark results\n\nAppended by the scripts in benchmarks/; newest last.\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with path.open("a") as f:
        f.write(f"\n## {title}\n\n- date: {stamp}\n- machine: {machine}\n- command: `{command}`\n\n{body}\n")
