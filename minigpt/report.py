"""Loss curves and sweep comparisons as pictures and tables, read back from the TensorBoard events of runs.

python -m minigpt.report <run folder>        writes loss_curve.png there (train.py does it at the end of a run)
python -m minigpt.report <multirun folder>   writes comparison.png, comparison.md and comparison.csv there:
                                             each job's validation curve, labelled by its overrides, and a
                                             table of best val/loss, its step, wall time and tokens per second
"""

from __future__ import annotations

import argparse
import csv
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from minigpt import plots

# TensorBoard's event reader logs what no user can act on: "No path found after <events file>" whenever it reaches the
# newest file, and a warning of "a TensorFlow restart" where a resumed run's events go back to its checkpoint's step
# (it drops the points logged after that step, as TensorBoard does). Its errors still show.
logging.getLogger("tensorboard").addFilter(lambda r: r.levelno >= logging.ERROR or "event_processing" not in r.pathname)


@dataclass
class Series:
    steps: list[int]
    values: list[float]
    wall_times: list[float]  # seconds since the epoch, when each value was written


def read_scalars(events_dir: str | Path) -> tuple[dict[str, Series], float]:
    """Every scalar series in a folder of TensorBoard events, and the time the first event was written."""
    events_dir = Path(events_dir)
    if not any(events_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(
            f"No TensorBoard events in {events_dir}. Reports are read from the events of the TensorBoard logger "
            "(logger=tensorboard, the default); runs made with logger=csv or logger=none have none."
        )
    # imported here: TensorBoard's reader pulls in its TensorFlow stub (and boto3 where installed), 0.4 s that
    # train.py would otherwise pay at every launch before training starts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})  # 0 = keep every point
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        scalars[tag] = Series([p.step for p in points], [p.value for p in points], [p.wall_time for p in points])
    return scalars, events.FirstEventTimestamp()


def learning_rate(scalars: dict[str, Series]) -> tuple[Series, str] | None:
    """The rate LearningRateMonitor logged for the parameters `optimizer.lr` sets (the decayed weights; Muon's
    matrices), and its label, which names the group where other groups have other rates (Muon's AdamW part)."""
    tags = sorted(t for t in scalars if t.startswith("train/lr"))
    if not tags:
        return None
    tag = next((t for t in ("train/lr", "train/lr/decay", "train/lr/muon") if t in scalars), tags[0])
    others = [t for t in tags if t != tag and scalars[t].values != scalars[tag].values]
    return scalars[tag], "learning rate" + (f" ({tag.rsplit('/', 1)[1]} group)" if others else "")


def best(series: Series | None) -> tuple[float, int]:
    """The lowest value of a series and its step; (nan, -1) for a missing or empty one."""
    if series is None or not series.values:
        return float("nan"), -1
    i = min(range(len(series.values)), key=series.values.__getitem__)
    return series.values[i], series.steps[i]


def write_loss_curve(scalars: dict[str, Series], path: str | Path, title: str) -> Path:
    empty = Series([], [], [])
    train, val = scalars.get("train/loss", empty), scalars.get("val/loss", empty)
    lr, lr_label = learning_rate(scalars) or (None, "learning rate")
    figure = plots.loss_curve(
        (train.steps, train.values), (val.steps, val.values), (lr.steps, lr.values) if lr else None, title, lr_label
    )
    return plots.save(figure, path)


def loss_curve_title(folder: Path, scalars: dict[str, Series]) -> str:
    """The run's name, wrapped to the figure's width (a multirun job's folder is named after all its overrides), and
    its best val/loss on a line of its own."""
    name = "/".join(folder.parts[-2:])  # <date>/<time>, or <time>/<job> in a multirun
    name = textwrap.fill(name.replace(",", ", "), 72)  # what a title of the 8-inch figure holds
    value, step = best(scalars.get("val/loss"))
    return f"{name}\nbest val/loss {value:.4f} at step {step}" if step >= 0 else name


def process_spans(events_dir: Path) -> list[tuple[float, float]]:
    """When each process that wrote to `events_dir` wrote its first and last event: one span per events file (a
    resumed run's new process starts a new file)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # as in read_scalars

    spans = []
    for file in sorted(events_dir.glob("events.out.tfevents.*")):
        times = [event.wall_time for event in EventFileLoader(str(file)).Load() if event.HasField("summary")]
        if times:
            spans.append((min(times), max(times)))
    return spans


@dataclass
class Job:
    folder: Path
    overrides: list[str]
    scalars: dict[str, Series]
    spans: list[tuple[float, float]]  # when each of its processes wrote (more than one: it was resumed)
    tokens_per_step: int | None  # None: not recorded
    tags: list[str]  # the run's `tags=[...]`

    @property
    def wall_time(self) -> float:
        """Seconds its processes ran, from each one's first event (the start of fitting) to its last: a resumed job's
        pause between them does not count."""
        return sum(last - first for first, last in self.spans) if self.spans else float("nan")

    @property
    def tokens_per_second(self) -> float:
        """Training throughput between logged training steps, validations included, pauses between processes not."""
        train = self.scalars.get("train/loss")
        if self.tokens_per_step is None or train is None:
            return float("nan")
        steps = seconds = 0.0
        for (s0, t0), (s1, t1) in zip(zip(train.steps, train.wall_times), zip(train.steps[1:], train.wall_times[1:])):
            if any(first <= t0 and t1 <= last for first, last in self.spans):  # both written by the same process
                steps, seconds = steps + s1 - s0, seconds + t1 - t0
        return steps * self.tokens_per_step / seconds if seconds > 0 else float("nan")

    @property
    def diverged(self) -> bool:
        log = self.folder / "train.log"
        return log.is_file() and "became non-finite" in log.read_text(errors="replace")


def read_job(folder: Path) -> Job:
    """A job's overrides and, when it wrote any (a job that failed before training did not), its events."""
    record = folder / ".hydra" / "overrides.yaml"  # missing for a job whose .hydra was deleted, or not written
    overrides = (yaml.safe_load(record.read_text()) or []) if record.is_file() else []
    events = folder / "tensorboard"
    spans = process_spans(events)  # none: no events, so no scalars either
    scalars = read_scalars(events)[0] if spans else {}
    return Job(
        folder, [o for o in overrides if not o.startswith("hydra.")], scalars, spans, *recorded(events / "hparams.yaml")
    )


def recorded(hparams_file: Path) -> tuple[int | None, list[str]]:
    """The tokens of one optimizer step over every device, as train.py records them when the run starts (only then
    do devices=-1 or auto become a number), and the run's tags; None and [] for a run that recorded none."""
    try:
        hparams = yaml.safe_load(hparams_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None, []
    tokens = (hparams.get("global_batch") or {}).get("tokens")
    return (tokens if isinstance(tokens, int) and tokens > 0 else None), [str(t) for t in hparams.get("tags") or []]


def job_number(folder: Path) -> int:
    """Hydra names a job's folder `<number>_<overrides>`."""
    head = folder.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


def job_link(folder: Path) -> str:
    """A job in comparison.md: its number, linked to its folder (whose name repeats the job's overrides)."""
    number = job_number(folder)
    return f"[{number if number >= 0 else folder.name}](<{folder.name}/>)"


def compare_sweep(multirun_dir: str | Path) -> list[Path]:
    """Write comparison.png, .md and .csv into a multirun folder; returns their paths."""
    multirun_dir = Path(multirun_dir)
    if not any(multirun_dir.glob("*/tensorboard/events.out.tfevents.*")):
        raise FileNotFoundError(
            f"No job folders with TensorBoard events under {multirun_dir}: give the folder of a "
            "multirun (outputs/multirun/<date>/<time>) or, for one run, its own folder."
        )
    folders = sorted(
        {p.parent.parent for p in multirun_dir.glob("*/.hydra/overrides.yaml")}
        | {p.parent.parent for p in multirun_dir.glob("*/tensorboard/events.out.tfevents.*")},
        key=lambda p: (job_number(p), p.name),
    )
    jobs = [read_job(folder) for folder in folders]
    common = set.intersection(*(set(job.overrides) for job in jobs))
    labels = [" ".join(o for o in job.overrides if o not in common) or job.folder.name for job in jobs]
    shared = " ".join(sorted(common))

    val = {
        label: (job.scalars["val/loss"].steps, job.scalars["val/loss"].values)
        for label, job in zip(labels, jobs)
        if "val/loss" in job.scalars
    }
    title = f"{multirun_dir.name}: val/loss per job" + (
        "\n" + textwrap.fill(f"common to all jobs: {shared}", 100) if shared else ""
    )
    plot = plots.save(plots.sweep_comparison(val, title), multirun_dir / "comparison.png")

    header = ["job", "overrides", "tags", "best val/loss", "step", "wall time (s)", "tokens/s"]
    rows = []
    for label, job in zip(labels, jobs):
        value, step = best(job.scalars.get("val/loss"))
        numbers = [f"{value:.4f}", str(step), f"{job.wall_time:.1f}", f"{job.tokens_per_second:.0f}"]  # nan: "nan"
        rows.append([job.folder.name, label, " ".join(job.tags), *numbers])
    table_csv = multirun_dir / "comparison.csv"
    with table_csv.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = [f"# {multirun_dir}", ""] + ([f"Common to all jobs: `{shared}`", ""] if shared else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([job_link(job.folder), f"`{row[1]}`", *row[2:]]) + " |" for job, row in zip(jobs, rows)]
    notes = [
        f"Job {job_link(job.folder)} wrote no events: it failed before training (its train.log says why)."
        for job in jobs
        if not job.spans
    ]
    notes += [
        f"Job {job_link(job.folder)} diverged (its train.log says at which step): its best val/loss is from before."
        for job in jobs
        if job.diverged
    ]
    notes += [
        f"Job {job_link(job.folder)} was resumed ({len(job.spans)} processes wrote its events): its overrides "
        "are its first run's, and its wall time and tokens/s leave out the pauses between the processes."
        for job in jobs
        if len(job.spans) > 1
    ]
    if any(row[-1] == "nan" for row, job in zip(rows, jobs) if job.spans):
        notes += [
            "tokens/s is nan for a job that logged fewer than two training steps (see trainer.log_every_n_steps) "
            "or recorded no global batch in tensorboard/hparams.yaml."
        ]
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    table_md = multirun_dir / "comparison.md"
    table_md.write_text("\n".join(lines) + "\n")
    return [plot, table_md, table_csv]


def report(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder: give a run folder (outputs/<date>/<time>) or a multirun "
            "folder (outputs/multirun/<date>/<time>)."
        )
    if any((folder / name).is_dir() for name in ("tensorboard", ".hydra", "csv", "checkpoints")):  # a run's folder
        scalars, _ = read_scalars(folder / "tensorboard")
        if not {"train/loss", "val/loss"} & set(scalars):  # drawn, it would replace a curve with an empty chart
            raise FileNotFoundError(
                f"{folder / 'tensorboard'} holds no train/loss or val/loss yet: the run stopped before its first step."
            )
        return [write_loss_curve(scalars, folder / "loss_curve.png", loss_curve_title(folder, scalars))]
    return compare_sweep(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minigpt.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a run folder (outputs/<date>/<time>) or a multirun folder")
    args = parser.parse_args(argv)
    try:
        written = report(args.folder)
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
