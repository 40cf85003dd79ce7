"""Tokens/s and MFU of experiment=pretrain (GPT-2 124M-class, bf16, compiled, fused AdamW) on one device, through
Lightning as train.py runs it and in a plain PyTorch loop with the same model, batches, optimizer and precision.

The model has GPT-2's shape whatever the text: the BPE learns what it can from the text (about 20k tokens from
TinyShakespeare's 1 MB), and `model.vocab_multiple=50304` pads the embedding and head to GPT-2's padded vocabulary,
so the FLOPs per token are GPT-2's. Each variant runs `--warmup` untimed optimizer steps (compilation), then
`--steps` timed ones of `--accumulate` micro-batches of 16 x 1024 tokens; validation and checkpoints are off (their
cost is per run, not per step). MFU = tokens/s x training FLOPs per token (minigpt/callbacks/throughput.py) / peak.

    python benchmarks/pretrain.py --device cuda                 # one GPU, about 2 minutes on an H200
    python benchmarks/pretrain.py --device cpu --tiny            # a dry run of the same code at tiny size
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from lightning.pytorch.trainer.states import RunningStage
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_results, machine_summary  # noqa: E402
from benchmarks.throughput import fit_timed, sync  # noqa: E402
from minigpt import build, config  # noqa: E402, F401  (config registers the resolvers the YAML files use)
from minigpt.budget import apply_token_budget  # noqa: E402
from minigpt.callbacks.throughput import Throughput, training_flops_per_token  # noqa: E402
from minigpt.data import RandomWindows  # noqa: E402
from minigpt.model import GPT, GPTConfig, compile_model  # noqa: E402
from minigpt.module import make_optimizer, make_schedule  # noqa: E402
from minigpt.prepare import CONF  # noqa: E402

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "data.batch_size=4"]


def overrides(args) -> list[str]:
    """experiment=pretrain as users run it, for warmup + steps optimizer steps, without validation or checkpoints."""
    tokens_per_step = (4 if args.tiny else 16) * (64 if args.tiny else 1024) * args.accumulate
    return [
        "experiment=pretrain",
        f"data.path={args.data}",
        f"data.cache_dir={args.cache_dir}",
        "model.vocab_multiple=" + ("64" if args.tiny else "50304"),  # GPT-2's embedding and head, whatever the BPE
        f"data.tokens_per_step={tokens_per_step}",
        "tokens=null",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"val_every_n_steps={10**6}",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "~callbacks.model_checkpoint",
        "~callbacks.step_checkpoint",
        "~callbacks.text_samples",
        *(["trainer=cpu", "compile=false", "data.vocab_size=512", "data.num_workers=0", *TINY] if args.tiny else []),
        *args.override,
    ]


def compose(args, run_dir: str):
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=overrides(args))
    with open_dict(cfg):
        cfg.run_dir = run_dir
    apply_token_budget(cfg, processes=1)
    return cfg


def run_lightning(args, datamodule) -> tuple[float, dict[str, float]]:
    """Seconds of the timed steps, and what Lightning's ThroughputMonitor computed over its last window."""
    with tempfile.TemporaryDirectory() as run_dir:
        seconds, callbacks = fit_timed(compose(args, run_dir), datamodule, args.warmup)
        monitor = next(c for c in callbacks if isinstance(c, Throughput))
        return seconds, monitor._throughputs[RunningStage.TRAINING].compute()


def run_plain(args, datamodule) -> float:
    """The same model, windows, optimizer, schedule, clipping, precision and accumulation, in a plain loop."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(args, run_dir)
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=datamodule.tokenizer.vocab_size, **cfg.model)).to(device)
    compile_model(model, cfg.compile, cfg.compile_mode)
    optimizer = make_optimizer(model, OmegaConf.to_container(cfg.optimizer), device)
    schedule = make_schedule(optimizer, OmegaConf.to_container(cfg.scheduler), args.warmup + args.steps)
    windows = iter(RandomWindows(datamodule.train_tokens, cfg.model.block_size, cfg.data.batch_size, cfg.seed))
    accumulate, clip = cfg.trainer.accumulate_grad_batches, cfg.trainer.gradient_clip_val
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16-mixed")

    def step() -> None:
        for _ in range(accumulate):
            x, y = (t.to(device, non_blocking=True) for t in next(windows))
            with autocast:
                _, loss = model(x, y)
            (loss / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--data", help="a text file or folder (default: TinyShakespeare in $MINIGPT_CACHE_DIR)")
    parser.add_argument("--cache-dir", default=None, help="where its token file goes (default: data.cache_dir)")
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps before them (compilation)")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches of 16 x 1024 tokens per step")
    parser.add_argument("--peak-flops", type=float, help="the device's dense peak (default: the Throughput callback's)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 32-wide model: a dry run on a CPU")
    parser.add_argument("--variants", default="lightning,plain")
    parser.add_argument("--results", help="append a table to this Markdown file (e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for both variants")
    args = parser.parse_args()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        data_cfg = hydra.compose(config_name="train", overrides=["data=text", "data.path=x"]).data
    args.cache_dir = os.path.expanduser(args.cache_dir or data_cfg.cache_dir)  # Hydra refuses ~ in a value
    args.data = args.data or str(Path(args.cache_dir).expanduser() / "tinyshakespeare" / "input.txt")
    if args.peak_flops is not None:
        args.override.append(f"callbacks.throughput.peak_flops={args.peak_flops}")

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(args, run_dir)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    model = GPT(GPTConfig(vocab_size=datamodule.tokenizer.vocab_size, **cfg.model))
    flops_per_token = training_flops_per_token(model)
    tokens_per_step = cfg.data.tokens_per_step
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, vocabulary "
        f"{model.config.vocab_size} in {model.config.padded_vocab_size} rows, {flops_per_token / 1e9:.3f} GFLOP per "
        f"token; {tokens_per_step} tokens per step ({cfg.trainer.accumulate_grad_batches} x "
        f"{cfg.data.batch_size} x {cfg.model.block_size})",
        flush=True,
    )
    del model
    peak = args.peak_flops
    rows, seconds = [], {}
    for variant in args.variants.split(","):
        if variant == "lightning":
            seconds[variant], monitored = run_lightning(args, datamodule)
            if "device/mfu" in monitored:  # what TensorBoard shows, over the monitor's last window
                print(
                    f"ThroughputMonitor: {monitored['device/items_per_sec']:,.0f} tokens/s, MFU "
                    f"{monitored['device/mfu']:.1%}"
                )
                peak = peak or monitored["device/flops_per_sec"] / monitored["device/mfu"]
        elif variant == "plain":
            seconds[variant] = run_plain(args, datamodule)
        else:
            raise SystemExit(f"unknown variant {variant}")
        print(f"{variant}: {args.steps * tokens_per_step / seconds[variant]:,.0f} tokens/s", flush=True)
    baseline = seconds.get("plain")
    for variant, s in seconds.items():
        rate = args.steps * tokens_per_step / s
        mfu = f"{rate * flops_per_token / peak:.1%}" if peak else "n/a"
        ratio = f"{baseline / s:.2f}" if baseline else "n/a"
        rows.append(f"| {variant} | {rate:,.0f} | {1000 * s / args.steps:.1f} | {mfu} | {ratio} |")
    table = "\n".join(
        [
            f"{args.steps} optimizer steps of {tokens_per_step} tokens after {args.warmup} untimed; "
            + (f"peak {peak:.4g} FLOP/s" if peak else "no peak known (--peak-flops)")
            + f"; {flops_per_token / 1e9:.4g} GFLOP per token",
            "",
            "| variant | tokens/s | ms per step | MFU | speed vs plain loop |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if args.results:
        append_results(
            args.results,
            "experiment=pretrain throughput (GPT-2 124M-class)" + (" [tiny dry run]" if args.tiny else ""),
            "python benchmarks/pretrain.py " + " ".join(sys.argv[1:]),
            machine_summary(args.device),
            table,
        )


if __name__ == "__main__":
    main()
