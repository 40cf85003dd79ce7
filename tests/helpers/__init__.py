"""What the tests share besides fixtures: the tiny-run overrides, generated text, composed configs, pictures,
python commands in the project's root, a bare Lightning fit."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from minigpt import config  # noqa: F401  (registers the resolvers the YAML files use)

ROOT = Path(__file__).resolve().parents[2]
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
# Overrides that drop the pictures and samples drawn at each validation, for runs that test something else.
NO_PICTURES = ["~callbacks.computation_graph", "~callbacks.attention_maps", "~callbacks.text_samples"]

# A model built by hand, without Hydra: its characters and sizes.
VOCAB = "\n !,.:;?abcdefghijklmnopqrstuvwxyz"
SIZES = dict(n_layer=2, n_head=2, n_embd=32, block_size=16)


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


def compose_train(overrides: list[str], run_dir: Path | str | None = None) -> DictConfig:
    """The train config; with run_dir, a run of it writes there."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


def compose_sample(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


def run_python(
    *args: str, timeout: float = 120, check: bool = True, cwd: Path = ROOT, **kwargs
) -> subprocess.CompletedProcess:
    """python <args> in the project's root, output captured as text; with check, it must succeed, else the assert
    shows the end of stderr. Other keywords (env=...) go to subprocess.run."""
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def fit(module, x, y, steps: int, **trainer_settings) -> None:
    """Train module for `steps` optimizer steps on the one batch (x, y): a bare Lightning Trainer on the CPU that
    validates, logs and saves nothing."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **trainer_settings,
    )
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(x)))
