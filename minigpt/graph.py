"""The computation graph: what `loss.backward()` walks, drawn by torchviz and Graphviz.

Blue boxes are the parameters (named as in the checkpoint), grey boxes the backward function of each operation
from the loss back to them. The transformer blocks all have the same graph, so by default only the first is drawn
(the lesson's four blocks in full make a picture 7,000 pixels tall). Rendering needs Graphviz's `dot` program;
without it the Graphviz source is written instead, with the command that renders it.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path

import graphviz
import torch
from torch.utils.tensorboard import SummaryWriter
from torchviz import make_dot

from minigpt.model import GPT

log = logging.getLogger(__name__)


def render_autograd_graph(
    model: GPT,
    idx: torch.Tensor,
    targets: torch.Tensor,
    path: str | Path,
    blocks: int | None = 1,
    setting: str = "blocks",
) -> Path:
    """Draw the autograd graph of the loss on (idx, targets) to `path` (as `write_graph`); returns the file written.

    `blocks`: how many of the model's transformer blocks to draw, from the first; None = all of them. The picture
    says how many it leaves out and which `setting` draws them all. Callers check both with `check_graph_file` and
    `check_blocks` before any work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_layer = model.config.n_layer
    drawn = model if blocks is None or blocks >= n_layer else first_blocks(model, blocks)
    with torch.enable_grad():
        _, loss = drawn(idx, targets)
    graph = make_dot(loss, params=dict(drawn.named_parameters()))
    if drawn is not model:
        first = "the first" if blocks == 1 else f"the first {blocks}"
        rest = f"block {blocks}" if blocks == n_layer - 1 else f"blocks {blocks} to {n_layer - 1}"
        graph.attr(
            label=f"The loss through {first} of {n_layer} transformer blocks: {rest}, the same graph, "
            f"left out\n(all of them: {setting}=null)",
            labelloc="t",
            fontsize="20",
        )
    return write_graph(graph, path)


def write_graph(graph: graphviz.Digraph, path: Path) -> Path:
    """Render `graph` to `path` (the suffix picks the format); returns the file written: the Graphviz source, with
    the suffix `.dot`, where the `dot` program is missing, and the log says how to render it."""
    try:  # pipe, not render: render writes its .gv source beside the picture before it finds `dot` missing
        path.write_bytes(graph.pipe(format=path.suffix.lstrip(".")))
        return path
    except graphviz.ExecutableNotFound:
        source = path.with_suffix(".dot")
        source.write_text(graph.source)
        log.warning(
            "Graphviz's `dot` program is not installed, so the graph was not drawn; its source is in %s. "
            "Install Graphviz (apt-get install graphviz, brew install graphviz or conda install graphviz) "
            "and render it with: dot -T%s %s -o %s",
            source,
            path.suffix.lstrip(".") or "svg",
            source,
            path,
        )
        return source


def first_blocks(model: GPT, blocks: int) -> GPT:
    """A copy of `model` with its first `blocks` transformer blocks only: same names, shapes, weights and mode."""
    with torch.random.fork_rng(devices=[]):  # the copy's initialisation leaves the run's random numbers alone
        copy = GPT(dataclasses.replace(model.config, n_layer=blocks))
    left_over = copy.load_state_dict(model.state_dict(), strict=False)  # the later blocks' have nowhere to go
    assert not left_over.missing_keys, left_over.missing_keys  # every weight of the copy is the model's own
    return copy.to(next(model.parameters()).device).train(model.training)


def check_blocks(blocks: int | None, setting: str) -> None:
    if blocks is not None and blocks < 1:
        raise ValueError(
            f"{setting}={blocks}: it is how many transformer blocks the graph draws, from the "
            "first: a whole number of at least 1, or null for all of them"
        )


def check_graph_file(path: str | Path, setting: str) -> None:
    """The file's suffix is the picture's format: it has to be one Graphviz draws. `setting` names it in the error."""
    suffix = Path(path).suffix.lstrip(".")
    if suffix not in graphviz.FORMATS:
        raise ValueError(
            f"{setting}={path}: the suffix picks the picture's format, and "
            f"{'there is none' if not suffix else repr(suffix) + ' is not one Graphviz draws'}; "
            "end the name in .svg, .png or .pdf"
        )


def add_model_graph(writer: SummaryWriter, model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> None:
    """The model's forward graph in TensorBoard's Graphs tab (traced once by `torch.jit.trace`).

    The tracer refuses compiled modules, so it traces a never-compiled model of the same configuration on the CPU:
    same names and shapes (the graph does not depend on the weights), and no second copy on the GPU.
    """
    plain = GPT(model.config).train(model.training)
    with warnings.catch_warnings():
        # the tracer's deprecation notice and its remarks on Python-level shape checks say nothing about the model
        warnings.simplefilter("ignore")
        try:
            writer.add_graph(plain, (idx.cpu(), targets.cpu()))
        except Exception as err:  # the tracer fails in many ways; the run goes on without this picture
            log.warning("Could not trace the model for TensorBoard's Graphs tab (%s: %s)", type(err).__name__, err)
