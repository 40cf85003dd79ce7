"""Shared fixtures: a few KB of generated text, the composed Hydra config, and one trained tiny run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

import train
from tests.helpers import NO_PICTURES, TINY, compose_train, make_text, run_python


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cfg_tiny_global(text_file) -> DictConfig:
    return compose_train(TINY + [f"data.path={text_file}"])


@pytest.fixture
def cfg_tiny(cfg_tiny_global, tmp_path) -> DictConfig:
    """A fresh copy of the tiny config writing into this test's own folder."""
    cfg = cfg_tiny_global.copy()
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    return cfg


@pytest.fixture
def run_log(caplog, monkeypatch):
    """caplog at INFO that also sees Lightning's lines (rank_zero_info and the like): Lightning logs to its own
    handler and does not propagate to the root logger, where caplog listens."""
    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", True)
    caplog.set_level(logging.INFO)
    return caplog


@pytest.fixture(scope="session")
def trained_run(cfg_tiny_global, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """One tiny training run shared by every test that needs a checkpoint or event files."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = cfg_tiny_global.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    metrics = train.train(cfg)
    return run_dir, metrics


@pytest.fixture(scope="session")
def multirun_dir(text_file, tmp_path_factory) -> Path:
    """A real two-job Hydra multirun (adamw against sgd) of the tiny model, logging to TensorBoard and CSV."""
    sweep_dir = tmp_path_factory.mktemp("multirun")
    overrides = [o for o in TINY if not o.startswith("optimizer.")] + [
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "logger=[tensorboard,csv]",
        *NO_PICTURES,  # only events needed
    ]
    # job folders are named by the swept override only: all of them would make a name too long for the file system
    fixed = ",".join(["data.path"] + [o.split("=")[0].lstrip("~") for o in overrides])
    run_python(
        "train.py",
        "-m",
        "optimizer=adamw,sgd",
        *overrides,
        f"data.path={text_file}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.job.config.override_dirname.exclude_keys=[{fixed}]",
        timeout=300,
    )
    return sweep_dir
