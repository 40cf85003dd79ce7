"""Reading checkpoints: finding one in a run folder, loading it safely, and rebuilding the model from it.

Nothing here imports Lightning (about 7 s of start-up on a 2-core CPU, most of `sample.py`'s): generating text
needs only the model, the tokenizer and the weights, all of which a checkpoint holds as plain data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_hparams

# MiniGPTModule's constructor arguments, which it saves as the checkpoint's hyper-parameters (a test holds the two
# equal): a checkpoint with others was written by another version, whose model this one may build differently.
# What a checkpoint holds beyond Lightning's own keys (MiniGPTModule.on_save_checkpoint writes it in each): every
# reader refuses another format, with one message.
CHECKPOINT_FORMAT = 1


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """`torch.load` with `weights_only=True` (tensors and plain containers only) and errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    try:
        # mmap: resuming reads the file here for its step and sizes, then again in Lightning; mapped, the tensors
        # are paged in only when used instead of being copied into memory twice.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors alike for a damaged or unsafe file
        raise ValueError(
            f"Could not load checkpoint {path}: it is truncated, damaged, or holds objects other than tensors and "
            f"plain containers, which are never unpickled ({type(err).__name__}: {load_failure(err)})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path} is not a checkpoint: it holds a {type(checkpoint).__name__}, where a checkpoint is a "
            "dictionary of the model's weights and settings."
        )
    return checkpoint


def load_failure(err: Exception) -> str:
    """What torch.load found wrong with the file, in one line: of its weights-only refusal, only the refused global
    (its advice, weights_only=False or allow-listing the global, would run the file's code)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = [line for line in lines if "GLOBAL " in line]
    if refused:
        return refused[0].removeprefix("WeightsUnpickler error: ").split(". Please")[0].rstrip(".")
    return lines[0] if lines else "no message"


def check_format(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint of another format than this version writes (also a file minigpt did not write)."""
    found = checkpoint.get("minigpt_format", "none")
    if found != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} was written by another version of minigpt (checkpoint format {found}; this version reads "
            f"format {CHECKPOINT_FORMAT}): use the version that wrote it, or train a new model."
        )


def hyper_parameters(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The checkpoint's hyper-parameters (MiniGPTModule's constructor arguments), checked to be this version's."""
    check_format(checkpoint, path)
    return dict(checkpoint["hyper_parameters"])


def read_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer | BPETokenizer]:
    """The trained model (in eval mode) and its tokenizer, from a checkpoint alone, without Lightning."""
    checkpoint = load_checkpoint(path, map_location)
    hparams = hyper_parameters(checkpoint, path)
    prefix = "model."  # MiniGPTModule keeps the GPT as its `model` attribute
    weights = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        tokenizer = tokenizer_from_hparams(hparams.get("vocab"), hparams.get("bpe"))
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **(hparams.get("model") or {})))
        model.load_state_dict(weights)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"{path} is not a minigpt checkpoint ({type(err).__name__}: {err})") from None
    return model.to(map_location).eval(), tokenizer


def checkpoint_path(cfg: DictConfig, command: str) -> str:
    """`cfg.ckpt_path`, which has no default (`???`): without it, an error that says what to give."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ValueError(
            f"ckpt_path is missing: give the run to read, e.g. {command} ckpt_path=outputs/<date>/<time> "
            "(a run folder, as the run's last line names it, or a .ckpt file)"
        )
    return cfg.ckpt_path


def run_folder_of(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint file belongs to (`<run folder>/checkpoints/<file>`), or None for a loose file."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def find_checkpoint(path: str | Path, prefer: str = "last") -> Path:
    """A checkpoint file given as itself or as a run folder: its `last.ckpt`, or with prefer="best" the best one."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"ckpt_path={path} does not exist: give a .ckpt file or a run folder under outputs/.")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    last = folder / "last.ckpt"
    others = sorted((p for p in folder.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime)
    if last.is_file() and (prefer == "last" or not others):
        return last
    if prefer == "best" and len(others) > 1:  # save_top_k > 1: the newest of the top k need not be the best
        # last.ckpt, written after the top-k file of each save, has the newest record (save_last=false: the newest)
        return recorded_best(folder, last if last.is_file() else others[-1]) or others[-1]
    if others:  # with save_top_k=1 (the default) the best is the only one
        return others[-1]
    runs = sorted({p.parent.parent for p in path.glob("*/checkpoints/*.ckpt")})
    if runs:  # a multirun's folder, or outputs/<date>: the runs are inside
        listed = ", ".join(str(run) for run in runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
        raise FileNotFoundError(
            f"No checkpoint in {path} itself: it holds the folders of {len(runs)} runs with "
            f"checkpoints ({listed}). Give one of them as ckpt_path."
        )
    raise FileNotFoundError(
        f"No checkpoint in {folder}: the run saved none. Either it stopped before its first "
        "validation, or its callbacks keep no checkpoint (callbacks=none, experiment=speedrun; "
        "its .hydra/config.yaml says which)."
    )


def recorded_best(folder: Path, checkpoint: Path) -> Path | None:
    """The best checkpoint as the run's ModelCheckpoint monitoring val/loss recorded it in `checkpoint`, if that file
    is still in `folder` (looked up by name: the run folder may have moved since)."""
    try:
        states = load_checkpoint(checkpoint).get("callbacks", {}).values()  # mapped: the weights are not read
    except ValueError:
        return None
    for state in states:
        if isinstance(state, dict) and state.get("monitor") == "val/loss" and state.get("best_model_path"):
            best = folder / Path(state["best_model_path"]).name
            return best if best.is_file() else None
    return None
