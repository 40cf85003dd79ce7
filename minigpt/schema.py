"""The type of every setting a run reads. `check(cfg, schema)` merges the composed configuration into these
dataclasses, so OmegaConf refuses a wrong type with its own message, naming the key (`model.n_layer=4.5`: "Value
'4.5' of type 'float' could not be converted to Integer ... full_key: model.n_layer"), before anything runs. What
Hydra instantiates (the data module, callbacks, loggers) is typed by its constructor's own annotations.

The values and what they mean live in conf/*.yaml; ranges and relations between settings, which no type states,
are checked in minigpt/config.py. Groups left open (trainer, optimizer) take settings beyond their typed ones, as
Lightning's Trainer and PyTorch's optimizers do: module.py names what an optimizer does not take.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from minigpt.model import GPTConfig


@dataclass
class Optimizer:  # open: each optimizer's own settings besides these
    name: str
    lr: float
    weight_decay: float | None = None
    betas: list[float] | None = None
    momentum: float | None = None
    nesterov: bool | None = None
    adamw_lr: float | None = None


@dataclass
class Scheduler:
    name: str
    warmup_steps: int
    min_lr_ratio: float


@dataclass
class Trainer:  # open: any other argument of Lightning's Trainer
    max_steps: int
    val_check_interval: int  # batches: Lightning would also take a float, a fraction of an epoch that never ends
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    num_nodes: int = 1
    num_sanity_val_steps: int = 2
    gradient_clip_val: float | None = None


@dataclass
class Train:  # the top level; its groups in GROUPS; what Hydra instantiates (data, callbacks, loggers): of_target
    seed: int
    tags: list[str]
    ckpt_path: str | None
    compile_mode: str
    tokens: float | None = None  # experiment=pretrain's budget
    val_every_n_steps: int | None = None


SIMPLE = {int, float, bool, str}
GROUPS = {"model": GPTConfig, "optimizer": Optimizer, "scheduler": Scheduler, "trainer": Trainer}


@dataclass
class Sample:
    ckpt_path: str
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    num_samples: int
    seed: int
    device: str | None


@dataclass
class Inspect:
    ckpt_path: str | None
    what: str
    text: str | None
    length: int
    batch_size: int
    graph_file: str
    graph_blocks: int | None
    x: float
    step_lr: float
    step_parameter: str
    out_dir: str | None
    seed: int


def of_target(target: str) -> DictConfig:
    """The schema of a config that Hydra instantiates: the arguments of `target`'s constructor, each typed where its
    annotation is one OmegaConf checks (int, float, bool or str, or one of them or None), else Any. Left open to
    other keys where the constructor takes **kwargs or its annotations cannot be read."""
    cls = hydra.utils.get_class(target)
    parameters = inspect.signature(cls).parameters.values()
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation naming what only a type checker imports
        return OmegaConf.create({})
    fields = [("_target_", str, "???")]
    for p in parameters:
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            kind, args = hints.get(p.name, Any), set(typing.get_args(hints.get(p.name)))
            simple = kind in SIMPLE or (type(None) in args and len(args) == 2 and args - {type(None)} <= SIMPLE)
            fields.append((p.name, kind if simple else Any, "???"))
    node = OmegaConf.structured(dataclasses.make_dataclass(cls.__name__, fields))
    OmegaConf.set_struct(node, not any(p.kind == p.VAR_KEYWORD for p in parameters))
    return node


def check(cfg: DictConfig, schema: type) -> None:
    """Refuse a setting of `cfg` whose value does not have its type in `schema` (interpolations are left to resolve
    later), or a key that a closed group, or the constructor a `_target_` names, does not have."""
    typed = OmegaConf.structured(schema)
    if schema is Train:
        built = {"data": cfg.data}  # and each callback and logger: what Hydra instantiates
        built |= {
            f"{group}.{name}": node
            for group in ("callbacks", "logger")
            for name, node in (cfg.get(group) or {}).items()
        }
        with open_dict(typed):
            for name, group in GROUPS.items():
                typed[name] = OmegaConf.structured(group)
            for key, node in built.items():
                if node is not None:  # (an experiment drops a callback by setting it to null)
                    OmegaConf.update(typed, key, of_target(node._target_), force_add=True)
        for node in [typed.optimizer, typed.trainer]:
            OmegaConf.set_struct(node, False)  # open: settings beyond the typed ones go as they are
    OmegaConf.merge(typed, OmegaConf.masked_copy(cfg, [key for key in typed if key in cfg]))  # not run_dir, hydra
