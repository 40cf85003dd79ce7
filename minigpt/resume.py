"""Resuming a run: the checkpoint it goes on from, and the checks that it can go on with this run's settings.

A resumed run goes on in the checkpoint's run folder with the same model, tokenizer and optimizer (whose state comes
back with its settings); the schedule is rebuilt from the config, so a new warmup or max_steps takes effect.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from minigpt.callbacks.step_checkpoint import last_saved_step
from minigpt.checkpoint import check_format, find_checkpoint, load_checkpoint, run_folder_of
from minigpt.module import MiniGPTModule
from minigpt.run_folder import ckpt_path_arg, shown

log = logging.getLogger(__name__)

# What a run's data is, and which windows it trains and validates on: a resume must not change them.
DATA_KEYS = ("path", "name", "glob", "tokenizer", "vocab_size", "train_fraction", "val_batches")


def resume_point(cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint `cfg.ckpt_path` names, loaded (weights only); `cfg.run_dir` set to the run folder it is in."""
    if cfg.ckpt_path is None:
        return None, None
    if not cfg.ckpt_path:  # ckpt_path=$UNSET_VARIABLE: not a new run, which would write elsewhere without a word
        raise ValueError(
            "ckpt_path is empty: give a run folder or a .ckpt file to resume from, or leave ckpt_path out "
            "to start a new run."
        )
    ckpt_file = find_checkpoint(cfg.ckpt_path, prefer="last")
    checkpoint = load_checkpoint(ckpt_file)
    check_format(checkpoint, f"ckpt_path={ckpt_file}")
    if (folder := run_folder_of(ckpt_file)) is not None:  # checkpoints and events go on in the checkpoint's run folder
        check_latest(ckpt_file, checkpoint["global_step"])
        cfg.run_dir = os.path.abspath(folder)
    log.info("Resuming from %s at step %d; writing to %s", ckpt_file, checkpoint["global_step"], cfg.run_dir)
    return ckpt_file, checkpoint


def check_latest(ckpt_file: Path, step: int) -> None:
    """Refuse to go on in a run folder from a checkpoint older than its last.ckpt, whose later steps would be lost
    (a damaged last.ckpt does not stop a resume)."""
    last = ckpt_file.parent / "last.ckpt"
    if ckpt_file.name == last.name or not last.is_file():
        return
    try:
        latest = load_checkpoint(last).get("global_step", -1)
    except ValueError:
        return
    if latest > step:
        folder = ckpt_file.parent.parent
        raise ValueError(
            f"ckpt_path={ckpt_file} is at step {step}, but its run went on to step {latest} ({last.name}): going on "
            f"from it in {folder} would cut steps {step + 1}-{latest} from the run's curves and overwrite its "
            f"last.ckpt. Resume the run where it stopped with ckpt_path={folder}, or copy the checkpoint out of "
            f"{ckpt_file.parent} and resume from the copy to branch a new run folder from step {step}."
        )


def check_data_and_settings(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_file: Path) -> None:
    """Before the data is read: refuse other data than the checkpoint's run had; warn of other batches or schedule."""
    check_same_data(cfg, checkpoint, ckpt_file)
    warn_of_changed_settings(cfg, checkpoint)


def check_run(
    checkpoint: dict[str, Any], ckpt_file: Path, module: MiniGPTModule, datamodule: Any, trainer: Any
) -> None:
    """Once the run is built: refuse another model or optimizer, or nothing left to train; warn of a changed text
    or global batch."""
    check_resumable(checkpoint, module, ckpt_file)
    warn_of_changed_text(checkpoint, datamodule)
    warn_of_changed_global_batch(checkpoint, trainer)
    if checkpoint["global_step"] >= trainer.max_steps:
        raise ValueError(
            f"ckpt_path={ckpt_file} is at step {checkpoint['global_step']}, and trainer.max_steps={trainer.max_steps}: "
            "there is nothing left to train. Give a larger trainer.max_steps to train on (the learning-rate schedule "
            "then spans the new length), or sample from it with sample.py."
        )


def say_where_to_resume(trainer: Any, checkpoint: dict[str, Any] | None, run_dir: str) -> None:
    """After Ctrl-C: the step the run can go on from, and the command that does."""
    saved = max(last_saved_step(trainer), checkpoint["global_step"] if checkpoint is not None else 0)
    if saved:
        log.info(
            "Interrupted at step %d; the last checkpoint is from step %d. Resume with: python train.py %s (and the "
            "same settings)",
            trainer.global_step,
            saved,
            ckpt_path_arg(shown(run_dir)),
        )
    else:
        log.info(
            "Interrupted at step %d, before the run saved a checkpoint: there is nothing to resume. Start again in a "
            "new folder (or delete %s first)",
            trainer.global_step,
            shown(run_dir),
        )


def check_same_data(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_file: Path) -> None:
    """Refuse other data than the checkpoint's run had (another text of the same characters passes the vocabulary
    check): val/loss, and so the best checkpoint kept, would compare the two."""
    recorded = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    then, now = recorded.get("path"), cfg.data.get("path")
    if then and now and then != now and not os.path.exists(os.path.expanduser(then)):  # paths (schema.Data) or None
        # the run folder was moved to another machine, or started elsewhere with a relative path: nothing to compare
        log.warning(
            "The checkpoint's run read data.path=%s, which is not here; this run reads %s: resume only with "
            "the same text.",
            then,
            now,
        )
        del recorded["path"]
    differences = [
        f"data.{key}={recorded[key]} in the checkpoint, {cfg.data[key]} here"
        for key in DATA_KEYS
        if key in recorded and key in cfg.data and not same_setting(recorded[key], cfg.data[key])
    ]
    if differences:
        raise ValueError(
            f"ckpt_path={ckpt_file} was trained on other data: {'; '.join(differences)}. A resumed run goes on "
            "comparing val/loss with its earlier validations and keeping its best checkpoint by it: resume with the "
            "data settings it was trained with (its .hydra/overrides.yaml has them), or start a new run without "
            "ckpt_path."
        )


def same_setting(then: Any, now: Any) -> bool:
    """Equal, or two spellings of one existing file or folder (a relative path and its absolute one)."""
    if then == now:
        return True
    if isinstance(then, str) and isinstance(now, str):
        then, now = os.path.expanduser(then), os.path.expanduser(now)
        return os.path.exists(then) and os.path.exists(now) and os.path.samefile(then, now)
    return False


def warn_of_changed_settings(cfg: DictConfig, checkpoint: dict[str, Any]) -> None:
    """Warn when the batches or the schedule differ from the checkpoint's run: allowed (a larger batch, a longer
    warmup), but the resumed run is then not the one an uninterrupted run would have been."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    schedule = checkpoint["hyper_parameters"]["scheduler"]
    changed = [
        f"data.{key}={data[key]} then, {cfg.data[key]} now"
        for key in ("batch_size", "seed", "val_seed")
        if key in data and key in cfg.data and data[key] != cfg.data[key]
    ]
    changed += [
        f"scheduler.{key}={schedule[key]} then, {cfg.scheduler[key]} now"
        for key in sorted(schedule)
        if key in cfg.scheduler and schedule[key] != cfg.scheduler[key]
    ]
    if changed:
        log.warning(
            "This resumed run goes on with other settings than its checkpoint's run: %s. It trains on, but "
            "not as the uninterrupted run would have (resume with the run's own overrides, in its "
            ".hydra/overrides.yaml, to go on exactly).",
            "; ".join(changed),
        )


def warn_of_changed_global_batch(checkpoint: dict[str, Any], trainer: Any) -> None:
    """Warn when a resume accumulates over other numbers of batches, devices or nodes than the checkpoint's run:
    allowed (a run goes on with fewer GPUs), but each optimizer step then learns from another number of windows."""
    then = checkpoint["global_batch"]
    now = {
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
    }
    changed = [f"{key}={then[key]} then, {now[key]} now" for key in now if then[key] != now[key]]
    if changed:
        log.warning(
            "This resumed run splits its optimizer steps otherwise than its checkpoint's run: %s. Each step "
            "learns from data.batch_size x %d windows now, x %d then: it trains on, but not as "
            "the uninterrupted run would have (the sweep report's tokens/s takes the first run's global "
            "batch, in tensorboard/hparams.yaml).",
            "; ".join(changed),
            math.prod(now.values()),
            math.prod(then.values()),
        )


def warn_of_changed_text(checkpoint: dict[str, Any], datamodule: Any) -> None:
    """Warn when the text itself changed since the checkpoint (edited in place: the same path and characters).
    Allowed, as training on a grown corpus is; but val/loss is then measured on other windows than before."""
    then = checkpoint[type(datamodule).__qualname__]["text"]
    now = datamodule.text_record()
    if then != now:
        log.warning(
            "The text changed since the checkpoint was saved (training split %d tokens then, %d now; "
            "validation split %d then, %d now%s): this run trains on the new text, but its val/loss is "
            "measured on other windows than before, so the curve and the best checkpoint compare the two. "
            "Restore the text to go on as before, or start a new run for a comparable val/loss.",
            then["train_tokens"],
            now["train_tokens"],
            then["val_tokens"],
            now["val_tokens"],
            ", other tokens" if then["val_tokens"] == now["val_tokens"] else "",
        )


def check_resumable(checkpoint: dict[str, Any], module: MiniGPTModule, ckpt_file: Path) -> None:
    """Refuse a checkpoint of another tokenizer, model size or optimizer settings, naming what differs."""
    saved, here = checkpoint["hyper_parameters"], module.hparams
    if saved.get("bpe") != here.get("bpe"):
        if "bpe" in saved and "bpe" in here:  # both BPEs: their merges differ
            why = (
                "trained with a byte-level BPE whose merges differ from those this run's data gives: the text "
                "changed. Resume with the text it was trained on"
            )
        else:
            then, now = ("a byte-level BPE" if "bpe" in hparams else "characters" for hparams in (saved, here))
            why = (
                f"trained with another tokenizer ({then}) than this run's data gives ({now}). Resume with "
                "the data and data.tokenizer it was trained with"
            )
        raise ValueError(f"ckpt_path={ckpt_file} was {why}, or start a new run without ckpt_path.")
    if saved.get("vocab") != here.get("vocab"):  # both of characters
        only_saved, only_here = (
            "".join(sorted(set(a) - set(b))) for a, b in ((saved["vocab"], here.vocab), (here.vocab, saved["vocab"]))
        )
        raise ValueError(
            f"ckpt_path={ckpt_file} was trained on a vocabulary of {len(saved['vocab'])} characters, but this run's "
            f"text has {len(here.vocab)} (only in the checkpoint: {only_saved!r}; only in the text: {only_here!r}). "
            "Resume with the data it was trained on (data.path=...), or start a new run without ckpt_path."
        )
    # The optimizer's state comes back as it was saved, settings included: a changed one would be ignored silently.
    then, now = saved["optimizer"], dict(here.optimizer)
    changed = [
        f"optimizer.{key}={then.get(key)} in the checkpoint, {now.get(key)} here"
        for key in sorted(set(then) | set(now))
        if then.get(key) != now.get(key)
    ]
    if changed:
        raise ValueError(
            f"ckpt_path={ckpt_file} was trained with other optimizer settings: {'; '.join(changed)}. "
            "A resumed run goes on with the optimizer's saved state, settings included: resume with "
            "the settings it was trained with (its .hydra/overrides.yaml has them), or start a new run "
            "without ckpt_path."
        )
    differences = [
        f"model.{key}={saved['model'].get(key)} in the checkpoint, {value} here"
        for key, value in here.model.items()
        if saved["model"].get(key) != value
    ]
    if differences:
        raise ValueError(
            f"ckpt_path={ckpt_file} is a different model: {'; '.join(differences)}. "
            "Resume with the model settings it was trained with (e.g. the same model=...)."
        )
