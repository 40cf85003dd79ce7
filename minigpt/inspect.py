"""Look inside a model: python -m minigpt.inspect [ckpt_path=<checkpoint or run folder>] what=<inspection>.

    what=autograd    the lesson's section 2, no checkpoint needed: y = x**2 + 3x + 1 at x = 2, y.backward(), and
                     x.grad = 7 = 2x + 3, with the graph autograd recorded (printed, and drawn to autograd.svg)
    what=step        the lesson's section 3: one gradient-descent step, w <- w - lr * grad, on a MiniGPT (a freshly
                     initialised one of `model`'s sizes without ckpt_path), as numbers, checked against the formula
    what=grads       the lesson's check: mean |grad| and std of every parameter for one batch, as a table,
                     and the gradient-flow chart (gradient_flow.png)
    what=attention   each layer's heads on `text` (attention_layer<i>.png)
    what=graph       the autograd graph of the loss on `text` (graph.svg; graph.dot where Graphviz is missing),
                     through the first transformer block (graph_blocks=null: all of them)

Pictures go to <run folder>/inspect (outputs/inspect when no checkpoint is read) unless out_dir= says otherwise.
The checkpoint is loaded with `MiniGPTModule.from_checkpoint` (tensors and plain containers only). The validation
text comes from the data settings the run recorded in its folder (.hydra/config.yaml), or from `data` when the
command line sets it or the run folder has none.
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
from torchviz import make_dot

from minigpt import plots, schema
from minigpt.callbacks.attention_maps import attention_figures
from minigpt.callbacks.gradient_health import measure
from minigpt.checkpoint import checkpoint_path, find_checkpoint, run_folder_of
from minigpt.data import WindowsDataModule
from minigpt.graph import check_blocks, check_graph_file, render_autograd_graph, write_graph
from minigpt.model import GPT
from minigpt.module import MiniGPTModule, make_optimizer
from minigpt.tokenizer import unescape

log = logging.getLogger(__name__)

INSPECTIONS = ("grads", "attention", "graph", "autograd", "step")


def inspect(cfg: DictConfig, data_from_run: bool = True) -> list[Path]:
    """Run the inspection `cfg.what` on `cfg.ckpt_path`; returns the files written. With `data_from_run`, the text
    comes from the data settings the run recorded, where its folder has them."""
    schema.check(cfg, schema.Inspect)
    if cfg.what not in INSPECTIONS:
        raise ValueError(f"what={cfg.what} is not one of {', '.join(INSPECTIONS)}")
    if cfg.what in ("graph", "autograd"):
        check_graph_file(cfg.graph_file, "graph_file")
    if cfg.what == "graph":
        check_blocks(cfg.graph_blocks, "graph_blocks")
    if cfg.what == "step" and not cfg.step_lr > 0:
        raise ValueError(f"step_lr is the learning rate of the step: a positive number, got {cfg.step_lr!r}")
    if cfg.what == "autograd":
        out_dir = Path(cfg.out_dir or "outputs/inspect")
        text, picture = autograd_example(float(cfg.x), out_dir / f"autograd{Path(cfg.graph_file).suffix}")
        print(text)
        return [picture]
    if cfg.what == "step" and not cfg.ckpt_path:  # a new model of `model`'s sizes, on the `data` text
        datamodule = validation_data(cfg)
        torch.manual_seed(cfg.seed)  # the same initial weights, and numbers, every time
        module = MiniGPTModule(**datamodule.tokenizer.hparams(), model=OmegaConf.to_container(cfg.model, resolve=True))
        about = f"a freshly initialised MiniGPT ({describe(module.model)}, seed {cfg.seed})"
    else:
        path = find_checkpoint(checkpoint_path(cfg, "python -m minigpt.inspect"), prefer="best")
        module, datamodule = MiniGPTModule.from_checkpoint(path), None
        about = f"the checkpoint {path} ({describe(module.model)})"
        in_run = run_folder_of(path)
        run_dir = in_run if in_run is not None else path.parent
        out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "inspect"
        recorded = run_dir / ".hydra"
        if data_from_run and in_run is not None and (recorded / "config.yaml").is_file():
            cfg = cfg.copy()
            cfg.data = recorded_data(recorded)
    model = module.model.eval()  # no dropout: the numbers are those of the model itself
    if cfg.what in ("grads", "step"):
        datamodule = datamodule if datamodule is not None else validation_data(cfg, module)
        x, y = (t[: cfg.batch_size] for t in datamodule.val_set.tensors)  # (B, T) each

    if cfg.what == "step":
        print(gradient_descent_step(model, x, y, float(cfg.step_lr), cfg.step_parameter, about))
        return []

    if cfg.what == "grads":
        print(gradient_table(model, x, y))
        _, layers = measure(model)
        figure = plots.gradient_flow(layers, f"gradient flow of {path.name} on one batch")
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


def autograd_example(x_value: float, path: Path) -> tuple[str, Path]:
    """The lesson's section 2: y = x**2 + 3x + 1 at `x_value`, then y.backward(), and x.grad beside 2x + 3, its
    derivative by hand. Returns the text to print, with the graph as autograd recorded it, and the graph drawn."""
    x = torch.tensor([x_value], requires_grad=True)  # a leaf: backward() leaves dy/dx in x.grad
    y = x**2 + 3 * x + 1  # each operation records its backward function: the graph that y.grad_fn starts
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = write_graph(make_dot(y, params={"x": x}), path)
    lines = [
        f"x = {x.item()}",
        f"y = x**2 + 3*x + 1 = {y.item()}",
        "",
        "The graph autograd recorded while computing y, from y back to x (y.grad_fn and the functions it points to):",
        *backward_functions(y.grad_fn, {id(x): "x"}),
        "",
    ]
    y.backward()  # walks that graph from y to x, multiplying local derivatives (the chain rule)
    lines += [
        f"y.backward() leaves dy/dx in x.grad = {x.grad.item()}",
        f"by hand, dy/dx = 2x + 3 = {2 * x_value + 3}",
    ]
    return "\n".join(lines), picture


def backward_functions(fn: torch.autograd.graph.Node, names: dict[int, str], depth: int = 1) -> list[str]:
    """One line per backward function from `fn` down to the leaves, indented by depth; leaves named by `names`."""
    leaf = getattr(fn, "variable", None)  # AccumulateGrad: where a leaf's gradient is added up
    label = type(fn).__name__ + (f" -> {names.get(id(leaf), 'a leaf')}.grad" if leaf is not None else "")
    lines = ["  " * depth + label]
    for next_fn, _ in fn.next_functions:
        if next_fn is not None:  # None: an input that needs no gradient (the constants 3 and 1)
            lines += backward_functions(next_fn, names, depth + 1)
    return lines


def gradient_descent_step(model: GPT, x: torch.Tensor, y: torch.Tensor, lr: float, parameter: str, about: str) -> str:
    """One step of plain gradient descent on the batch (x, y), taken by the project's optimizer=sgd, and checked
    against w <- w - lr * grad for every weight. Returns the step as text: the loss before and after, and the
    element of `parameter` with the largest gradient, before and after."""
    params = dict(model.named_parameters())
    if parameter not in params:
        raise ValueError(f"step_parameter={parameter} is not a parameter of the model: choose one of {list(params)}")
    optimizer = make_optimizer(model, {"name": "sgd", "lr": lr}, x.device)
    optimizer.zero_grad(set_to_none=True)
    _, loss = model(x, y)
    loss.backward()
    before = {name: p.detach().clone() for name, p in params.items()}
    grads = {name: p.grad.clone() for name, p in params.items()}
    optimizer.step()
    with torch.no_grad():
        _, loss_after = model(x, y)
    # the update rule, by hand, for every weight of the model (to float32's rounding: the optimizer may fuse the ops)
    expected = {name: before[name] - lr * grads[name] for name in params}
    gap = max((p.detach() - expected[name]).abs().max().item() for name, p in params.items())
    if not all(torch.allclose(p.detach(), expected[name], rtol=1e-5, atol=1e-8) for name, p in params.items()):
        raise RuntimeError(f"optimizer.step() moved a weight {gap:.2e} away from w - lr * grad")
    index = tuple(int(i) for i in torch.unravel_index(grads[parameter].abs().argmax(), grads[parameter].shape))
    w, g, new = before[parameter][index].item(), grads[parameter][index].item(), params[parameter][index].item()
    at = f"{parameter}[{', '.join(map(str, index))}]"
    n_weights = sum(p.numel() for p in params.values())
    return "\n".join(
        [
            f"One step of gradient descent, w <- w - lr * grad, on {about}",
            f"batch: {x.size(0)} validation windows of {x.size(1)} tokens",
            "",
            f"loss before the step          {loss.item():.6f}",
            f"weight {at} (its largest |grad| in {parameter})",
            f"  w                           {w:+.6e}",
            f"  grad = dloss/dw             {g:+.6e}   (from loss.backward())",
            f"  lr                          {lr:.6g}",
            f"  w - lr * grad               {w - lr * g:+.6e}",
            f"  w after optimizer.step()    {new:+.6e}",
            f"loss after the step           {loss_after.item():.6f}   (on the same batch: "
            f"{'down' if loss_after < loss else 'up'} by {abs(loss.item() - loss_after.item()):.6f})",
            "",
            f"checked: every one of the model's {n_weights:,} weights is now w - lr * grad "
            f"(largest difference {gap:.1e})",
        ]
    )


def describe(model: GPT) -> str:
    c = model.config
    return (
        f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, {sum(p.numel() for p in model.parameters()):,} weights"
    )


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


def validation_data(cfg: DictConfig, module: MiniGPTModule | None = None) -> WindowsDataModule:
    """`cfg.data`'s validation split in windows of `module`'s context (without one, `cfg.model`'s), refused where
    its tokenizer is not the module's."""
    block_size = module.model.config.block_size if module is not None else cfg.model.block_size
    datamodule = hydra.utils.instantiate(cfg.data, block_size=block_size, batch_size=cfg.batch_size)
    datamodule.prepare_data()
    datamodule.setup("validate")
    if module is not None and datamodule.tokenizer.hparams() != module.tokenizer.hparams():
        raise ValueError(
            "The data's tokenizer (its characters, or its BPE) is not the checkpoint's: give the text the "
            "model was trained on (data.path=..., and data=text data.tokenizer=... if it was trained so)"
            + (", or pass text=... to look at your own text." if cfg.what != "grads" else ".")
        )
    return datamodule


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
                f"text is {len(ids)} tokens long, and the model's context is {block_size}: only the first "
                f"{block_size} are used"
            )
            ids = ids[:block_size]
        if len(ids) < 2:
            raise ValueError("text must have at least 2 tokens (the graph needs a next token to predict)")
        return ids
    if cfg.length < 2:
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
