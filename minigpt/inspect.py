"""Look inside a trained model: python -m minigpt.inspect ckpt_path=<checkpoint or run folder> what=<inspection>.

    what=grads       the lesson's check: mean |grad| and std of every parameter for one batch, as a table,
                     and the gradient-flow chart (gradient_flow.png)
    what=attention   each layer's heads on `text` (attention_layer<i>.png)
    what=graph       the autograd graph of the loss on `text` (graph.svg; graph.dot where Graphviz is missing),
                     through the first transformer block (graph_blocks=null: all of them)

Pictures go to <run folder>/inspect unless out_dir= says otherwise. The checkpoint is loaded with
`MiniGPTModule.from_checkpoint` (tensors and plain containers only). The validation text comes from the data
settings the run recorded in its folder (.hydra/config.yaml), or from `data` when the command line sets it or the
run folder has none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from minigpt import plots
from minigpt.callbacks.attention_maps import attention_figures
from minigpt.callbacks.gradient_health import measure
from minigpt.checkpoint import checkpoint_path, find_checkpoint, run_folder_of
from minigpt.data import WindowsDataModule
from minigpt.graph import check_blocks, check_graph_file, render_autograd_graph
from minigpt.module import MiniGPTModule
from minigpt.tokenizer import unescape

log = logging.getLogger(__name__)

INSPECTIONS = ("grads", "attention", "graph")


def inspect(cfg: DictConfig, data_from_run: bool = True) -> list[Path]:
    """Run the inspection `cfg.what` on `cfg.ckpt_path`; returns the files written. With `data_from_run`, the text
    comes from the data settings the run recorded, where its folder has them."""
    ckpt_path = checkpoint_path(cfg, "python -m minigpt.inspect")
    if cfg.what not in INSPECTIONS:
        raise ValueError(f"what={cfg.what} is not one of {', '.join(INSPECTIONS)}")
    if cfg.what == "graph":
        check_graph_file(cfg.graph_file, "graph_file")
        check_blocks(cfg.graph_blocks, "graph_blocks")
    path = find_checkpoint(ckpt_path, prefer="best")
    module = MiniGPTModule.from_checkpoint(path)
    model = module.model.eval()  # no dropout: the numbers are those of the model itself
    in_run = run_folder_of(path)
    run_dir = in_run if in_run is not None else path.parent
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "inspect"
    recorded = run_dir / ".hydra"
    if data_from_run and in_run is not None and (recorded / "config.yaml").is_file():
        cfg = cfg.copy()
        cfg.data = recorded_data(recorded)

    if cfg.what == "grads":
        x, y = validation_batch(cfg, module)
        print(gradient_table(model, x, y))
        _, layers = measure(model)
        figure = plots.gradient_flow(
            [s.name for s in layers],
            [s.mean_abs for s in layers],
            [s.max_abs for s in layers],
            f"gradient flow of {path.name} on one batch",
        )
        return [plots.save(figure, out_dir / "gradient_flow.png")]

    ids = text_ids(cfg, module)
    if cfg.what == "attention":
        figures = attention_figures(model, ids, module.tokenizer.pieces(ids), when=f" of {path.name}")
        return [plots.save(figure, out_dir / f"attention_layer{i}.png") for i, figure in enumerate(figures)]
    return [
        render_autograd_graph(
            model, ids[None, :-1], ids[None, 1:], out_dir / cfg.graph_file, cfg.graph_blocks, "graph_blocks"
        )
    ]


def recorded_data(hydra_dir: Path) -> DictConfig:
    """The `data` settings a run recorded in its `.hydra` folder, resolved there (its ${model.block_size}, ${seed}),
    with relative paths made relative to the folder the run was started from, as they were for the run."""
    try:
        data = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml").data, resolve=True)
        started_in = OmegaConf.load(hydra_dir / "hydra.yaml").hydra.runtime.cwd
    except (OmegaConfBaseException, OSError) as err:
        raise ValueError(
            f"Could not read the run's data settings from {hydra_dir} ({err}): give them on the "
            "command line (data=..., data.path=...)"
        ) from None
    for key in ("path", "cache_dir"):
        if isinstance(data.get(key), str) and not data[key].startswith("~"):
            data[key] = str(Path(started_in, data[key]))  # an absolute path stays as it is
    if "seed" in data and "val_seed" not in data:  # a run from before data.val_seed drew them with its seed
        data["val_seed"] = data["seed"]
    return OmegaConf.create(data)


def validation_data(cfg: DictConfig, module: MiniGPTModule) -> WindowsDataModule:
    datamodule = hydra.utils.instantiate(cfg.data, block_size=module.model.config.block_size, batch_size=cfg.batch_size)
    datamodule.prepare_data()
    datamodule.setup("validate")
    if datamodule.tokenizer.hparams() != module.tokenizer.hparams():
        raise ValueError(
            "The data's tokenizer (its characters, or its BPE) is not the checkpoint's: give the text the "
            "model was trained on (data.path=..., and data=text data.tokenizer=... if it was trained so)"
            + (", or pass text=... to look at your own text." if cfg.what != "grads" else ".")
        )
    return datamodule


def validation_batch(cfg: DictConfig, module: MiniGPTModule) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = validation_data(cfg, module).val_set.tensors
    return x[: cfg.batch_size], y[: cfg.batch_size]  # (B, T) each


def text_ids(cfg: DictConfig, module: MiniGPTModule) -> torch.Tensor:
    """Token ids (T,) of `cfg.text`, or of the validation split's first `cfg.length` tokens; T <= block_size."""
    block_size = module.model.config.block_size
    if cfg.text:
        text = unescape(str(cfg.text))  # \n and \t as a newline and a tab, as in sample.py
        try:
            ids = module.tokenizer.encode(text).long()
        except ValueError as err:
            raise ValueError(f"The text {text!r} cannot be encoded: {err}") from None
        if len(ids) > block_size:
            log.warning(
                "text is %d tokens long, and the model's context is %d: only the first %d are used",
                len(ids),
                block_size,
                block_size,
            )
            ids = ids[:block_size]
        if len(ids) < 2:
            raise ValueError("text must have at least 2 tokens (the graph needs a next token to predict)")
        return ids
    if not isinstance(cfg.length, int) or cfg.length < 2:
        raise ValueError(f"length must be a whole number of at least 2 tokens, got {cfg.length!r}")
    return validation_data(cfg, module).val_tokens[: min(cfg.length, block_size)].long()


def gradient_table(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    """Backpropagate the loss of one batch; one line per parameter: shape, mean |grad| and std of the gradient."""
    model.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    width = max(map(len, names))
    lines = [
        f"loss {loss.item():.4f} on a batch of {x.size(0)} windows of {x.size(1)} tokens",
        "",
        f"{'parameter':<{width}}  {'shape':<14} {'mean |grad|':>12} {'std':>12}",
    ]
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        lines.append(f"{name:<{width}}  {str(tuple(p.shape)):<14} {g.abs().mean().item():12.3e} {g.std().item():12.3e}")
    return "\n".join(lines)


def sets_data(overrides: list[str]) -> bool:
    """Whether command-line overrides choose the data (data=text, data.path=..., +data.x=..., ~data.y)."""
    return any(o.key_or_group.split(".")[0] == "data" for o in OverridesParser.create().parse_overrides(overrides))


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect")
def main(cfg: DictConfig) -> None:
    try:
        written = inspect(cfg, data_from_run=not sets_data(HydraConfig.get().overrides.task))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
