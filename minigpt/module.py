"""The LightningModule: owns optimisation (optimizer, learning-rate schedule) and what a run logs."""

from __future__ import annotations

import inspect
import math
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils import flop_counter
from torchmetrics import MeanMetric, MinMetric
from torchmetrics.text import Perplexity

from minigpt.checkpoint import CHECKPOINT_FORMAT, hyper_parameters, load_checkpoint
from minigpt.model import GPT, GPTConfig, eager, new_cuda_graph_step
from minigpt.optim import Muon
from minigpt.tokenizer import tokenizer_from_hparams

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD, "muon": Muon}
SCHEDULES = ("cosine", "constant")


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float, decay: bool = True) -> float:
    """Learning-rate multiplier: linear warmup to 1 over `warmup_steps`, then cosine to `min_lr_ratio` at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def count_cpu_attention_flops() -> None:
    """Teach PyTorch's FLOP counter the CPU's fused attention kernel, which it counts on GPUs only: without it the
    model summary's FLOPs leave out attention on a CPU (a quarter of the lesson's model) and differ from a GPU's."""
    aten = torch.ops.aten
    forward, backward = (
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
    )
    if forward not in flop_counter.flop_registry:  # (a later PyTorch may count it itself)
        flop_counter.register_flop_formula(forward)(
            lambda query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(query, key, value)
        )
    if backward not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(backward)(
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(
                grad_out, query, key, value
            )
        )


def split_linear_weights(model: nn.Module, within: nn.Module | None = None) -> tuple[list, list]:
    """The weights of the linear layers in `within` (all of `model` by default), and every other parameter."""
    weights = [m.weight for m in (within or model).modules() if isinstance(m, nn.Linear)]
    ids = {id(p) for p in weights}
    return weights, [p for p in model.parameters() if id(p) not in ids]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups that decay only the weights of linear layers: biases, norms and embeddings are left alone."""
    decay, no_decay = split_linear_weights(model)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def muon_param_groups(model: GPT, adamw_lr: float) -> list[dict[str, Any]]:
    """Muon for the weight matrices inside the transformer blocks; AdamW for the embeddings, the output head, norms
    and biases, which Muon's authors leave to AdamW (an embedding row or the head is not a map to orthogonalise)."""
    matrices, others = split_linear_weights(model, within=model.transformer.h)
    return [
        {"params": matrices, "use_muon": True, "name": "muon"},
        {"params": others, "use_muon": False, "lr": adamw_lr, "weight_decay": 0.0, "name": "adamw"},
    ]


def settings_of(name: str) -> set[str]:
    """The settings optimizer `name` takes: its constructor's arguments (Muon's also the rate of its AdamW group)."""
    takes = set(inspect.signature(OPTIMIZERS[name]).parameters) - {"params"}
    return takes | {"adamw_lr"} if name == "muon" else takes


def make_optimizer(model: GPT, settings: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer that `settings` (an optimizer config: `name` and the optimizer's own arguments) names."""
    settings = dict(settings)
    name = settings.pop("name")
    if name == "muon":
        groups = muon_param_groups(model, settings.pop("adamw_lr", 3e-3))
    else:
        groups = param_groups(model, settings.pop("weight_decay", 0.0))
    if name in ("adamw", "adam") and device.type in ("cpu", "cuda"):
        # One kernel for the whole update instead of a dozen per tensor: on a 2-core CPU, 1.0 ms against 5.9 ms
        # for PyTorch's CPU default (a loop over the tensors) in the lesson's ~200 ms step.
        settings.setdefault("fused", True)
    try:
        return OPTIMIZERS[name](groups, **settings)
    except TypeError as err:
        raise ValueError(f"optimizer={name} refused its settings {settings}: {err}") from None


def make_schedule(optimizer: torch.optim.Optimizer, schedule: dict[str, Any], max_steps: int) -> LambdaLR:
    """The learning-rate schedule that `schedule` (a scheduler config) names, over `max_steps` optimizer steps."""
    if schedule["name"] == "cosine" and max_steps <= 0:
        raise ValueError("scheduler=cosine decays over trainer.max_steps: set trainer.max_steps to a positive number")
    multiplier = partial(
        warmup_cosine,
        warmup_steps=schedule["warmup_steps"],
        max_steps=max_steps,
        min_lr_ratio=schedule["min_lr_ratio"],
        decay=schedule["name"] == "cosine",
    )
    return LambdaLR(optimizer, multiplier)


class MiniGPTModule(L.LightningModule):
    """Trains a `GPT` on windows of tokens.

    Everything needed to rebuild the model is a plain hyper-parameter (the tokenizer as a string: a character
    vocabulary, or with `bpe` a byte-level BPE's JSON; sizes and optimiser settings as dicts), so the checkpoint
    is self-contained and `hparams.yaml` is plain YAML:

        MiniGPTModule(vocab="\\n !abc", model=dict(n_layer=2, n_head=2, n_embd=32, block_size=16))
        MiniGPTModule(bpe=Path("tokenizer.json").read_text(), model=...)
    """

    def __init__(
        self,
        vocab: str | None = None,
        model: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        bpe: str | None = None,
    ):
        super().__init__()
        optimizer = {"name": "adamw", "lr": 3e-4, **(optimizer or {})}
        scheduler = {"name": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1, **(scheduler or {})}
        if optimizer["name"] not in OPTIMIZERS:
            raise ValueError(f"optimizer.name={optimizer['name']!r} is not one of {sorted(OPTIMIZERS)}")
        # The settings go to the optimizer's constructor when training starts (weight decay and Muon's AdamW rate
        # through the parameter groups): one it does not take would fail only then, after the run's folder is set up.
        name = optimizer["name"]
        unknown = sorted(set(optimizer) - settings_of(name) - {"name"})
        if unknown:
            takers = [other for other in OPTIMIZERS if set(unknown) <= settings_of(other)]
            choose = (
                f", or choose an optimizer that takes them: {', '.join(f'optimizer={t}' for t in takers)} (each "
                "brings its own settings)"
                if takers
                else ": no optimizer here takes them"
            )
            raise ValueError(
                f"optimizer={name} does not take the setting(s) {unknown}; it takes "
                f"{sorted(settings_of(name))}. Leave them out{choose}."
            )
        for key in ("lr", "adamw_lr"):
            if key in optimizer and not optimizer[key] > 0:
                raise ValueError(f"optimizer.{key} must be a positive number, got {optimizer[key]!r}")
        if optimizer.get("weight_decay", 0) < 0:
            # given per parameter group, where PyTorch does not check it: a negative one would push weights outwards
            raise ValueError(f"optimizer.weight_decay must be a number >= 0, got {optimizer['weight_decay']!r}")
        if scheduler["name"] not in SCHEDULES:
            raise ValueError(f"scheduler.name={scheduler['name']!r} is not one of {list(SCHEDULES)}")
        if scheduler["warmup_steps"] < 0:
            raise ValueError(
                f"scheduler.warmup_steps must be a whole number of optimizer steps, 0 or more, got "
                f"{scheduler['warmup_steps']}"
            )
        if not 0.0 <= scheduler["min_lr_ratio"] <= 1.0:
            raise ValueError(
                f"scheduler.min_lr_ratio is the final learning rate over the peak, between 0 and 1; got "
                f"{scheduler['min_lr_ratio']}"
            )
        self.tokenizer = tokenizer_from_hparams(vocab, bpe)
        # Not sent to the loggers as they are: a BPE's JSON can be megabytes (train.py logs `settings` instead).
        self.save_hyperparameters(
            {**self.tokenizer.hparams(), "model": dict(model or {}), "optimizer": optimizer, "scheduler": scheduler},
            logger=False,
        )
        self.model = GPT(GPTConfig(vocab_size=self.tokenizer.vocab_size, **self.hparams.model))
        # One window: Lightning's model summary runs it through each layer for the in and out sizes and the FLOPs
        # of a forward pass (without it, a column of zeros)
        self.example_input_array = torch.zeros(1, self.model.config.block_size, dtype=torch.long)
        count_cpu_attention_flops()
        # Validation loss as metrics that sync across DDP ranks: the mean over every window (each rank validates its
        # share), and the lowest of the run, resumes included, which sweeps minimise (lightning-hydra-template's way).
        self.val_loss = MeanMetric(nan_strategy="disable")  # no check (a host sync per batch): a nan shows in the mean
        self.val_loss_best = MinMetric(nan_strategy="ignore")
        self.val_ppl = Perplexity()
        self._step_loss: torch.Tensor | None = None  # summed over the micro-batches of this optimizer step
        self._micro_batches = 0
        self._train_loss_sum: torch.Tensor | None = None  # over the optimizer steps since the last validation
        self._train_loss_count = 0
        self._restored_best: float | None = None  # from a checkpoint, applied when training starts
        self._rng_states: dict[str, torch.Tensor] | None = None  # from a checkpoint, applied when training starts

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        with eager():  # for one-off calls (the model summary, a user's module(x)): training calls the model itself
            return self.model(idx, targets)

    def _is_logging_step(self) -> bool:
        """Whether the loggers write on this step: Lightning's rule, checked before the optimizer step."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    @property
    def settings(self) -> dict[str, Any]:
        """The hyper-parameters a run varies (model, optimizer, schedule), without the tokenizer."""
        return {key: value for key, value in self.hparams.items() if key not in ("vocab", "bpe")}

    @property
    def best_val_loss(self) -> float:
        """The lowest val/loss of the run so far (nan before its first validation)."""
        best = float(self.val_loss_best.min_value)  # the same on every rank: each update was a synced mean
        return best if math.isfinite(best) else float("nan")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        new_cuda_graph_step()  # for compile_mode=reduce-overhead's CUDA graphs
        _, loss = self.model(x, y)
        # Kept past the next batch, so a copy: a CUDA graph's outputs are overwritten when it runs again.
        kept = loss.detach().clone()
        # sums on the device, no host sync; one addition per step without accumulation
        self._step_loss = self._step_loss + kept if self._micro_batches else kept
        self._micro_batches += 1
        if self._micro_batches == self.trainer.accumulate_grad_batches:  # the optimizer steps after this batch
            n, self._micro_batches = self._micro_batches, 0
            step_loss = self._step_loss / n if n > 1 else self._step_loss
            self._train_loss_sum = self._train_loss_sum + step_loss if self._train_loss_count else step_loss
            self._train_loss_count += 1
            # self.log costs ~1 ms of Python per call (Lightning moves its result state every time), which on a GPU
            # stalls small models; log only on the steps that are written, which is all the loggers would keep.
            if self._is_logging_step():  # the step's mean over its micro-batches and every rank's (one all-reduce)
                # not prog_bar=True: Lightning would read that value to the host after every step, a GPU sync per
                # step; the progress bar reads it at its own refreshes (minigpt/callbacks/progress.py)
                self.log("train/loss", step_loss, sync_dist=True)
            elif self.global_step == 0:  # the loss at initialisation, ~ln(vocab_size): the curve starts there
                first = float(self.trainer.strategy.reduce(step_loss, reduce_op="mean"))
                for logger in self.loggers:
                    logger.log_metrics({"train/loss": first}, step=0)  # the loggers put it at step 1, as Lightning's
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        # Eagerly, even when compiled: a few validation batches run as fast so, and need no second compilation for
        # eval mode and a shorter batch.
        with eager():
            logits, loss = self.model.forward(x, y)
        # one value per window, each of block_size tokens (not weight=: torchmetrics 1.9 drops it under "disable")
        self.val_loss.update(loss.expand(x.size(0)))
        self.val_ppl.update(logits.float(), y)  # under bf16 autocast the logits are bf16: too coarse for a softmax
        self.log("val/ppl", self.val_ppl)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # over every rank's windows
        self.val_loss.reset()
        # already the same on every rank: sync_dist (one scalar all-reduce per validation) keeps Lightning from warning
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.val_loss_best.update(loss)
            self.log("val/loss_best", self.val_loss_best.compute(), sync_dist=True)
            # the mean train/loss since the last validation, closed here: the checkpoints saved at this validation
            # (in the callbacks' on_validation_end, which comes next) start the next mean from nothing
            count, self._train_loss_count = self._train_loss_count, 0
            train_loss = self._train_loss_sum / count if count else torch.tensor(float("nan"), device=self.device)
            train_loss = self.trainer.strategy.reduce(train_loss, reduce_op="mean")  # over every rank's batches
            rank_zero_info(
                f"step {self.global_step}: train/loss {train_loss:.4f} (mean since the last validation or resume), "
                f"val/loss {loss:.4f}"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, which unscales fp16 gradients
        # inside its step. Without a gradient scaler (fp32, bf16) the gradients are already true: clip them here.
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # each process holds a shard of the gradients: only FSDP's own method takes the norm over all of them
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and optimizer.defaults.get("fused") and self.trainer.scaler is None:
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError("a fused optimizer supports gradient_clip_algorithm=norm only")
            torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout draws from the global generators: a resumed run needs them where the interrupted one left them.
        checkpoint["minigpt_format"] = CHECKPOINT_FORMAT
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state()
        checkpoint["val_loss_best"] = self.best_val_loss
        # What the global batch is made of besides data.batch_size: a resume with other numbers is warned about
        checkpoint["global_batch"] = {
            "accumulate_grad_batches": self.trainer.accumulate_grad_batches,
            "devices": self.trainer.num_devices,
            "num_nodes": self.trainer.num_nodes,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_states = checkpoint["rng_states"]
        self._restored_best = checkpoint["val_loss_best"]

    def on_train_start(self) -> None:
        # Restored here, not on load: creating the data loaders draws from the generator in between.
        states, self._rng_states = self._rng_states, None
        if states:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state(states["cuda"])
        best, self._restored_best = self._restored_best, None
        if best is not None and math.isfinite(best):  # the metric's state is on the training device by now
            self.val_loss_best.update(torch.tensor(best, device=self.device))
        # A resumed optimizer comes back with the rates its run last set, and the schedule only sets them again after
        # the next step: with another max_steps or warmup (the schedule is built anew from the command line), that
        # step would train at the old schedule's rate. Set them now, as this run's schedule has them at this step.
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            for group, base, multiplier in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
                group["lr"] = base * multiplier(schedule.last_epoch)

    def configure_optimizers(self):
        optimizer = make_optimizer(self.model, self.hparams.optimizer, self.device)
        scheduler = make_schedule(optimizer, self.hparams.scheduler, self.trainer.max_steps)
        # stepped after every optimizer step, not every epoch: a run is one long epoch of random windows
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> MiniGPTModule:
        """Rebuild the module from a checkpoint alone, without unpickling arbitrary objects (for the model alone,
        without Lightning: `minigpt.checkpoint.read_model`)."""
        checkpoint = load_checkpoint(path, map_location)
        try:
            module = cls(**hyper_parameters(checkpoint, path))
            module.load_state_dict(checkpoint["state_dict"])
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"{path} is not a minigpt checkpoint ({type(err).__name__}: {err})") from None
        return module.to(map_location)
