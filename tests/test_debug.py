"""The debug group (python train.py debug=...), tags, and the --help of each command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import train
from tests.helpers import compose_train, run_python


def debug_run(name: str, text_file: Path, tmp_path: Path, *overrides: str) -> dict[str, float]:
    return train.train(compose_train([f"debug={name}", f"data.path={text_file}", *overrides], run_dir=tmp_path))


def test_debug_fdr_runs_one_batch_of_each_and_writes_no_checkpoint(text_file, tmp_path):
    metrics = debug_run("fdr", text_file, tmp_path)
    assert metrics["step"] == 1 and "val/loss" in metrics  # one training batch, then one validation batch
    assert not list(tmp_path.rglob("*.ckpt"))  # Lightning turns checkpointing off


def test_debug_smoke_runs_the_tiny_model_with_every_callback(text_file, tmp_path):
    metrics = debug_run("smoke", text_file, tmp_path, "tags=[smoke,ci]")
    assert metrics["step"] == 20
    written = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoints", "tensorboard", "loss_curve.png", "gradient_flow.png", "attention_layer0.png"} <= written
    hparams = yaml.safe_load((tmp_path / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["tags"] == ["smoke", "ci"] and hparams["model"]["n_embd"] == 32


@pytest.mark.slow
def test_debug_profiler_writes_lightnings_simple_profile(text_file, tmp_path):
    debug_run("profiler", text_file, tmp_path, "model=tiny")
    (profile,) = tmp_path.glob("*profile*.txt")
    assert "run_training_batch" in profile.read_text()


def test_help_lists_each_commands_own_options():
    def help_of(*command: str) -> str:
        return run_python(*command, "--help").stdout

    train_help = help_of("train.py")
    assert "debug: default, fdr, profiler, smoke" in train_help and "tags: []" in train_help
    sample_help = help_of("sample.py")
    assert "max_new_tokens: 500" in sample_help and "trainer" not in sample_help and "debug" not in sample_help
