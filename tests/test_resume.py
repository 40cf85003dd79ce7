"""Killed runs resume bit for bit; checkpoints are written atomically and cannot run code when loaded."""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sample
import train
from minigpt.checkpoint import load_checkpoint
from minigpt.checkpoint_io import AtomicCheckpointIO
from minigpt.module import MiniGPTModule
from tests.helpers import NO_PICTURES, TINY, compose_sample, compose_train, run_python

# 24 steps of 2 accumulated batches, validated every 12 batches (6 steps), last.ckpt also every 4 steps in
# between; dropout on, so the generator state matters as much as the sampler's; attention maps at the 1st and 4th
# validation (steps 6 and 24), so a resume from step 12 or 16 must remember the validations before it
RESUMABLE = [
    o for o in TINY if not o.startswith(("trainer.val_check_interval", "trainer.max_steps", "callbacks.attention_maps"))
] + [
    "trainer.max_steps=24",
    "trainer.accumulate_grad_batches=2",
    "trainer.val_check_interval=12",
    "trainer.log_every_n_steps=2",
    "callbacks.step_checkpoint.every_n_train_steps=4",
    "model.dropout=0.1",
    "callbacks.attention_maps.every_n_validations=3",
]


def run_train(args: list[str], hydra_dir: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_python("train.py", *args, f"hydra.run.dir={hydra_dir}", timeout=300, check=check)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged scalar as (step, value) pairs, as TensorBoard shows them (purged steps hidden)."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def image_steps(run_dir: Path) -> dict[str, list[int]]:
    """The steps of every logged picture, as TensorBoard shows them."""
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}


def console_means(done: subprocess.CompletedProcess) -> list[str]:
    """The lines a run prints at each validation: 'step 12: train/loss 3.9914 (mean since ...), val/loss ...'."""
    return re.findall(r"step \d+: train/loss .*", done.stdout + done.stderr)


@pytest.mark.slow
def test_a_killed_run_resumes_bit_for_bit_in_the_same_folder(text_file, tmp_path):
    args = RESUMABLE + [f"data.path={text_file}", "logger=[tensorboard,csv]"]
    uninterrupted = run_train(args, tmp_path / "a")
    expected = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert expected["global_step"] == 24

    # killed after the step checkpoint of step 16 and resumed by folder; killed after the validation checkpoint
    # of step 12 and resumed by file
    for name, kill_at, saved_at, by_file in [("b", 17, 16, False), ("c", 13, 12, True)]:
        run_dir = tmp_path / name
        killed = run_train(
            args + ["+callbacks.kill._target_=tests.crash.SigkillAt", f"+callbacks.kill.step={kill_at}"],
            run_dir,
            check=False,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == saved_at
        resume_from = run_dir / "checkpoints" / "last.ckpt" if by_file else run_dir
        resumed = run_train(args + [f"ckpt_path={resume_from}"], tmp_path / f"{name}_resume_log")
        assert "out of order" not in resumed.stdout + resumed.stderr  # the reader's "TensorFlow restart" warning
        # the console's validations are the uninterrupted run's (its mean train/loss starts again at a resume that
        # falls between two validations: TensorBoard's train/loss, compared below, is the exact record)
        said, expected_lines = console_means(resumed), console_means(uninterrupted)
        assert [line.split("val/loss")[-1] for line in said] == [
            line.split("val/loss")[-1] for line in expected_lines[-len(said) :]
        ], name
        if by_file:  # c: resumed at a validation's checkpoint: the mean starts there in both runs
            assert said == expected_lines[-len(said) :], name

        got = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
        assert got["global_step"] == 24
        for key, value in expected["state_dict"].items():
            assert torch.equal(got["state_dict"][key], value), (name, key)  # the same weights, bit for bit
        for a, b in zip(
            expected["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values()
        ):
            assert all(torch.equal(a[k], b[k]) for k in a)  # and the same Adam moments
        # the same files, and the same curve: every scalar at every step, with no step logged twice
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(
            p.name for p in (tmp_path / "a" / "checkpoints").iterdir()
        )
        curve, expected_curve = scalars(run_dir), scalars(tmp_path / "a")
        assert curve["val/loss"][-1] == expected_curve["val/loss"][-1]  # the same final val/loss, exactly
        assert curve == expected_curve, name
        assert curve["val/loss_best"] == expected_curve["val/loss_best"]  # the best before the kill was kept
        assert image_steps(run_dir) == image_steps(tmp_path / "a"), name  # the same validations drawn
        assert image_steps(run_dir)["attention/layer_0"] == [6, 24]
        # metrics.csv too: the rows before the checkpoint kept (Lightning's writer would delete them), none twice
        assert (run_dir / "csv" / "metrics.csv").read_text() == (tmp_path / "a" / "csv" / "metrics.csv").read_text()
        assert not (tmp_path / f"{name}_resume_log" / "checkpoints").exists()  # nothing went to a new folder


@pytest.mark.slow
def test_a_killed_muon_run_resumes_bit_for_bit(text_file, tmp_path):
    """Muon's momentum buffers and its AdamW part's moments and step counts travel through the checkpoint."""
    args = RESUMABLE + [f"data.path={text_file}", "optimizer=muon", "model.rope=true", "logger=none"]
    run_train(args, tmp_path / "a")
    expected = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    killed = run_train(
        args + ["+callbacks.kill._target_=tests.crash.SigkillAt", "+callbacks.kill.step=13"],
        tmp_path / "b",
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_train(args + [f"ckpt_path={tmp_path / 'b'}"], tmp_path / "b_resume_log")
    got = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert got["global_step"] == expected["global_step"] == 24
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    states, expected_states = got["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"]
    assert {k for s in expected_states.values() for k in s} == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}
    for index, state in expected_states.items():
        assert all(torch.equal(state[k], states[index][k]) for k in state), index


@pytest.mark.slow
def test_a_run_killed_while_saving_keeps_its_last_checkpoint(trained_run, tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    shutil.copytree(trained_run[0] / "checkpoints", last.parent)
    before = last.read_bytes()
    died = run_python("-m", "tests.crash", str(last), check=False)
    assert died.returncode == -signal.SIGKILL
    assert last.read_bytes() == before  # the old checkpoint is untouched ...
    assert MiniGPTModule.from_checkpoint(last)  # ... and loads
    assert sorted(p.name for p in last.parent.glob("*.ckpt")) == sorted(
        p.name for p in (trained_run[0] / "checkpoints").glob("*.ckpt")
    )


def test_checkpoints_are_replaced_atomically_and_leave_no_temporary_files(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("serialisation failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        io.save_checkpoint({"state_dict": {"w": torch.full((2,), 7.0)}, "bad": Unpicklable()}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_truncated_checkpoints_get_an_error_naming_the_file(trained_run, tmp_path, cfg_tiny):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((trained_run[0] / "checkpoints" / "last.ckpt").read_bytes()[:20000])
    cfg_tiny.ckpt_path = str(truncated)
    with pytest.raises(ValueError, match="truncated.ckpt.*truncated, damaged"):
        train.train(cfg_tiny)
    with pytest.raises(ValueError, match="truncated.ckpt.*truncated, damaged"):
        AtomicCheckpointIO().load_checkpoint(truncated)
    out = run_python("sample.py", f"ckpt_path={truncated}", check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: Could not load checkpoint") and str(truncated) in out.stderr


class CreateFile:
    """Unpickling this creates a file: the payload a malicious checkpoint would carry."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_checkpoint_cannot_run_code_through_any_entry_point(trained_run, tmp_path, cfg_tiny):
    marker = tmp_path / "pwned"
    checkpoint = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = CreateFile(marker)
    evil = tmp_path / "evil" / "checkpoints" / "last.ckpt"
    evil.parent.mkdir(parents=True)
    torch.save(checkpoint, evil)
    with pytest.raises(pickle.UnpicklingError):  # the payload works: a plain pickle load would run it
        torch.load(evil, weights_only=True)
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    cfg_tiny.ckpt_path = str(evil.parent.parent)
    sample_cfg = compose_sample([f"ckpt_path={evil}"])
    entry_points = {
        "resume": lambda: train.train(cfg_tiny),
        "trainer": lambda: AtomicCheckpointIO().load_checkpoint(evil),
        "sample.py": lambda: sample.sample(sample_cfg),
        "from_checkpoint": lambda: MiniGPTModule.from_checkpoint(evil),
    }
    for name, load in entry_points.items():
        with pytest.raises(ValueError, match=f"{evil}.*never unpickled.*GLOBAL getattr") as err:
            load()
        assert not marker.exists(), name
        assert "weights_only" not in str(err.value)  # torch's advice to load it anyway, which would run its code


def test_checkpoints_load_without_unpickling_any_class_and_hold_what_a_resume_needs(trained_run):
    # weights_only=True loads them without allow-listing anything: no project type is pickled
    checkpoint = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(checkpoint["rng_states"]) >= {"torch"}
    assert any(key.startswith("StepCheckpoint") for key in checkpoint["callbacks"])
    assert checkpoint["val_loss_best"] == pytest.approx(min(v for _, v in scalars(trained_run[0])["val/loss"]))


@pytest.mark.parametrize(
    "overrides, last_step",
    [
        (["trainer.max_steps=27"], 27),  # past the validation at 20, before any step checkpoint: saved at the end
        (
            ["trainer.max_steps=20", "~callbacks.model_checkpoint", "callbacks.step_checkpoint.every_n_train_steps=5"],
            20,
        ),
    ],
)
def test_last_ckpt_holds_the_last_step_whatever_the_intervals(overrides, last_step, text_file, tmp_path):
    train.train(compose_train(TINY + NO_PICTURES + [f"data.path={text_file}", *overrides], run_dir=tmp_path))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == last_step


def test_a_run_without_checkpoint_callbacks_writes_no_checkpoint(text_file, tmp_path):
    cfg = compose_train(
        [o for o in TINY if not o.startswith(("~callbacks", "callbacks"))]
        + [f"data.path={text_file}", "callbacks=none", "trainer.max_steps=20"],
        run_dir=tmp_path,
    )
    train.train(cfg)
    assert not list(tmp_path.rglob("*.ckpt"))  # Lightning adds a checkpoint callback of its own unless told not to


def test_atomically_written_files_get_the_usual_permissions(tmp_path):
    """mkstemp makes owner-only files: a checkpoint or token file would be unreadable to the user's group."""
    import os

    from minigpt.atomic import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "file.bin") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "file.bin").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "step, said",
    [
        (
            25,
            "Interrupted at step 25; the last checkpoint is from step 20. Resume with: python train.py ckpt_path={run}",
        ),
        (
            5,
            "Interrupted at step 5, before the run saved a checkpoint: there is nothing to resume. "
            "Start again in a new "
            "folder (or delete {run} first)",
        ),
    ],
)
def test_ctrl_c_says_how_to_resume_or_that_there_is_nothing_to_resume(step, said, text_file, tmp_path, caplog):
    cfg = compose_train(
        TINY
        + NO_PICTURES
        + [
            f"data.path={text_file}",
            "callbacks.step_checkpoint.every_n_train_steps=10",
            "+callbacks.interrupt._target_=tests.crash.InterruptAt",
            f"+callbacks.interrupt.step={step}",
        ],
        run_dir=tmp_path,
    )
    with caplog.at_level("INFO", logger="minigpt.resume"), pytest.raises(SystemExit):
        train.train(cfg)
    assert said.format(run=tmp_path) in caplog.text
    if step > 10:
        assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 20


def test_a_checkpoint_of_another_format_is_refused_with_one_message(trained_run, cfg_tiny):
    run = Path(cfg_tiny.run_dir) / "old"
    shutil.copytree(trained_run[0], run)
    last = run / "checkpoints" / "last.ckpt"
    old = torch.load(last, weights_only=True)
    del old["minigpt_format"]  # as minigpt wrote them before it numbered its format
    torch.save(old, last)
    with open_dict(cfg_tiny):
        cfg_tiny.ckpt_path, cfg_tiny.trainer.max_steps = str(run), 41
    before = last.read_bytes()
    with pytest.raises(
        ValueError, match=r"written by another version of minigpt \(checkpoint format none; this version"
    ):
        train.train(cfg_tiny)
    assert last.read_bytes() == before  # nothing lost


def test_going_on_from_an_older_checkpoint_of_a_run_that_went_on_is_refused(trained_run, cfg_tiny):
    from minigpt import resume

    run = Path(cfg_tiny.run_dir) / "run"
    shutil.copytree(trained_run[0], run)
    older = load_checkpoint(run / "checkpoints" / "last.ckpt")
    older["global_step"] = 20
    torch.save(dict(older), run / "checkpoints" / "step000020.ckpt")
    with open_dict(cfg_tiny):
        cfg_tiny.ckpt_path = str(run / "checkpoints" / "step000020.ckpt")
    with pytest.raises(
        ValueError,
        match=r"is at step 20, but its run went on to step 40 \(last.ckpt\): going on from "
        r"it in .* would cut steps 21-40 .* Resume the run where it stopped with",
    ):
        resume.resume_point(cfg_tiny)
    shutil.copy(run / "checkpoints" / "step000020.ckpt", run / "branch.ckpt")  # copied out: a new run from it
    with open_dict(cfg_tiny):
        cfg_tiny.ckpt_path, cfg_tiny.run_dir = str(run / "branch.ckpt"), str(run / "new")
    assert resume.resume_point(cfg_tiny)[1]["global_step"] == 20 and cfg_tiny.run_dir == str(run / "new")


def test_resuming_on_other_data_is_refused_and_the_same_file_spelled_otherwise_is_not(
    trained_run, cfg_tiny, monkeypatch, tmp_path, caplog
):
    from minigpt import resume

    checkpoint = load_checkpoint(trained_run[0] / "checkpoints" / "last.ckpt")
    trained_on = Path(checkpoint["datamodule_hyper_parameters"]["path"])
    other = tmp_path / "shuffled.txt"  # the same characters in another order: the vocabulary check passes it
    other.write_text("".join(sorted(trained_on.read_text(), reverse=True)))
    for key, value in [("path", str(other)), ("val_batches", 3), ("train_fraction", 0.8)]:
        cfg = cfg_tiny.copy()
        cfg.data[key] = value
        with pytest.raises(ValueError, match=rf"trained on other data: data.{key}=.* in the checkpoint, {value} here"):
            resume.check_same_data(cfg, checkpoint, Path("last.ckpt"))
    monkeypatch.chdir(trained_on.parent)
    cfg_tiny.data.path = trained_on.name  # relative: the same file
    resume.check_same_data(cfg_tiny, checkpoint, Path("last.ckpt"))
    moved = dict(
        checkpoint,
        datamodule_hyper_parameters={**checkpoint["datamodule_hyper_parameters"], "path": "/elsewhere/input.txt"},
    )  # the run came from elsewhere
    with caplog.at_level(logging.WARNING):
        resume.check_same_data(cfg_tiny, moved, Path("last.ckpt"))
    assert "read data.path=/elsewhere/input.txt, which is not here" in caplog.text


def test_a_resume_with_other_batches_or_schedule_is_warned_about(trained_run, cfg_tiny, caplog):
    from minigpt import resume

    checkpoint = load_checkpoint(trained_run[0] / "checkpoints" / "last.ckpt")
    with caplog.at_level(logging.WARNING):
        resume.warn_of_changed_settings(cfg_tiny, checkpoint)  # the run's own settings: nothing to say
        assert not caplog.records
        cfg_tiny.data.batch_size, cfg_tiny.data.val_seed, cfg_tiny.scheduler.warmup_steps = 4, 99, 7
        resume.warn_of_changed_settings(cfg_tiny, checkpoint)
    assert "data.batch_size=8 then, 4 now; data.val_seed=" in caplog.text
    assert "then, 99 now; scheduler.warmup_steps=5 then, 7 now" in caplog.text


def test_a_resume_on_other_numbers_of_devices_or_accumulated_batches_is_warned_about(trained_run, caplog):
    from types import SimpleNamespace

    from minigpt import resume

    checkpoint = load_checkpoint(trained_run[0] / "checkpoints" / "last.ckpt")  # one process, no accumulation
    assert checkpoint["global_batch"] == {"accumulate_grad_batches": 1, "devices": 1, "num_nodes": 1}
    with caplog.at_level(logging.WARNING):
        resume.warn_of_changed_global_batch(
            checkpoint, SimpleNamespace(accumulate_grad_batches=1, num_devices=1, num_nodes=1)
        )
        assert not caplog.records
        resume.warn_of_changed_global_batch(
            checkpoint, SimpleNamespace(accumulate_grad_batches=2, num_devices=4, num_nodes=1)
        )
    assert (
        "accumulate_grad_batches=1 then, 2 now; devices=1 then, 4 now. Each step learns from data.batch_size "
        "x 8 windows now, x 1 then"
    ) in caplog.text


def test_a_text_edited_in_place_since_the_checkpoint_is_warned_about(trained_run, text_file, tmp_path, caplog):
    from minigpt import resume
    from minigpt.data import TextDataModule

    checkpoint = load_checkpoint(trained_run[0] / "checkpoints" / "last.ckpt")
    assert set(checkpoint["TextDataModule"]["text"]) == {"train_tokens", "val_tokens", "val_head_sha256"}
    recorded = checkpoint["datamodule_hyper_parameters"]
    same = TextDataModule(**recorded)
    same.setup()
    edited_file = tmp_path / "edited.txt"
    text = text_file.read_text(encoding="utf-8")
    edited_file.write_text(text[len(text) // 2 :] + text[: len(text) // 2], encoding="utf-8")  # same characters
    edited = TextDataModule(**{**recorded, "path": str(edited_file)})
    edited.setup()
    with caplog.at_level(logging.WARNING):
        resume.warn_of_changed_text(checkpoint, same)
        assert not caplog.records
        resume.warn_of_changed_text(checkpoint, edited)
    assert len(caplog.records) == 1 and "The text changed since the checkpoint was saved" in caplog.text
    assert "other tokens): this run trains on the new text" in caplog.text  # the same lengths, other tokens


def test_train_py_warns_of_a_text_edited_in_place_since_its_checkpoint(cfg_tiny, text_file, tmp_path, caplog):
    corpus_file = tmp_path / "corpus.txt"
    text = text_file.read_text(encoding="utf-8")
    corpus_file.write_text(text, encoding="utf-8")
    with open_dict(cfg_tiny):
        cfg_tiny.data.path, cfg_tiny.trainer.max_steps, cfg_tiny.trainer.val_check_interval = str(corpus_file), 4, 4
        cfg_tiny.run_dir = str(tmp_path / "run")
    train.train(cfg_tiny)
    corpus_file.write_text(text[len(text) // 2 :] + text[: len(text) // 2], encoding="utf-8")  # edited in place
    with open_dict(cfg_tiny):
        cfg_tiny.ckpt_path, cfg_tiny.trainer.max_steps = str(tmp_path / "run"), 5
    with caplog.at_level(logging.WARNING):
        train.train(cfg_tiny)
    assert "The text changed since the checkpoint was saved" in caplog.text


def test_a_resume_with_a_longer_schedule_trains_its_first_step_at_the_new_schedules_rate(
    trained_run, cfg_tiny, tmp_path_factory
):
    from minigpt.module import warmup_cosine
    from minigpt.report import read_scalars

    branch = tmp_path_factory.mktemp("branch") / "last.ckpt"  # a copy: the run goes on in a folder of its own
    shutil.copy(trained_run[0] / "checkpoints" / "last.ckpt", branch)  # step 40, the end of a 40-step schedule
    with open_dict(cfg_tiny):
        cfg_tiny.ckpt_path, cfg_tiny.trainer.max_steps, cfg_tiny.trainer.log_every_n_steps = str(branch), 44, 1
        cfg_tiny.scheduler.warmup_steps = 2
    train.train(cfg_tiny)
    lr = read_scalars(Path(cfg_tiny.run_dir) / "tensorboard")[0]["train/lr/decay"]
    assert lr.steps == [41, 42, 43, 44]  # the steps this run took, each logged with the rate it trained at
    expected = [3e-3 * warmup_cosine(step, warmup_steps=2, max_steps=44, min_lr_ratio=0.1) for step in range(40, 44)]
    assert lr.values == pytest.approx(expected, rel=1e-6)  # not the old schedule's floor at its first step


def test_a_file_of_tensors_that_is_not_a_checkpoint_is_named_so(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "weights.ckpt")
    with pytest.raises(ValueError, match="weights.ckpt is not a checkpoint: it holds a Tensor"):
        load_checkpoint(tmp_path / "weights.ckpt")


def test_a_folder_of_runs_given_as_ckpt_path_names_the_runs_inside(trained_run, tmp_path):
    from minigpt.checkpoint import find_checkpoint

    for job in ("0_optimizer=adamw", "1_optimizer=sgd"):  # a multirun's folder
        shutil.copytree(trained_run[0] / "checkpoints", tmp_path / job / "checkpoints")
    with pytest.raises(
        FileNotFoundError,
        match=rf"No checkpoint in {tmp_path} itself: it holds the folders of 2 runs "
        rf"with checkpoints \({tmp_path}/0_optimizer=adamw, ",
    ):
        find_checkpoint(tmp_path)
