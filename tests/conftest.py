"""Shared fixtures: a few KB of generated text, the composed Hydra config, and one trained tiny run."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

WORDS = (
    "the king and queen of night shall speak to thee my lord what light is this fair sweet love "
    "death comes with morning bright stars do burn o romeo wherefore art thou gentle heart"
).split()

# Overrides that make a run take a second or two on a 2-core CPU.
TINY = [
    "model=tiny",
    "trainer=cpu",
    "trainer.max_steps=40",
    "trainer.val_check_interval=20",
    "trainer.log_every_n_steps=10",
    "trainer.enable_model_summary=false",
    "data.batch_size=8",
    "data.val_batches=2",
    "scheduler.warmup_steps=5",
    "optimizer.lr=3e-3",
    "~callbacks.progress_bar",
    "callbacks.text_samples.max_new_tokens=60",  # generating is the costliest picture on a CPU
    "callbacks.attention_maps.every_n_validations=1",  # the default draws every 5th; tests check each one
]


def decode_png(data: bytes) -> np.ndarray:
    """The pixels of a PNG as an (H, W, channels) array."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def assert_is_a_picture(pixels: np.ndarray, min_width: int = 300, min_height: int = 200) -> None:
    """Big enough to read, and drawn on: more than a blank canvas or a single colour."""
    height, width = pixels.shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 20, f"only {len(colours)} colours: a blank or nearly blank image"


def make_text(n_lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        speaker = rng.choice(["ROMEO", "JULIET", "KING"])
        lines.append(f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + ".\n")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def compose_sample(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


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
        "~callbacks.computation_graph",
        "~callbacks.attention_maps",
        "~callbacks.text_samples",
    ]  # only events needed
    # job folders are named by the swept override only: all of them would make a name too long for the file system
    fixed = ",".join(["data.path"] + [o.split("=")[0].lstrip("~") for o in overrides])
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "optimizer=adamw,sgd",
            *overrides,
            f"data.path={text_file}",
            f"hydra.sweep.dir={sweep_dir}",
            f"hydra.job.config.override_dirname.exclude_keys=[{fixed}]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir
