"""Generated samples during training: at each validation, a fixed-length continuation of a prompt.

Logged as TensorBoard text `samples/<prompt>` at the validation's step, so the Text tab shows the model going
from noise to words to Shakespeare-shaped lines. The generator is seeded, so samples differ only by the weights.
"""

from __future__ import annotations

import re

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from minigpt.callbacks.tensorboard import writers
from minigpt.model import eager
from minigpt.tokenizer import unescape


def as_markdown(text: str) -> str:
    """TensorBoard renders text as Markdown: a fenced code block keeps line breaks and spaces as they are."""
    return "```\n" + text.replace("```", "` ` `") + "\n```"


class TextSamples(Callback):
    def __init__(self, prompt: str = "ROMEO:", max_new_tokens: int = 200, temperature: float = 0.8, seed: int = 1337):
        if max_new_tokens <= 0 or temperature <= 0:
            raise ValueError(
                f"callbacks.text_samples.max_new_tokens and .temperature must be positive, got "
                f"{max_new_tokens} and {temperature}"
            )
        self.prompt = unescape(prompt)  # \n and \t as a newline and a tab, as in sample.py
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.tag = "samples/" + (re.sub(r"[^A-Za-z0-9_]+", "_", self.prompt).strip("_") or "prompt")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # at the start, not at the first validation: a corpus without the prompt's characters fails before training
        try:
            pl_module.tokenizer.encode(self.prompt)
        except ValueError as err:
            raise ValueError(
                f"callbacks.text_samples.prompt={self.prompt!r} cannot be encoded: {err}. Set "
                "callbacks.text_samples.prompt to text of your corpus, or drop the samples with "
                "~callbacks.text_samples."
            ) from None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        targets = writers(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not targets:
            return
        text = self.generate(pl_module)
        for writer in targets:
            writer.add_text(self.tag, as_markdown(text), trainer.global_step)

    def generate(self, pl_module: L.LightningModule) -> str:
        device = pl_module.device
        idx = pl_module.tokenizer.encode(self.prompt).long().to(device)[None]  # (1, T)
        generator = torch.Generator(device).manual_seed(self.seed)
        # Lightning puts the model in eval mode (no dropout) until after on_validation_end. A compiled model runs
        # eagerly here: each new length would otherwise compile a graph of its own.
        with eager():
            out = pl_module.model.generate(idx, self.max_new_tokens, temperature=self.temperature, generator=generator)
        return pl_module.tokenizer.decode(out[0])
