"""Loss curves and sweep comparisons, read back from the TensorBoard events of runs."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from minigpt.report import compare_sweep, loss_curve_title, read_scalars, report
from tests.helpers import assert_is_a_picture, decode_png, run_python


def fake_sweep(trained_run, cfg, folder, jobs):
    """A multirun folder whose jobs are copies of the shared run, each with the .hydra files Hydra writes."""
    for i, overrides in enumerate(jobs):
        job = folder / f"{i}_{','.join(overrides)}"
        shutil.copytree(trained_run[0] / "tensorboard", job / "tensorboard")
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model=tiny", *overrides]))
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")  # interpolations left as they are, as Hydra does


def test_sweep_table_has_each_jobs_best_loss_and_throughput(trained_run, cfg_tiny_global, tmp_path):
    fake_sweep(trained_run, cfg_tiny_global, tmp_path, [["optimizer=adamw"], ["optimizer=sgd"]])
    with SummaryWriter(next(tmp_path.glob("1_*")) / "tensorboard") as writer:  # the second job ends better
        writer.add_scalar("val/loss", 0.5, 50)
    plot, table_md, table_csv = compare_sweep(tmp_path)
    assert_is_a_picture(decode_png(plot.read_bytes()), min_width=600, min_height=300)
    rows = list(csv.DictReader(table_csv.open()))
    assert [r["overrides"] for r in rows] == ["optimizer=adamw", "optimizer=sgd"]  # model=tiny is common to both
    val = read_scalars(trained_run[0] / "tensorboard")[0]["val/loss"]
    best = min(val.values)
    assert (float(rows[0]["best val/loss"]), int(rows[0]["step"])) == (
        pytest.approx(best, abs=1e-4),
        val.steps[val.values.index(best)],
    )
    assert (float(rows[1]["best val/loss"]), int(rows[1]["step"])) == (0.5, 50)  # each row from its own job
    for row in rows:
        assert float(row["wall time (s)"]) > 0 and float(row["tokens/s"]) > 0
    markdown = table_md.read_text()
    assert "Common to all jobs: `model=tiny`" in markdown
    assert markdown.count("\n| [0](<0_") + markdown.count("\n| [1](<1_") == 2  # each job by its number, linked
    assert "tokens/s is nan" not in markdown  # the footnote is there only when a job has no throughput


def test_report_on_a_run_folder_draws_its_loss_curve(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0] / "tensorboard", run / "tensorboard")
    (written,) = report(run)
    assert written == run / "loss_curve.png"
    assert_is_a_picture(decode_png(written.read_bytes()), min_width=600, min_height=300)


def test_the_loss_curves_learning_rate_is_optimizer_lrs_and_names_its_group_where_groups_differ():
    from minigpt.report import Series, learning_rate

    def rates(*values):
        return Series([1, 2], list(values), [0.0, 1.0])

    adamw = {"train/lr/decay": rates(3e-4, 2e-4), "train/lr/no_decay": rates(3e-4, 2e-4)}
    muon = {"train/lr/adamw": rates(3e-3, 2e-3), "train/lr/muon": rates(0.02, 0.01)}  # optimizer.lr is Muon's
    assert learning_rate(adamw) == (adamw["train/lr/decay"], "learning rate")  # one rate for both groups
    assert learning_rate(muon) == (muon["train/lr/muon"], "learning rate (muon group)")
    assert learning_rate({"train/loss": rates(4.0, 3.0)}) is None


def test_report_explains_a_folder_without_events(tmp_path):
    out = run_python("-m", "minigpt.report", str(tmp_path), timeout=60, check=False)
    assert out.returncode != 0 and "multirun" in out.stderr
    (tmp_path / "csv").mkdir()  # a run's own folder, made with logger=csv
    with pytest.raises(FileNotFoundError, match="No TensorBoard events in .* runs made with logger=csv"):
        report(tmp_path)


def test_a_multirun_jobs_loss_curve_title_wraps_its_overrides_and_keeps_its_best(trained_run):
    scalars, _ = read_scalars(trained_run[0] / "tensorboard")
    job = Path("/sweep/00-00-00") / ("0_" + ",".join(f"trainer.setting_{i}=1000" for i in range(8)))
    title = loss_curve_title(job, scalars)
    assert max(len(line) for line in title.splitlines()) <= 72 and "trainer.setting_7=1000" in title
    assert re.fullmatch(r"best val/loss \d\.\d{4} at step 40", title.splitlines()[-1])


@pytest.mark.slow
def test_real_sweep_compares_its_jobs(multirun_dir):
    run_python("-m", "minigpt.report", str(multirun_dir))
    rows = list(csv.DictReader((multirun_dir / "comparison.csv").open()))
    assert [r["overrides"] for r in rows] == ["optimizer=adamw", "optimizer=sgd"]
    for row, job in zip(rows, sorted(p for p in multirun_dir.iterdir() if p.is_dir())):
        val = read_scalars(job / "tensorboard")[0]["val/loss"]
        assert float(row["best val/loss"]) == pytest.approx(min(val.values), abs=1e-4)
        assert_is_a_picture(decode_png((job / "loss_curve.png").read_bytes()), min_width=600, min_height=300)
    assert_is_a_picture(decode_png((multirun_dir / "comparison.png").read_bytes()), min_width=600, min_height=300)


def test_throughput_counts_the_devices_the_run_recorded_and_is_explained_where_missing(
    trained_run, cfg_tiny_global, tmp_path
):
    """trainer=ddp says devices=-1 (every GPU): only the run itself knew how many that was."""
    from minigpt.report import read_job

    fake_sweep(trained_run, cfg_tiny_global, tmp_path, [["trainer=ddp"]])
    (job,) = tmp_path.iterdir()
    hparams = job / "tensorboard" / "hparams.yaml"
    recorded = yaml.safe_load(hparams.read_text())
    one_device = recorded["global_batch"]["tokens"]
    recorded["global_batch"] |= {"tokens": 4 * one_device, "devices": 4}  # as a run on 4 GPUs records it
    hparams.write_text(yaml.safe_dump(recorded))
    assert read_job(job).tokens_per_step == 4 * one_device
    del recorded["global_batch"]  # as runs of earlier versions wrote it
    hparams.write_text(yaml.safe_dump(recorded))
    _, table_md, table_csv = compare_sweep(tmp_path)
    assert [row["tokens/s"] for row in csv.DictReader(table_csv.open())] == ["nan"]
    assert "tokens/s is nan for a job that" in table_md.read_text()


def test_the_sweep_table_lists_failed_diverged_and_resumed_jobs_and_leaves_out_pauses(
    trained_run, cfg_tiny_global, tmp_path
):
    from minigpt.report import job_number, read_job

    fake_sweep(
        trained_run,
        cfg_tiny_global,
        tmp_path,
        [["optimizer.lr=1e-3"], ["optimizer.lr=1e6"], ["optimizer.lr=3e-3"], ["optimizer.lr=-1"]],
    )
    _, diverged, resumed, failed = sorted(tmp_path.iterdir())
    (diverged / "train.log").write_text("error: train/loss became non-finite at step 26. ...\n")
    shutil.rmtree(failed / "tensorboard")  # as a job that stopped on a bad input before training
    shutil.rmtree(resumed / "tensorboard")
    (resumed / "tensorboard").mkdir()
    (resumed / "tensorboard" / "hparams.yaml").write_text(yaml.safe_dump({"global_batch": {"tokens": 100}}))
    for first_step, start in [(0, 1000.0), (30, 5000.0)]:  # killed after step 20, resumed an hour later
        with SummaryWriter(resumed / "tensorboard", filename_suffix=f".{first_step}") as writer:
            for i in range(3):
                writer.add_scalar("train/loss", 3.0 - i / 10, first_step + 10 * i, walltime=start + 5 * i)
                writer.add_scalar("val/loss", 3.0 - i / 10, first_step + 10 * i, walltime=start + 5 * i)

    job = read_job(resumed)
    assert job.wall_time == pytest.approx(20.0)  # 10 s in each process, not the hour between them
    assert job.tokens_per_second == pytest.approx((20 + 20) * 100 / 20)
    _, table_md, table_csv = compare_sweep(tmp_path)
    rows = {row["job"]: row for row in csv.DictReader(table_csv.open())}
    assert len(rows) == 4 and rows[failed.name]["best val/loss"] == "nan"
    markdown = table_md.read_text()
    assert f"| [{job_number(failed)}](<{failed.name}/>) | " in markdown  # its number, linked to its folder
    assert f"Job [{job_number(failed)}](<{failed.name}/>) wrote no events: it failed before training" in markdown
    assert f"Job [{job_number(diverged)}](<{diverged.name}/>) diverged" in markdown
    assert f"Job [{job_number(resumed)}](<{resumed.name}/>) was resumed (2 processes wrote its events)" in markdown


def test_a_job_without_its_hydra_record_is_still_compared_and_an_empty_run_is_not_drawn(
    trained_run, cfg_tiny_global, tmp_path
):
    fake_sweep(trained_run, cfg_tiny_global, tmp_path, [["optimizer.lr=1e-3"], ["optimizer.lr=3e-3"]])
    first, second = sorted(tmp_path.iterdir())
    shutil.rmtree(second / ".hydra")
    _, _, table_csv = compare_sweep(tmp_path)
    assert [row["job"] for row in csv.DictReader(table_csv.open())] == [first.name, second.name]
    run = tmp_path / "run"
    with SummaryWriter(run / "tensorboard") as writer:
        writer.add_text("note", "a run stopped before it logged a loss", 0)
    with pytest.raises(FileNotFoundError, match="holds no train/loss or val/loss yet"):
        report(run)
    assert not (run / "loss_curve.png").exists()
