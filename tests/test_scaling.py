"""Scaling out: DDP over two CPU processes, a cluster sweep of DDP jobs, and the Optuna search, each run for real."""

from __future__ import annotations

import csv
import logging
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf, open_dict

import train
from minigpt import build, config, multirun
from minigpt.callbacks.batch_fingerprints import fingerprint
from minigpt.callbacks.divergence import NonFiniteLossError, StopOnNonFiniteLoss
from minigpt.checkpoint import load_checkpoint
from minigpt.data import RandomWindows
from minigpt.module import MiniGPTModule
from minigpt.report import read_scalars
from tests.helpers import CONF, NO_PICTURES, ROOT, TINY, compose_train, run_python

DDP = [o for o in TINY if o != "trainer=cpu"] + ["trainer=ddp_cpu"]  # two processes over gloo
# What a sweep's jobs need: no pictures or samples (their drawing is tested elsewhere), fewer steps.
SWEEP = [o for o in TINY if not o.startswith(("trainer", "callbacks."))] + [
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "trainer.log_every_n_steps=5",
    *NO_PICTURES,
]
# What an Optuna search's trials need: no pictures, ten steps, the optimizer's settings left to the search, CSV scores.
SEARCH = [o for o in TINY if not o.startswith(("optimizer.", "callbacks."))] + [
    "trainer.max_steps=10",
    "trainer.val_check_interval=5",
    "logger=csv",
    *NO_PICTURES,
]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return run_python("train.py", *args, timeout=400)


def short_job_names(overrides: list[str]) -> str:
    """Job folders named by the swept overrides only: all of them would make a name too long for the file system."""
    keys = ["data.path"] + [o.split("=")[0].lstrip("~+") for o in overrides]
    return f"hydra.job.config.override_dirname.exclude_keys=[{','.join(keys)}]"


def search(text_file: Path, sweep_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """python train.py hparams_search=lr_wd of tiny trials into sweep_dir; `args` set the search (trials, ranges)."""
    return run(
        [
            "hparams_search=lr_wd",
            *args,
            *SEARCH,
            f"data.path={text_file}",
            f"hydra.sweep.dir={sweep_dir}",
            short_job_names(SEARCH + ["hparams_search"]),
        ]
    )


def rank_fingerprints(train_log: Path) -> list[str]:
    line = re.search(r"First training batch \(step 0\) of each rank: (.*)", train_log.read_text()).group(1)
    return re.findall(r"rank \d+ ([0-9a-f]{16})", line)


def test_only_runs_whose_processes_lightning_starts_leave_a_multirun_job(cfg_tiny, monkeypatch):
    def restarts(*overrides: str) -> bool:
        cfg = compose_train(overrides, run_dir=cfg_tiny.run_dir)
        return multirun.restarts_script(build.planned_strategy(cfg))

    assert restarts("trainer=ddp_cpu")  # Lightning would run train.py again for rank 1
    assert not restarts("trainer=cpu") and not restarts("trainer=ddp_cpu", "trainer.devices=1")
    # under torchrun (or SLURM) every process is started by the launcher: the job trains where it is
    for name, value in {
        "TORCHELASTIC_RUN_ID": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "GROUP_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(name, value)
    assert not restarts("trainer=ddp_cpu")


def test_a_multirun_job_becomes_a_single_run_with_the_jobs_overrides_in_the_jobs_folder():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        job = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=[
                "hparams_search=lr_wd",
                "trainer=ddp_cpu",
                "optimizer.lr=0.001",
                "hydra.mode=MULTIRUN",
                "hydra/launcher=basic",
                "hydra.sweep.dir=/sweep",
                "hydra.verbose=true",
            ],
        ).hydra
        with open_dict(job):
            job.runtime.output_dir = "/sweep/0_optimizer.lr=0.001,trainer=ddp_cpu"
        command = multirun.job_command(job, ROOT / "train.py")
        assert command[:3] == [sys.executable, str(ROOT / "train.py"), "--config-name=train"]
        run = compose(config_name="train", overrides=command[3:], return_hydra_config=True)
    assert run.hydra.mode == RunMode.RUN  # not the search hparams_search=lr_wd asks for: that would start again
    assert run.hydra.run.dir == job.runtime.output_dir and run.hydra.output_subdir is None  # the job's .hydra stays
    assert (run.optimizer.lr, run.trainer.devices, run.hydra.verbose) == (0.001, 2, True)
    assert not any(o.startswith(("hydra/launcher", "hydra.sweep")) for o in command)


# A sweep whose job runs in a process of its own, as run_job_in_new_process runs a DDP job; the job takes a moment
# to shut down after Ctrl-C and says where it can resume from, as Lightning and train.py do.
CTRL_C_JOB = """
import signal, subprocess, sys, time
# a rank that does not stop when told (stuck in a collective): it must not outlive the job
rank = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                         "time.sleep(60)"])
folder = next(a for a in sys.argv if a.startswith("hydra.run.dir=")).split("=", 1)[1]
open(folder + ".rank", "w").write(str(rank.pid))
def stop(*_):
    time.sleep(1.0)
    print("job: interrupted at step 7; resume with ckpt_path=...", flush=True)
    sys.exit(1)
signal.signal(signal.SIGINT, stop)
print("job: started", flush=True)
time.sleep(60)
"""
CTRL_C_SWEEP = """
import sys
from pathlib import Path
from types import SimpleNamespace
from minigpt import multirun
job = SimpleNamespace(job=SimpleNamespace(config_name="train"), overrides=SimpleNamespace(hydra=[], task=[]),
                      runtime=SimpleNamespace(config_sources=[], output_dir=sys.argv[2], cwd="."))
multirun.run_job_in_new_process(job, Path(sys.argv[1]))
"""


# Ctrl-C (the job, in a session of its own, is out of the terminal's reach), kill -INT or an IDE's stop button;
# timeout and kill send SIGTERM
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_ctrl_c_in_a_sweep_lets_the_job_in_its_own_process_say_where_it_can_resume(tmp_path, sig):
    import os
    import signal
    import time

    (tmp_path / "job.py").write_text(CTRL_C_JOB)
    sweep = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SWEEP, str(tmp_path / "job.py"), str(tmp_path / "0_job")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # a process group of its own, as a terminal's foreground job
    started = [sweep.stdout.readline()]
    while "job: started" not in started[-1]:  # the sweep's own log lines come first
        assert started[-1], "the job did not start: " + "".join(started)
        started.append(sweep.stdout.readline())
    os.killpg(sweep.pid, getattr(signal, sig))  # the sweep's process group: the job is not in it
    out = "".join(started) + sweep.communicate(timeout=60)[0]
    assert "job: interrupted at step 7; resume with ckpt_path=..." in out  # not killed before it could say so
    assert f"Interrupted: the sweep stopped in the job of {tmp_path / '0_job'}" in out
    assert "Traceback" not in out and sweep.returncode == 1
    rank = int((tmp_path / "0_job.rank").read_text())
    for _ in range(50):  # killed with the job's process group, then reaped by init
        if not Path(f"/proc/{rank}").exists() or "State:\tZ" in Path(f"/proc/{rank}/status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the job's process {rank} outlived it")


def test_the_ranks_stop_together_on_the_earliest_non_finite_loss_of_any_of_them():
    """A rank whose own losses were finite still stops, at the step another rank reported: none is left waiting."""
    model = torch.nn.Linear(2, 2)
    pl_module = SimpleNamespace(
        device=torch.device("cpu"), parameters=model.parameters, named_parameters=model.named_parameters
    )
    other_rank_saw = torch.tensor(7)
    trainer = SimpleNamespace(
        world_size=2,
        global_step=9,
        checkpoint_callbacks=[],
        strategy=SimpleNamespace(
            reduce=lambda mine, reduce_op: torch.minimum(mine, other_rank_saw) if reduce_op == "min" else None
        ),
    )
    callback = StopOnNonFiniteLoss(check_every_n_steps=10)
    for step in (8, 9):  # this rank's losses: finite
        trainer.global_step = step
        callback.on_train_batch_start(trainer)
        callback.on_train_batch_end(trainer, pl_module, {"loss": torch.tensor(2.5)})
    with pytest.raises(NonFiniteLossError, match="non-finite at step 7"):
        callback._check(trainer, pl_module)


@pytest.mark.parametrize("devices", [-1, 0, 1.0, "two"])
def test_a_number_of_cpu_processes_that_is_not_a_whole_number_above_0_is_refused_with_what_it_means(devices):
    with pytest.raises(
        ValueError,
        match=r"trainer.devices=.*: on the CPU it is how many processes train .* -1 \(every "
        r"device\) is for GPUs",
    ):
        config.check_cpu_processes(OmegaConf.create({"accelerator": "cpu", "devices": devices}))


def test_settings_that_do_not_match_the_processes_torchrun_started_name_the_ones_that_do(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun --nnodes=2 --nproc-per-node=1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ValueError,
        match=r"torchrun started 1 processes per node on 2 node\(s\), which "
        r"trainer.devices=2 trainer.num_nodes=1 do not match: give "
        r"trainer.devices=1 trainer.num_nodes=2",
    ):
        config.check_torchrun_processes(OmegaConf.create({"devices": 2, "num_nodes": 1}))
    config.check_torchrun_processes(OmegaConf.create({"devices": 1, "num_nodes": 2}))
    config.check_torchrun_processes(OmegaConf.create({"devices": -1, "num_nodes": 2}))  # every GPU: Lightning counts
    with pytest.raises(
        ValueError,
        match=r"trainer.devices=-1 trainer.num_nodes=1 do not match: give trainer.devices=1 "
        r"trainer.num_nodes=2",
    ):  # trainer=ddp without the nodes torchrun has
        config.check_torchrun_processes(OmegaConf.create({"devices": -1, "num_nodes": 1}))


def test_more_cpu_processes_than_cores_are_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.WARNING):
        config.check_cpu_processes(OmegaConf.create({"accelerator": "cpu", "devices": 2}))
        assert not caplog.records
        config.check_cpu_processes(OmegaConf.create({"accelerator": "cpu", "devices": 4}))
    assert "trainer.devices=4 CPU processes on 2 cores" in caplog.text


def test_missing_plugins_get_clear_messages(monkeypatch):
    monkeypatch.setattr(multirun, "is_installed", lambda module: False)
    with pytest.raises(
        SystemExit, match=r"hparams_search=lr_wd needs the Hydra plugin hydra_optuna_sweeper.*\.\[search\]"
    ):
        multirun.check_plugins(["model=tiny", "hparams_search=lr_wd"])
    with pytest.raises(
        SystemExit, match=r"hydra/launcher=slurm needs the Hydra plugin hydra_submitit_launcher.*\.\[slurm\]"
    ):
        multirun.check_plugins(["hydra/launcher=slurm"])
    multirun.check_plugins(["model=tiny", "trainer=ddp_cpu"])  # nothing to check
    monkeypatch.setattr(multirun, "is_installed", lambda module: True)
    monkeypatch.setattr(multirun.shutil, "which", lambda command: None)
    with pytest.raises(SystemExit, match=r"hydra/launcher=slurm submits SLURM jobs with sbatch, which is not on this"):
        multirun.check_plugins(["-m", "hydra/launcher=slurm"])


def test_the_slurm_launcher_asks_for_one_task_per_gpu_on_trainer_num_nodes_nodes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            return_hydra_config=True,
            overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.gpus_per_node=8"],
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)


@pytest.mark.parametrize("trainer", ["gpu", "cpu", "ddp_cpu", "default"])
def test_every_trainer_runs_on_one_node_unless_told_and_takes_num_nodes_without_a_plus(trainer):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # README: a sweep of one-GPU SLURM jobs
        one = compose(
            config_name="train", return_hydra_config=True, overrides=["hydra/launcher=slurm", f"trainer={trainer}"]
        )
        two = compose(config_name="train", overrides=[f"trainer={trainer}", "trainer.num_nodes=2"])
    assert one.hydra.launcher.nodes == one.trainer.num_nodes == 1 and two.trainer.num_nodes == 2


def test_other_ranks_get_no_log_file_and_other_logging_choices_replace_rank_zeros(monkeypatch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        ours = compose(config_name="train", return_hydra_config=True)
        disabled = compose(config_name="train", return_hydra_config=True, overrides=["hydra/job_logging=disabled"])
    assert "handlers" not in disabled.hydra.job_logging  # nothing of ours is left to configure
    settings = OmegaConf.to_container(ours.hydra)  # unresolved: the run folder is not known yet
    settings = OmegaConf.create(
        {
            "level": settings["job_logging"]["root"]["level"],
            "output_subdir": settings["output_subdir"],
            "file": settings["job_logging"]["handlers"]["file"]["filename"].replace(
                "${hydra.runtime.output_dir}/${hydra.job.name}", "run/train"
            ),
        }
    )
    assert (settings.file, settings.level, settings.output_subdir) == ("run/train.log", "INFO", ".hydra")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert (settings.file, settings.level, settings.output_subdir) == ("/dev/null", "WARNING", None)


def test_other_ranks_refuse_a_folder_with_an_earlier_runs_checkpoints_and_leave_the_rest_to_rank_zero(
    monkeypatch, tmp_path
):
    from minigpt.run_folder import RefuseUsedRunFolder

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as under srun, where every rank starts at once
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"")  # rank zero may have written these
    check = RefuseUsedRunFolder()
    config = OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path)}, "output_subdir": ".hydra"}, "ckpt_path": None})
    check.on_run_start(config)  # goes on, and leaves the folder's lock to rank zero
    assert not check.locks
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")  # rank zero trains only with us: an earlier run's
    with pytest.raises(SystemExit, match=r"already holds a run .*last.ckpt.* Resume that run with"):
        check.on_run_start(config)  # instead of waiting for rank zero, which refused, until DDP's timeout
    check.on_run_start(OmegaConf.merge(config, {"ckpt_path": str(tmp_path)}))  # a resume: rank zero checks it


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_draws_different_windows_writes_once_and_resumes_on_one(text_file, tmp_path):
    run_dir = tmp_path / "run"
    # the whole validation split, 85 windows: 43 on rank 0 in 8 batches of 6 and 42 on rank 1 in 7, so rank 0 runs a
    # validation step more; rotary positions give the model buffers, which DDP synchronises on a forward
    whole_split = ["data.val_batches=null", "data.batch_size=6", "model.rope=true"]
    run(DDP + whole_split + [f"data.path={text_file}", f"hydra.run.dir={run_dir}"])

    # each rank drew the windows of its own stream: rank r's first batch is RandomWindows(rank=r)'s first batch
    cfg = compose_train(DDP + whole_split + [f"data.path={text_file}"])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    expected = [
        f"{fingerprint(next(iter(RandomWindows(datamodule.train_tokens, 16, 6, cfg.seed, rank)))[0]):016x}"
        for rank in (0, 1)
    ]
    assert rank_fingerprints(run_dir / "train.log") == expected and expected[0] != expected[1]

    # one set of outputs: rank 1 wrote no log, .hydra, events, checkpoints or pictures of its own
    log = (run_dir / "train.log").read_text()
    assert "Global batch: 6 windows per device x 1 accumulated x 2 devices x 1 nodes = 12 windows" in log
    assert log.count("Finished at step 40") == 1 and "[rank: 1]" not in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    written = {p.name for p in run_dir.iterdir()} - {"graph.svg", "graph.dot"}  # graph.dot where Graphviz is missing
    assert sorted(written) == [
        ".hydra",
        "attention_layer0.png",
        "attention_layer1.png",
        "checkpoints",
        "gradient_flow.png",
        "loss_curve.png",
        "tensorboard",
        "train.log",
    ]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["global_batch"] == {"windows": 12, "tokens": 192, "devices": 2, "num_nodes": 1}
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 40

    # the ranks validated their shares of the windows, each window once: val/loss is the one-process mean
    x, y = datamodule.val_set.tensors
    assert len(x) % 2 == 1  # shares of unequal length, which Lightning's own sampler would even out with a repeat
    module = MiniGPTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt").eval()
    with torch.no_grad():
        expected_loss = module(x, y)[1].item()
    logged = read_scalars(run_dir / "tensorboard")[0]["val/loss"]
    assert dict(zip(logged.steps, logged.values))[40] == pytest.approx(expected_loss, abs=1e-5)

    # the DDP checkpoint resumes on one process, in the same folder
    resume = compose_train(
        TINY + whole_split + [f"data.path={text_file}", f"ckpt_path={run_dir}", "trainer.max_steps=60"],
        run_dir=tmp_path / "unused",
    )
    metrics = train.train(resume)
    assert metrics["step"] == 60 and metrics["val/loss"] < 3.0
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 60
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_a_submitit_sweep_runs_its_ddp_job_as_a_run_of_its_own_and_each_job_once(text_file, tmp_path):
    """A DDP job and a one-process job through the local submitit launcher: the DDP job becomes a run of its own
    whose rank 1 Lightning starts, without starting the sweep again (Lightning issue #11300)."""
    out = run(
        [
            "-m",
            "hydra/launcher=submitit_local",
            "trainer=ddp_cpu,cpu",
            *SWEEP,
            f"data.path={text_file}",
            f"hydra.sweep.dir={tmp_path}",
            short_job_names(SWEEP),
        ]
    )
    assert out.stdout.count("Submitit 'local' sweep output dir") == 1
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [j.name for j in jobs] == ["0_trainer=ddp_cpu", "1_trainer=cpu"]
    logs = [p.read_text() for p in (tmp_path / ".submitit").rglob("*_log.*")]
    assert len(logs) == 4 and not any("sweep output dir" in text or "Launching" in text for text in logs)
    for job, processes in zip(jobs, (2, 1)):
        assert sorted(p.name for p in job.iterdir()) == [
            ".hydra",
            "checkpoints",
            "gradient_flow.png",
            "loss_curve.png",
            "tensorboard",
            "train.log",
        ]
        log = (job / "train.log").read_text()
        assert ("Running this job as a run of its own" in log) == (processes > 1)  # one process trains in place
        assert f"x {processes} devices" in log and log.count("Finished at step 10") == 1
        assert len(set(rank_fingerprints(job / "train.log"))) == processes
        assert load_checkpoint(job / "checkpoints" / "last.ckpt")["global_step"] == 10


@pytest.mark.slow
def test_an_optuna_search_of_three_trials_returns_the_best_trial(text_file, tmp_path):
    search(text_file, tmp_path, "hydra.sweeper.n_trials=3")
    trials = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(trials) == 3
    best_val_loss = {}
    for trial in trials:
        params = dict(
            o.split("=")
            for o in yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())
            if o.startswith("optimizer.")
        )
        assert 1e-4 <= float(params["optimizer.lr"]) <= 3e-2 and 0 <= float(params["optimizer.weight_decay"]) <= 0.2
        with open(trial / "csv" / "metrics.csv") as f:
            best_val_loss[trial.name] = min(float(row["val/loss"]) for row in csv.DictReader(f) if row["val/loss"])
    assert len({name.split("_", 1)[1] for name in best_val_loss}) == 3  # three different trials
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    best = min(best_val_loss, key=best_val_loss.get)
    assert results["best_value"] == pytest.approx(best_val_loss[best], abs=1e-6)
    assert best.split("_", 1)[1] == ",".join(f"{k}={v}" for k, v in results["best_params"].items())


@pytest.mark.slow
def test_diverged_trials_score_inf_and_the_search_goes_on(text_file, tmp_path):
    all_diverge = "hydra.sweeper.params={optimizer.lr:'interval(1e5,1e6)'}"
    out = search(text_file, tmp_path, all_diverge, "hydra.sweeper.n_trials=2")
    assert out.stderr.count("became non-finite") == 2 and "In this sweep the job scores inf" in out.stderr
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2  # the second trial ran after the first diverged
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_value"] == math.inf and results["best_params"]["optimizer.lr"] >= 1e5


@pytest.mark.slow
def test_a_ddp_job_that_diverges_in_a_sweep_scores_inf_too(text_file, tmp_path):
    """A DDP job runs in a process of its own (above): its divergence reaches the sweep as a score, not a failure."""
    out = run(
        [
            "-m",
            "trainer=ddp_cpu",
            *SWEEP,
            "optimizer.lr=1e6",
            f"data.path={text_file}",
            f"hydra.sweep.dir={tmp_path}",
            short_job_names(SWEEP + ["optimizer.lr"]),
        ]
    )
    assert "became non-finite" in out.stderr
    assert "this job diverged (its error is above). In this sweep the job scores inf." in out.stderr
