"""Attention maps: what each head of each layer looks at, on a fixed piece of validation text.

At every `every_n_validations`-th validation and the last one, the text goes through the model's explicit
attention path (`GPT.forward_with_attention`; training keeps the fused kernel) and each layer's heads are logged as
one image, `attention/layer_<i>`, with the tokens on both axes, and saved as `attention_layer<i>.png` in `dirpath`.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from minigpt import plots
from minigpt.callbacks.tensorboard import add_figure
from minigpt.model import GPT


def attention_figures(model: GPT, idx: torch.Tensor, labels: list[str], when: str = "") -> list:
    """One figure per layer for the token ids `idx` (T,), whose texts (characters, or BPE tokens) are `labels`;
    `when` ends the titles (" at step 500")."""
    with torch.no_grad():
        _, maps = model.forward_with_attention(idx[None])  # (n_layer, 1, nh, T, T)
    maps = maps[:, 0].float().cpu().numpy()
    return [
        plots.attention_heads(layer, labels, f"layer {i}: attention of each head{when}") for i, layer in enumerate(maps)
    ]


class AttentionMaps(Callback):
    def __init__(
        self, text: str | None = None, length: int = 32, every_n_validations: int = 1, dirpath: str | None = None
    ):
        """
        Args:
            text: the text to look at; None = the first `length` tokens of the validation split.
            length: tokens of validation text (with text=None); at most the model's block_size is used.
            every_n_validations: draw at every n-th validation, and at the last (each draws one image per layer).
            dirpath: where to save the latest maps as PNG; None = TensorBoard only.
        """
        if every_n_validations <= 0 or length <= 0:
            raise ValueError(
                f"callbacks.attention_maps.every_n_validations and .length must be positive, got "
                f"{every_n_validations} and {length}"
            )
        self.text, self.length, self.every_n_validations = text, length, every_n_validations
        self.dirpath = Path(dirpath) if dirpath else None
        self.validations = 0

    # Kept in checkpoints, so that a resumed run draws at the validations an uninterrupted one would.
    def state_dict(self) -> dict[str, int]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.validations = state_dict["validations"]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        # and at the run's last validation, so that the saved maps show the trained model, not an early one: the
        # next would come after max_steps (Lightning adds no validation at the end of a run of one endless epoch)
        steps_between = trainer.val_check_batch // trainer.accumulate_grad_batches
        last = trainer.should_stop or trainer.global_step + steps_between > trainer.max_steps
        if ((self.validations - 1) % self.every_n_validations and not last) or not trainer.is_global_zero:
            return
        block_size = pl_module.model.config.block_size
        if self.text is not None:
            idx = pl_module.tokenizer.encode(self.text)[:block_size]
        else:
            idx = trainer.datamodule.val_tokens[: min(self.length, block_size)]
        figures = attention_figures(
            pl_module.model,
            idx.long().to(pl_module.device),
            pl_module.tokenizer.pieces(idx),
            when=f" at step {trainer.global_step}",
        )
        for i, figure in enumerate(figures):
            add_figure(
                trainer, f"attention/layer_{i}", figure, self.dirpath and self.dirpath / f"attention_layer{i}.png"
            )
