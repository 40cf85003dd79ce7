"""The computation graph, once at the start of training: `graph.svg` in the run folder and TensorBoard's Graphs tab."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from minigpt.callbacks.tensorboard import writers
from minigpt.graph import add_model_graph, check_blocks, check_graph_file, render_autograd_graph
from minigpt.model import eager


class ComputationGraph(Callback):
    def __init__(
        self, dirpath: str | None = None, filename: str = "graph.svg", length: int = 8, blocks: int | None = 1
    ):
        """
        Args:
            dirpath: where to draw the autograd graph of the loss; None = only the TensorBoard graph.
            filename: its name; the suffix picks the format (.svg, .png, .pdf).
            length: characters in the one-sequence batch the graph is traced on (the graph's shape does not
                depend on it, only the shape labels do).
            blocks: transformer blocks in the drawing, from the first (they all have the same graph); None = all.
                TensorBoard's graph, whose blocks fold away, has all of them.
        """
        # before training, not after the first minutes of it
        check_graph_file(filename, "callbacks.computation_graph.filename")
        check_blocks(blocks, "callbacks.computation_graph.blocks")
        self.dirpath, self.filename, self.length = (Path(dirpath) if dirpath else None), filename, length
        self.blocks = blocks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.global_step > 0:  # once per run, not again on resume
            return
        T = min(self.length, pl_module.model.config.block_size)
        tokens = trainer.datamodule.val_tokens[: T + 1].long().to(pl_module.device)
        idx, targets = tokens[None, :-1], tokens[None, 1:]  # (1, T): one window and its next characters
        with eager():  # the graph of the model's own operations, not of a compiled one (and no compilation here)
            if self.dirpath is not None:
                path, setting = self.dirpath / self.filename, "callbacks.computation_graph.blocks"
                render_autograd_graph(pl_module.model, idx, targets, path, self.blocks, setting)
            for writer in writers(trainer):
                add_model_graph(writer, pl_module.model, idx, targets)
