"""Generate text from a checkpoint alone: python sample.py ckpt_path=<checkpoint or run folder> [prompt=...]."""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from minigpt import schema
from minigpt.checkpoint import checkpoint_path, find_checkpoint, read_model
from minigpt.tokenizer import unescape

# Logits divided by less can overflow to inf (the logits' scale is ~10; float32 ends at ~3e38), and sampling fails.
MIN_TEMPERATURE = 1e-6


def sample(cfg: DictConfig) -> list[str]:
    """`cfg.num_samples` continuations of `cfg.prompt`, each starting with the prompt."""
    schema.check(cfg, schema.Sample)
    ckpt_path = checkpoint_path(cfg, "python sample.py")
    for name in ("max_new_tokens", "num_samples") + (("top_k",) if cfg.top_k is not None else ()):
        if cfg[name] <= 0:
            raise ValueError(
                f"{name} must be a positive whole number, got {cfg[name]!r}"
                + (" (or null: sample among all tokens)" if name == "top_k" else "")
            )
    if not cfg.temperature >= MIN_TEMPERATURE:  # nan too
        raise ValueError(
            f"temperature must be a number of at least {MIN_TEMPERATURE:g}, got {cfg.temperature!r} (use a "
            "small value, e.g. 0.1, for near-greedy sampling)"
        )
    prompt_text = unescape(str(cfg.prompt))  # prompt=123 comes as a number
    if not prompt_text:
        raise ValueError("prompt must not be empty: give at least one character, e.g. 'prompt=\\n' (a newline)")
    device = pick_device(cfg.device)
    checkpoint = find_checkpoint(ckpt_path, prefer="best")
    model, tokenizer = read_model(checkpoint, map_location=device)
    print(f"Sampling from {checkpoint}", file=sys.stderr)  # a run folder's best checkpoint, not necessarily its last
    try:
        prompt = tokenizer.encode(prompt_text).long().to(device)
    except ValueError as err:
        raise ValueError(f"The prompt {prompt_text!r} cannot be encoded: {err}") from None
    generator = torch.Generator(device).manual_seed(cfg.seed)
    idx = prompt[None].repeat(cfg.num_samples, 1)  # (num_samples, T)
    out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, generator=generator)
    return [tokenizer.decode(row) for row in out]


def pick_device(name: str | None) -> torch.device:
    """The device `name` (cpu, cuda, cuda:1, mps), checked to be here; None: a GPU when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={name!r} is not a device PyTorch knows: give cpu, cuda, cuda:<index> or mps, or null "
            "for a GPU when there is one"
        ) from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ValueError(
            f"device={name} is not available here (PyTorch sees no {device.type.upper()} device): give "
            "device=cpu, or null for the best device there is"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return device


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        texts = sample(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print("\n---------------\n".join(texts))


if __name__ == "__main__":
    main()
