"""Training throughput: our Lightning module against a plain PyTorch loop and against the lesson's code.

Each repetition runs every variant once, in turn, in this one process; a variant's speed is the tokens per
second over `--steps` optimizer steps after `--warmup` steps (compilation, allocator warm-up). The report gives
medians over repetitions and ratios against the plain loop, and is appended to benchmarks/RESULTS.md.

    python benchmarks/throughput.py                                   # CPU, the lesson's model (model=seed)
    python benchmarks/throughput.py --device cuda --model small --batch-size 64 --compile   # one GPU, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (registers the config resolvers)
from benchmarks.lesson import LessonGPT, lesson_step  # noqa: E402
from benchmarks.report import append_results, machine_summary  # noqa: E402
from minigpt.data import RandomWindows, TextDataModule  # noqa: E402
from minigpt.model import GPT, GPTConfig  # noqa: E402
from minigpt.module import MiniGPTModule, param_groups, warmup_cosine  # noqa: E402


def compose_cfg(args, run_dir: str):
    overrides = [f"model={args.model}", f"data.batch_size={args.batch_size}",
                 f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
                 f"trainer.max_steps={args.warmup + args.steps}", f"trainer.val_check_interval={10**9}",
                 "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false",
                 "~callbacks.model_checkpoint", "~callbacks.step_checkpoint", "~callbacks.early_stopping",
                 "~callbacks.computation_graph", f"compile={args.compile}",
                 f"compile_mode={args.compile_mode}",
                 *args.override]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.run_dir = run_dir
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock(L.Callback):
    """Wall time of optimizer steps warmup+1 .. warmup+steps inside a Lightning run."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.warmup:
            sync(trainer.strategy.root_device)
            self.start = time.perf_counter()
        elif trainer.global_step == trainer.max_steps:
            sync(trainer.strategy.root_device)
            self.end = time.perf_counter()


def run_lightning(args, datamodule: TextDataModule) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_cfg(args, run_dir)
        L.seed_everything(cfg.seed, verbose=False)
        module = MiniGPTModule(
            vocab=datamodule.tokenizer.vocab, model=OmegaConf.to_container(cfg.model),
            optimizer=OmegaConf.to_container(cfg.optimizer), scheduler=OmegaConf.to_container(cfg.scheduler),
        )
        if cfg.compile:
            module.model.compile(mode=cfg.compile_mode)
        clock = StepClock(args.warmup)
        callbacks = [clock] + [train.hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
        loggers = [train.hydra.utils.instantiate(c) for c in cfg.logger.values()]
        trainer = train.make_trainer(cfg, callbacks, loggers)
        trainer.fit(module, datamodule=datamodule)
        return clock.end - clock.start


def run_plain(args, datamodule: TextDataModule) -> float:
    """The same model, batches, optimizer, schedule, clipping and precision, in a four-step loop."""
    device = torch.device(args.device)
    cfg = compose_cfg(args, tempfile.gettempdir())
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=datamodule.tokenizer.vocab_size, **cfg.model)).to(device)
    if args.compile:
        model.compile(mode=args.compile_mode)
    opt = dict(OmegaConf.to_container(cfg.optimizer))
    opt.pop("name")
    optimizer = torch.optim.AdamW(param_groups(model, opt.pop("weight_decay", 0.0)), **opt,
                                  fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        warmup_cosine, warmup_steps=cfg.scheduler.warmup_steps, max_steps=args.warmup + args.steps,
        min_lr_ratio=cfg.scheduler.min_lr_ratio))
    tokens = datamodule.train_tokens.to(device)
    batches = iter(RandomWindows(tokens, cfg.model.block_size, args.batch_size, cfg.seed))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        x, y = next(batches)
        with autocast:
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    sync(device)
    return time.perf_counter() - start


def run_lesson(args, datamodule: TextDataModule) -> float:
    device = torch.device(args.device)
    cfg = compose_cfg(args, tempfile.gettempdir())
    torch.manual_seed(cfg.seed)
    model = LessonGPT(datamodule.tokenizer.vocab_size, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_layer,
                      cfg.model.block_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    data = datamodule.train_tokens.long()  # the lesson keeps the text as int64 on the host
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            start = time.perf_counter()
        lesson_step(model, optimizer, data, args.batch_size, cfg.model.block_size, device)
    sync(device)
    return time.perf_counter() - start


VARIANTS = {"plain": run_plain, "lightning": run_lightning, "lesson": run_lesson}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per variant and repetition")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="module.compile() for our model (not the lesson's)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument("--variants", default="plain,lightning,lesson")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for our runs")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()

    cfg = compose_cfg(args, tempfile.gettempdir())
    datamodule = train.hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    tokens_per_step = args.batch_size * cfg.model.block_size
    variants = args.variants.split(",")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        for name in variants:
            seconds[name].append(VARIANTS[name](args, datamodule))
            print(f"rep {rep} {name}: {tokens_per_step * args.steps / seconds[name][-1]:,.0f} tokens/s", flush=True)

    speed = {v: tokens_per_step * args.steps / statistics.median(s) for v, s in seconds.items()}
    base = "plain" if "plain" in speed else variants[0]
    rows = ["| variant | tokens/s (median) | ms/step | vs " + base + " |", "|---|---|---|---|"]
    for name in variants:
        rows.append(f"| {name} | {speed[name]:,.0f} | {1000 * tokens_per_step / speed[name]:.1f} | "
                    f"{speed[name] / speed[base]:.3f} |")
    title = (f"Throughput: model={args.model}, batch {args.batch_size} x {cfg.model.block_size}, "
             f"{f'compiled ({args.compile_mode}), ' if args.compile else ''}{'bf16-mixed' if args.device == 'cuda' else 'fp32'}")
    append_results(args.results, title, " ".join(sys.argv), machine_summary(args.device),
                   "\n".join(rows) + f"\n\n{args.reps} repetitions of {args.steps} timed steps after {args.warmup} "
                   "warm-up steps, variants alternating; ratios of medians.")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
