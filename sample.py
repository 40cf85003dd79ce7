"""Generate text from a checkpoint alone: python sample.py ckpt_path=<checkpoint or run folder> [prompt=...]."""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig

from minigpt.module import MiniGPTModule, find_checkpoint


def sample(cfg: DictConfig) -> list[str]:
    """`cfg.num_samples` continuations of `cfg.prompt`, each starting with the prompt."""
    if cfg.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {cfg.max_new_tokens}")
    if not cfg.prompt:
        raise ValueError('prompt must not be empty: give at least one character, e.g. prompt="\\n"')
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = MiniGPTModule.from_checkpoint(find_checkpoint(cfg.ckpt_path, prefer="best"), map_location=device)
    model, tokenizer = module.model.eval(), module.tokenizer
    try:
        prompt = tokenizer.encode(cfg.prompt).long().to(device)
    except ValueError as err:
        raise ValueError(f"The prompt {cfg.prompt!r} cannot be encoded: {err}") from None
    generator = torch.Generator(device).manual_seed(cfg.seed)
    idx = prompt[None].repeat(cfg.num_samples, 1)  # (num_samples, T)
    out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, generator=generator)
    return [tokenizer.decode(row) for row in out]


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        texts = sample(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    print("\n---------------\n".join(texts))


if __name__ == "__main__":
    main()
