"""Resuming a run: the checkpoint it goes on from, and the checks that it can go on with this run's settings.

A resumed run continues in the checkpoint's run folder with the same model, tokenizer and optimizer settings (the
optimizer's state comes back with its settings); the schedule is rebuilt from the config, so a new warmup or
max_steps takes effect.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from minigpt.checkpoint import find_checkpoint, load_checkpoint, run_folder_of
from minigpt.module import MiniGPTModule

log = logging.getLogger(__name__)


def resume_point(cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint `cfg.ckpt_path` names, loaded (weights only), and the run folder it continues in."""
    if cfg.ckpt_path is None:
        return None, None
    if not cfg.ckpt_path:  # ckpt_path=$UNSET_VARIABLE: not a new run, which would write elsewhere without a word
        raise ValueError(
            "ckpt_path is empty: give a run folder or a .ckpt file to resume from, or leave ckpt_path out "
            "to start a new run."
        )
    ckpt_file = find_checkpoint(cfg.ckpt_path, prefer="last")
    checkpoint = load_checkpoint(ckpt_file)
    if "global_step" not in checkpoint:
        raise ValueError(
            f"ckpt_path={ckpt_file} holds no training state to resume from (no global_step). Resume "
            "from a run's last.ckpt or its run folder."
        )
    if (folder := run_folder_of(ckpt_file)) is not None:  # checkpoints and events go on in the checkpoint's run folder
        check_latest(ckpt_file, checkpoint["global_step"])
        cfg.run_dir = os.path.abspath(folder)
    log.info("Resuming from %s at step %d; writing to %s", ckpt_file, checkpoint["global_step"], cfg.run_dir)
    return ckpt_file, checkpoint


def check_latest(ckpt_file: Path, step: int) -> None:
    """Refuse to go on in a run folder from a checkpoint older than the folder's last.ckpt: the run's later steps
    would be cut from its curves and its last.ckpt overwritten (a damaged last.ckpt does not stop a resume)."""
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


def check_same_data(cfg: DictConfig, checkpoint: dict[str, Any], ckpt_file: Path) -> None:
    """Refuse to resume on other data than the checkpoint's run trained and validated on (the same characters but
    another text pass the vocabulary check): val/loss, and so the best checkpoint kept, would compare the two."""
    recorded = checkpoint.get("datamodule_hyper_parameters") or {}
    then, now = recorded.get("path"), cfg.data.get("path")
    if isinstance(then, str) and isinstance(now, str) and then != now and not os.path.exists(os.path.expanduser(then)):
        # the run folder was moved to another machine, or started elsewhere with a relative path: nothing to compare
        log.warning(
            "The checkpoint's run read data.path=%s, which is not here; this run reads %s: resume only with "
            "the same text.",
            then,
            now,
        )
        recorded = {key: value for key, value in recorded.items() if key != "path"}
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


def warn_of_changed_settings(cfg: DictConfig, checkpoint: dict[str, Any]) -> None:
    """Warn when the batches or the schedule differ from the checkpoint's run: allowed (a larger batch, a longer
    warmup), but the resumed run is then not the one an uninterrupted run would have been."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    schedule = (checkpoint.get("hyper_parameters") or {}).get("scheduler") or {}
    changed = [
        f"data.{key}={data[key]} then, {cfg.data[key]} now"
        for key in ("batch_size", "seed")
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
    then = checkpoint.get("global_batch")  # missing in checkpoints of minigpt before it was recorded
    if not then:
        return
    now = {
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
    }
    changed = [f"{key}={then[key]} then, {now[key]} now" for key in now if key in then and then[key] != now[key]]
    if changed:
        factor = {name: math.prod(v.get(k, 1) for k in now) for name, v in (("then", then), ("now", now))}
        log.warning(
            "This resumed run splits its optimizer steps otherwise than its checkpoint's run: %s. Each step "
            "learns from data.batch_size x %d windows now, x %d then: it trains on, but not as "
            "the uninterrupted run would have (the sweep report's tokens/s takes the first run's global "
            "batch, in tensorboard/hparams.yaml).",
            "; ".join(changed),
            factor["now"],
            factor["then"],
        )


def warn_of_changed_text(checkpoint: dict[str, Any], datamodule: Any) -> None:
    """Warn when the text itself changed since the checkpoint (edited in place: the same path and characters).
    Allowed, as training on a grown corpus is; but val/loss is then measured on other windows than before."""
    then = (checkpoint.get(type(datamodule).__qualname__) or {}).get("text")  # missing before minigpt recorded it
    now = datamodule.text_record()
    if then and then != now:
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


# What a run's data is, and which windows it trains and validates on: a resume must not change them.
DATA_KEYS = ("path", "name", "glob", "tokenizer", "vocab_size", "train_fraction", "val_batches")


def same_setting(then: Any, now: Any) -> bool:
    """Equal, or two spellings of one existing file or folder (a relative path and its absolute one)."""
    if then == now:
        return True
    if isinstance(then, str) and isinstance(now, str):
        then, now = os.path.expanduser(then), os.path.expanduser(now)
        return os.path.exists(then) and os.path.exists(now) and os.path.samefile(then, now)
    return False


def keep_validation_windows(cfg: DictConfig, checkpoint: dict[str, Any]) -> None:
    """A run started before data.val_seed drew its validation windows with its training seed: resumed, it keeps them
    (unless the command line sets data.val_seed), so that val/loss and the best checkpoint go on being compared on
    the same windows. Other windows than the checkpoint's are warned about."""
    recorded = checkpoint.get("datamodule_hyper_parameters") or {}
    then = recorded.get("val_seed", recorded.get("seed"))
    if then is None or "val_seed" not in cfg.data or then == cfg.data.val_seed:
        return
    if "val_seed" not in recorded and not set_on_command_line("data.val_seed"):
        log.info(
            "The checkpoint's run drew its validation windows with seed=%s (before data.val_seed): it keeps them.", then
        )
        cfg.data.val_seed = then
        return
    log.warning(
        "The checkpoint's run validated on windows drawn with seed %s, this run on data.val_seed=%s: val/loss "
        "and the best checkpoint are compared across two sets of windows.",
        then,
        cfg.data.val_seed,
    )


def set_on_command_line(key: str) -> bool:
    return HydraConfig.initialized() and any(
        o.split("=", 1)[0].lstrip("+~") == key for o in HydraConfig.get().overrides.task
    )


def check_resumable(checkpoint: dict[str, Any], module: MiniGPTModule, ckpt_file: Path) -> None:
    """Refuse a checkpoint of another vocabulary or model size, naming what differs."""
    saved = checkpoint.get("hyper_parameters") or {}
    if not ("vocab" in saved or "bpe" in saved) or "model" not in saved:
        raise ValueError(f"ckpt_path={ckpt_file} is not a minigpt checkpoint: it has no vocabulary or model sizes.")
    if "bpe" in saved or "bpe" in module.hparams:
        if saved.get("bpe") != module.hparams.get("bpe"):
            if "bpe" in saved and "bpe" in module.hparams:  # both BPEs: their merges differ
                why = (
                    "trained with a byte-level BPE whose merges differ from those this run's data gives: the text "
                    "changed, or it was tokenized by minigpt before 2026-11-27, whose BPE also read the validation "
                    "text of a corpus under 4 MiB (and such a run cannot be resumed now; sample.py reads it). "
                    "Resume with the text it was trained on"
                )
            else:
                then, now = (
                    "a byte-level BPE" if "bpe" in hparams else "characters" for hparams in (saved, module.hparams)
                )
                why = (
                    f"trained with another tokenizer ({then}) than this run's data gives ({now}). Resume with "
                    "the data and data.tokenizer it was trained with"
                )
            raise ValueError(f"ckpt_path={ckpt_file} was {why}, or start a new run without ckpt_path.")
    elif saved["vocab"] != (vocab := module.hparams.vocab):
        only_saved, only_here = (
            "".join(sorted(set(a) - set(b))) for a, b in ((saved["vocab"], vocab), (vocab, saved["vocab"]))
        )
        raise ValueError(
            f"ckpt_path={ckpt_file} was trained on a vocabulary of {len(saved['vocab'])} characters, but this run's "
            f"text has {len(vocab)} (only in the checkpoint: {only_saved!r}; only in the text: {only_here!r}). "
            "Resume with the data it was trained on (data.path=...), or start a new run without ckpt_path."
            + (
                " Since 2026-11-27 minigpt reads Windows' line endings (\\r\\n) as newlines, so a run trained on such "
                "a text before cannot be resumed (sample.py reads it)."
                if only_saved == "\r"
                else ""
            )
        )
    differences = [
        f"model.{key}={saved['model'].get(key)} in the checkpoint, {value} here"
        for key, value in module.hparams.model.items()
        if saved["model"].get(key) != value
    ]
    # The optimizer's state comes back as it was saved, settings included: a changed one would be ignored silently.
    then, now = saved.get("optimizer") or {}, dict(module.hparams.optimizer)
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
    if differences:
        raise ValueError(
            f"ckpt_path={ckpt_file} is a different model: {'; '.join(differences)}. "
            "Resume with the model settings it was trained with (e.g. the same model=...)."
        )
