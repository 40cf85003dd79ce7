"""Every bad input gets a clear message and loses nothing; a diverging run stops; a multirun survives its jobs."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import open_dict

import sample
import train
from minigpt.callbacks.divergence import NonFiniteLossError
from minigpt.checkpoint import load_checkpoint
from tests.helpers import ROOT, TINY, compose_sample, compose_train, make_text, run_python


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under `folders`, by content: equal snapshots mean nothing was deleted, added or overwritten."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()
    }


@pytest.fixture
def earlier_run(trained_run, tmp_path) -> Path:
    """A finished run's folder that a mistyped resume must leave exactly as it was."""
    folder = tmp_path / "earlier"
    shutil.copytree(trained_run[0], folder)
    return folder


def bad_data(tmp_path: Path) -> dict[str, list[str]]:
    """Overrides that point the data at each kind of bad text."""
    files = {
        "empty": b"",
        "short": b"abc" * 10,
        "latin1": "caf\u00e9 ".encode("latin-1") * 200,
        "other_vocab": make_text().upper().encode(),
    }
    for name, content in files.items():
        (tmp_path / f"{name}.txt").write_bytes(content)
    damaged_cache = tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    damaged_cache.parent.mkdir(parents=True)
    damaged_cache.write_text("not shakespeare")
    offline = [
        "data.path=null",
        f"data.cache_dir={tmp_path / 'empty_cache'}",
        f"data.url={(tmp_path / 'offline.txt').as_uri()}",
    ]
    return {
        "offline": offline,
        "checksum": ["data.path=null", f"data.cache_dir={tmp_path / 'cache'}"],
        **{name: [f"data.path={tmp_path / name}.txt"] for name in files},
    }


def mistyped(value: str, kind: str, key: str) -> str:
    """OmegaConf's refusal of a value of the wrong type (minigpt/schema.py)."""
    return rf"Value '{value}' of type '\w+' could not be converted to {kind}\s+full_key: {key}"


CASES = {  # name: (overrides, what the message must say)
    "offline": (None, "could not be downloaded from .* or pass data.path="),
    "checksum": (None, "has sha256 .* expected .* Delete it to download it again"),
    "empty": (None, "has 0 characters: too short for block_size=16"),
    "short": (None, "has 30 characters: too short for block_size=16"),
    "latin1": (None, r"is not UTF-8 text: byte \d+ .*iconv -f latin1 .*, and pass data.path="),
    "other_vocab": (None, "was trained on a vocabulary of .* Resume with the data it was trained on"),
    "other_data": (
        ["data.train_fraction=0.8"],
        r"trained on other data: data.train_fraction=0.9 in the checkpoint, 0.8",
    ),
    "n_embd": (["model.n_head=3"], r"n_embd \(32\) must be divisible by n_head \(3\)"),
    "batch_size": (["data.batch_size=0"], "data.batch_size and data.block_size must be positive whole numbers, got 0"),
    "batch_size_float": (["data.batch_size=8.0"], mistyped("8.0", "Integer", "data.batch_size")),
    "val_seed": (["data.val_seed=abc"], mistyped("abc", "Integer", "data.val_seed")),
    "seed": (["seed=abc"], mistyped("abc", "Integer", "seed")),
    "lr": (["optimizer.lr=-0.1"], "optimizer.lr must be a positive number, got -0.1"),
    "lr_text": (["optimizer.lr=abc"], mistyped("abc", "Float", "optimizer.lr")),
    "weight_decay": (["optimizer.weight_decay=-1"], "optimizer.weight_decay must be a number >= 0, got -1"),
    "warmup": (["scheduler.warmup_steps=ten"], mistyped("ten", "Integer", "scheduler.warmup_steps")),
    "dropout": (["model.dropout=abc"], mistyped("abc", "Float", "model.dropout")),
    "model_key": (["+model.n_layers=3"], "Key 'n_layers' not in 'GPTConfig'"),
    "max_steps": (
        ["trainer.max_steps=0"],
        "trainer.max_steps must be a positive whole number of optimizer steps, got 0",
    ),
    "max_steps_float": (["trainer.max_steps=1e3"], mistyped("1000.0", "Integer", "trainer.max_steps")),
    "ckpt_missing": (["ckpt_path=/nonexistent/run"], "ckpt_path=/nonexistent/run does not exist"),
    "ckpt_empty": (["ckpt_path="], "ckpt_path is empty: give a run folder or a .ckpt file"),  # an unset variable
    "block_size": (
        ["data.block_size=32"],
        "data.block_size=32 is longer than the model's context, model.block_size=16",
    ),
    "model_size": (["model.n_layer=3"], "different model: model.n_layer=2 in the checkpoint, 3 here"),
    "gpu": (["trainer=gpu"], "asks for a GPU, but PyTorch sees none .* trainer=cpu"),
    "optimizer": (
        ["optimizer.lr=1e-2", "trainer.max_steps=60"],
        r"other optimizer settings: optimizer.lr=0.003 in the checkpoint, 0.01 here\. .*resume with the",
    ),
    "other_optimizer": (["optimizer=sgd", "trainer.max_steps=60"], r"optimizer.name=adamw in the checkpoint, sgd here"),
    "finished": (["trainer.max_steps=40"], "is at step 40, and trainer.max_steps=40: there is nothing left to train"),
    "accumulate": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches must be a positive whole"),
    "val_every": (["trainer.val_check_interval=0"], "trainer.val_check_interval must be a positive whole number"),
    "clip": (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be a norm >= 0"),
    "log_every": (
        ["trainer.log_every_n_steps=0"],
        "trainer.log_every_n_steps must be a positive whole number of optimizer steps, got 0",
    ),
    "samples": (
        ["callbacks.text_samples.temperature=0"],
        "callbacks.text_samples.max_new_tokens and .temperature must",
    ),
    "min_lr_ratio": (["scheduler.min_lr_ratio=-1"], "scheduler.min_lr_ratio is the final learning rate over the peak"),
    "patience": (
        ["callbacks.early_stopping.patience=abc"],
        mistyped("abc", "Integer", "callbacks.early_stopping.patience"),
    ),
    # habits from epoch-based projects: a run is one endless epoch of random windows, counted in steps
    "max_epochs": (
        ["+trainer.max_epochs=1"],
        r"trainer.max_epochs=1: a minigpt run is one endless epoch .* trainer.max_steps",
    ),
    "limit_train": (
        ["+trainer.limit_train_batches=5"],
        r"limit_train_batches=5: .* Use trainer.max_steps, or .*debug=fdr",
    ),
    "limit_val": (["+trainer.limit_val_batches=2"], r"limit_val_batches=2: .* Use data.val_batches"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_get_a_clear_message_and_lose_nothing(case, earlier_run, text_file, tmp_path):
    if case == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    overrides, message = CASES[case]
    if overrides is None:  # the run's data file has changed (or broken) since: its checkpoint names this one
        overrides = bad_data(tmp_path)[case]
        last = earlier_run / "checkpoints" / "last.ckpt"
        checkpoint = torch.load(last, weights_only=True)
        checkpoint["datamodule_hyper_parameters"]["path"] = compose_train(overrides).data.path
        torch.save(checkpoint, last)
    # a resume of the earlier run, with one mistake: the resume points run_dir at the earlier run's folder
    cfg = compose_train(
        TINY + [f"data.path={text_file}", f"ckpt_path={earlier_run}"] + overrides, run_dir=tmp_path / "new"
    )
    before = snapshot(earlier_run, text_file.parent, tmp_path)
    with pytest.raises(Exception, match=message):
        train.train(cfg)
    assert snapshot(earlier_run, text_file.parent, tmp_path) == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prompt='ROMEO€#'"], "The prompt 'ROMEO€#' cannot be encoded: 2 character"),
        (["max_new_tokens=0"], "max_new_tokens must be a positive whole number, got 0"),
        (["top_k=0"], r"top_k must be a positive whole number, got 0 \(or null"),
        (["num_samples=2.5"], r"Value '2.5' of type 'float' could not be converted to Integer\s+full_key: num_samples"),
        (["temperature=hot"], r"Value 'hot' of type 'str' could not be converted to Float\s+full_key: temperature"),
        (["temperature=1e-45"], "temperature must be a number of at least 1e-06, got 1e-45"),  # logits / it: inf
        (["temperature=nan"], "temperature must be a number of at least 1e-06, got nan"),
        (["prompt="], r"prompt must not be empty: give at least one character, e.g. 'prompt=\\n'"),
        (["device=gpu"], "device='gpu' is not a device PyTorch knows"),
        (["ckpt_path=/nonexistent/run"], "ckpt_path=/nonexistent/run does not exist"),
    ],
)
def test_bad_sampling_inputs_get_a_clear_message(overrides, message, earlier_run):
    cfg = compose_sample([f"ckpt_path={earlier_run}"] + overrides)
    before = snapshot(earlier_run)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sample.sample(cfg)
    assert snapshot(earlier_run) == before


@pytest.mark.slow
def test_a_new_run_in_a_folder_that_holds_one_is_refused_before_anything_is_written(
    earlier_run, text_file, tmp_path_factory
):
    no_checkpoint = tmp_path_factory.mktemp("diverged")  # a run that stopped before its first checkpoint
    shutil.copytree(earlier_run / "tensorboard", no_checkpoint / "tensorboard")
    (earlier_run / ".hydra").mkdir()
    (earlier_run / ".hydra" / "config.yaml").write_text(
        "seed: 1\n"
    )  # the earlier run's record, which Hydra would replace
    before = snapshot(earlier_run)
    for args, message in [
        (
            [f"hydra.run.dir={earlier_run}"],
            f"error: hydra.run.dir={earlier_run} already holds a run .*checkpoints/"
            f".* Resume that run with: python train.py ckpt_path={earlier_run}",
        ),
        (
            ["-m", f"hydra.sweep.dir={earlier_run.parent}"],
            f"error: hydra.sweep.dir={earlier_run.parent} already holds the runs of 1 jobs .*in earlier\\)",
        ),
        (
            [f"hydra.run.dir={no_checkpoint}"],
            "already holds a run .*it saved no checkpoint, so it cannot be resumed\\)\\. Start the new one in another",
        ),
        ([f"hydra.run.dir={earlier_run / 'checkpoints' / 'last.ckpt'}"], "is a file, not a folder"),
        (
            [f"ckpt_path={earlier_run}", f"hydra.run.dir={earlier_run}"],  # the resume's own record would replace it
            f"error: hydra.run.dir={earlier_run} holds a run's record \\(.hydra\\), "
            "which this resumed run's own record "
            "would replace.* Give the resume another hydra.run.dir \\(e.g. .*-resumed",
        ),
    ]:
        out = run_python("train.py", *args, *TINY, f"data.path={text_file}", check=False)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert re.search(message, out.stderr), out.stderr
        assert snapshot(earlier_run) == before  # .hydra included: refused before Hydra writes


@pytest.mark.slow
def test_a_run_folder_that_another_run_is_writing_is_refused(text_file, tmp_path):
    """Two runs started in the same second get the same dated folder, and neither has written when the other looks."""
    folder = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *TINY,
            f"data.path={text_file}",
            "trainer.max_steps=100000",
            "trainer.val_check_interval=20",
            f"hydra.run.dir={folder}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (folder / "checkpoints" / "last.ckpt").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run stopped before its checkpoint"
            time.sleep(0.5)
        for args, key in [
            ([f"hydra.run.dir={folder}"], "hydra.run.dir"),
            ([f"ckpt_path={folder}", f"hydra.run.dir={tmp_path / 'resumed'}"], "ckpt_path"),
        ]:
            out = run_python("train.py", *TINY, f"data.path={text_file}", *args, check=False)
            assert first.poll() is None  # still writing while the second one looked
            assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
            assert f"error: {key}={folder} is being written by another run that is still going" in out.stderr
        assert not (tmp_path / "resumed" / ".hydra").exists()  # refused before Hydra wrote its record
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow
def test_a_bug_keeps_its_traceback_on_the_console_and_in_train_log(text_file, tmp_path):
    out = run_python(
        "train.py",
        *TINY,
        f"data.path={text_file}",
        f"hydra.run.dir={tmp_path}",
        "+callbacks.bug._target_=tests.crash.RaiseAt",
        "+callbacks.bug.step=3",
        check=False,
    )
    assert out.returncode == 1 and "RuntimeError: a bug at step 3" in out.stderr
    log = (tmp_path / "train.log").read_text()
    assert "The run failed:\nTraceback (most recent call last):" in log and "RuntimeError: a bug at step 3" in log


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["model=huge"], r"Could not find 'model/huge'\s+Available options in 'model':\s+seed\s+small\s+tiny"),
        (
            ["optimizer.learning_rate=1e-3"],
            r"Could not override 'optimizer.learning_rate'.*Key 'learning_rate' is not in struct",
        ),
        (
            ["data.batch_size=0"],
            r"^error: data.batch_size and data.block_size must be positive whole numbers, got 0 and 16\n$",
        ),
        (["optimizer.name=muon"], r"^error: optimizer.name=muon renames optimizer=adamw .* choose optimizer=muon"),
    ],
)
def test_the_command_line_prints_one_paragraph_not_a_traceback(args, message, earlier_run, text_file, tmp_path):
    before = snapshot(earlier_run)
    out = run_python(
        "train.py",
        *TINY,
        f"data.path={text_file}",
        f"ckpt_path={earlier_run}",
        *args,
        f"hydra.run.dir={tmp_path / 'new'}",
        check=False,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert re.search(message, out.stderr, flags=re.S), out.stderr
    if "error: " in out.stderr:  # said once (train.log has it too), not also as a log line
        assert out.stderr.count(out.stderr.split("error: ", 1)[1].strip()[:60]) == 1, out.stderr
    assert snapshot(earlier_run) == before


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(cfg_tiny):
    with open_dict(cfg_tiny):
        cfg_tiny.callbacks.step_checkpoint.every_n_train_steps = 4
        cfg_tiny.callbacks.poison = {"_target_": "tests.crash.PoisonAt", "step": 25}
    # poisoned when 25 steps are done: the loss of step 26 (where TensorBoard would put it) is the first bad one
    with pytest.raises(
        NonFiniteLossError,
        match="non-finite at step 26.*weights at step 2[6-8]: "
        "model.transformer.wte.weight.*the last checkpoint, from step 24, is the last good state.*resume with",
    ):
        train.train(cfg_tiny)
    last = load_checkpoint(Path(cfg_tiny.run_dir) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 24  # saved before the NaN; the save at 28 was refused
    assert all(torch.isfinite(w).all() for w in last["state_dict"].values())


def test_a_run_that_diverges_before_its_first_checkpoint_is_told_to_start_again(cfg_tiny):
    with open_dict(cfg_tiny):
        cfg_tiny.callbacks.poison = {"_target_": "tests.crash.PoisonAt", "step": 2}
    with pytest.raises(NonFiniteLossError, match="stopped before it saved a checkpoint. Start again with") as err:
        train.train(cfg_tiny)
    assert "ckpt_path" not in str(err.value)  # nothing to resume from
    assert not (Path(cfg_tiny.run_dir) / "checkpoints" / "last.ckpt").exists()


def test_a_resumed_run_that_diverges_before_saving_points_back_to_its_own_checkpoint(cfg_tiny):
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.max_steps = 20
    train.train(cfg_tiny)
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.max_steps = 40
        cfg_tiny.ckpt_path = cfg_tiny.run_dir
        cfg_tiny.callbacks.poison = {"_target_": "tests.crash.PoisonAt", "step": 22}
    with pytest.raises(NonFiniteLossError, match="the last checkpoint, from step 20, is the last good state"):
        train.train(cfg_tiny)


@pytest.mark.slow
def test_a_multirun_of_8_jobs_keeps_each_jobs_files_apart_and_survives_a_diverging_and_a_failing_job(
    text_file, tmp_path
):
    # few overrides: each is part of the job folder's name, which must stay under the file system's 255 bytes
    overrides = [
        "model=tiny",
        "trainer=cpu",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "data.batch_size=8",
        "data.val_batches=2",
        "logger=csv",
        "~callbacks.progress_bar",
    ]
    out = run_python(
        "train.py",
        "-m",
        "optimizer.lr=1e-3,3e-3,1e6,-1",
        "seed=1,2",
        *overrides,
        f"data.path={text_file}",
        f"hydra.sweep.dir={tmp_path}",
        timeout=300,
        check=False,
    )
    assert out.returncode == 1, out.stderr[-3000:]  # a job failed on a bad input, and the sweep says so
    assert re.search(r"Error executing job with overrides: \['optimizer.lr=-1', 'seed=1'", out.stderr)
    # a diverged job is a result: it says so, scores inf, and is not what fails the sweep
    assert out.stderr.count("error: train/loss became non-finite at step") == 2
    assert out.stderr.count("In this sweep the job scores inf") == 2 and "'optimizer.lr=1000000.0'" not in out.stderr
    jobs = sorted((p for p in tmp_path.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_", 1)[0]))
    assert len(jobs) == 8
    for job in jobs:
        job_overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        lr, seed = job_overrides["optimizer.lr"], job_overrides["seed"]
        assert f"optimizer.lr={lr},seed={seed}," in job.name  # its own config in its own folder
        log = (job / "train.log").read_text()
        if float(lr) == 1e6:
            assert "became non-finite at step" in log and not (job / "checkpoints" / "last.ckpt").exists()
            continue
        if float(lr) == -1:
            assert "optimizer.lr must be a positive number, got -1" in log and not (job / "checkpoints").exists()
            continue
        assert "Finished at step 20" in log and "non-finite" not in log
        checkpoint = load_checkpoint(job / "checkpoints" / "last.ckpt")
        assert checkpoint["global_step"] == 20
        assert checkpoint["hyper_parameters"]["optimizer"]["lr"] == float(lr)  # nobody else's checkpoint
        rows = (job / "csv" / "metrics.csv").read_text().splitlines()
        assert rows and len(rows) == len(set(rows))  # one run's metrics, written once
