"""The type of every setting a run reads, in one place. `check(cfg, schema)` merges the composed configuration into
these dataclasses, so OmegaConf refuses a wrong type with its own message, naming the key (`model.n_layer=4.5`:
"Value '4.5' of type 'float' could not be converted to Integer ... full_key: model.n_layer"), before anything runs.

The values and what they mean live in conf/*.yaml; ranges and relations between settings, which no type states,
are checked in minigpt/config.py. Groups left open (trainer, optimizer) take settings beyond their typed ones, as
Lightning's Trainer and PyTorch's optimizers do: module.py names what an optimizer does not take.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf, open_dict

from minigpt.model import GPTConfig

# Optional[...] rather than `X | None`: OmegaConf reads the annotations, and 2.3 knows only typing's unions.


@dataclass
class Data:
    _target_: str
    path: str | None
    cache_dir: str
    block_size: int
    batch_size: int
    train_fraction: float
    val_batches: int | None
    seed: int
    val_seed: int


@dataclass
class TinyShakespeare(Data):
    name: str
    url: str | None
    sha256: str | None
    tokens_on_gpu: bool


@dataclass
class Corpus(Data):
    glob: str
    tokenizer: str
    vocab_size: int
    bpe_train_bytes: int
    num_workers: int
    tokens_per_step: int | None


DATA = {"minigpt.data.TextDataModule": TinyShakespeare, "minigpt.data.CorpusDataModule": Corpus}


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
class EarlyStopping:
    patience: int
    min_delta: float = 0.0
    stopping_threshold: float | None = None
    divergence_threshold: float | None = None


@dataclass
class TextSamples:
    max_new_tokens: int
    temperature: float
    seed: int


@dataclass
class AttentionMaps:
    length: int
    every_n_validations: int


@dataclass
class ComputationGraph:
    blocks: int | None


@dataclass
class Train:  # and GROUPS
    seed: int
    tags: list[str]
    ckpt_path: str | None
    compile_mode: str
    tokens: float | None = None  # experiment=pretrain's budget
    val_every_n_steps: int | None = None


GROUPS = {"model": GPTConfig, "optimizer": Optimizer, "scheduler": Scheduler, "trainer": Trainer}
CALLBACKS = {
    "early_stopping": EarlyStopping,
    "text_samples": TextSamples,
    "attention_maps": AttentionMaps,
    "computation_graph": ComputationGraph,
}


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


def check(cfg: DictConfig, schema: type) -> None:
    """Refuse a setting of `cfg` whose value does not have its type in `schema` (interpolations are left to resolve
    later), or a key a closed group does not have."""
    typed = OmegaConf.structured(schema)
    if schema is Train:
        groups = {**GROUPS, "data": DATA.get(cfg.data.get("_target_"))}  # a user's own DataModule goes untyped
        callbacks = {name: CALLBACKS[name] for name in CALLBACKS if (cfg.get("callbacks") or {}).get(name)}
        with open_dict(typed):
            for name, group in groups.items():
                typed[name] = OmegaConf.structured(group) if group else {}
            typed.callbacks = {name: OmegaConf.structured(callback) for name, callback in callbacks.items()}
        for node in [typed.optimizer, typed.trainer, typed.callbacks, *typed.callbacks.values()]:
            OmegaConf.set_struct(node, False)  # open: settings beyond the typed ones go as they are
    OmegaConf.merge(typed, OmegaConf.masked_copy(cfg, [key for key in typed if key in cfg]))  # not run_dir, hydra
