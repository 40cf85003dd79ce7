"""Training throughput: our Lightning module against a plain PyTorch loop and against the lesson's code.

Each repetition runs every variant once, in turn, in this one process; a variant's speed is the tokens per
second over `--steps` optimizer steps after `--warmup` steps (compilation, allocator warm-up). The report gives
medians over repetitions and ratios against the plain loop, and is appended to benchmarks/RESULTS.md.

    python benchmarks/throughput.py                                   # CPU, the lesson's model (model=seed)
    python benchmarks/throughput.py --device cuda --model small --batch-size 64 --compile   # one GPU, bf16
    python benchmarks/throughput.py --variants lightning,ddp,lesson   # also `python train.py trainer=ddp_cpu`
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.lesson import LessonGPT, lesson_step  # noqa: E402
from benchmarks.report import append_results, machine_summary  # noqa: E402
from minigpt import build, config  # noqa: E402, F401  (config registers the resolvers the YAML files use)
from minigpt.data import RandomWindows, TextDataModule  # noqa: E402
from minigpt.model import GPT, GPTConfig, compile_model, new_cuda_graph_step  # noqa: E402
from minigpt.module import make_optimizer, make_schedule  # noqa: E402


def overrides(args, trainer: str | None = None, batch_size: int | None = None) -> list[str]:
    """Our runs' settings: no checkpoints, validation, early stop or graph, so that only training steps count."""
    return [
        f"model={args.model}",
        f"data.batch_size={batch_size or args.batch_size}",
        f"trainer={trainer or ('gpu' if args.device == 'cuda' else 'cpu')}",
        f"trainer.max_steps={args.warmup + args.steps}",
        f"trainer.val_check_interval={10**9}",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "~callbacks.model_checkpoint",
        "~callbacks.step_checkpoint",
        "~callbacks.early_stopping",
        "~callbacks.computation_graph",
        f"compile={args.compile}",
        f"compile_mode={args.compile_mode}",
        *args.override,
    ]


def compose_cfg(args, run_dir: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides(args))
    with open_dict(cfg):
        cfg.run_dir = run_dir
    return cfg


# What the timed steps are measured with: wall time, or with --clock cpu this process's CPU time, which other jobs on
# a shared machine disturb far less (their share of the cores is not counted; their use of the caches still is).
CLOCK = [time.perf_counter]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock(L.Callback):
    """Wall time of optimizer steps warmup+1 .. max_steps inside a Lightning run. With accumulation the hook runs after
    every micro-batch, and several see step `warmup`: the first of them starts the clock."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, *_):
        if trainer.global_step == self.warmup and self.start is None:
            sync(trainer.strategy.root_device)
            self.start = CLOCK[0]()
        elif trainer.global_step == trainer.max_steps:
            sync(trainer.strategy.root_device)
            self.end = CLOCK[0]()


class StepClockFile(StepClock):
    """A StepClock for a run in another process: global rank zero writes the seconds to `path` at the end."""

    def __init__(self, warmup: int, path: str):
        super().__init__(warmup)
        self.path = path

    def on_train_end(self, trainer, *_):
        if trainer.is_global_zero:
            Path(self.path).write_text(repr(self.end - self.start))


def run_ddp(args, datamodule: TextDataModule) -> float:
    """Our Lightning module as `python train.py trainer=ddp_cpu` runs it: the same global batch shared by
    `--processes` processes on this machine's cores (Lightning gives each cores / processes threads), gradients
    averaged over gloo. Launched as a command, so its start-up is outside the clock, as for the other variants."""
    if args.device != "cpu":
        raise SystemExit("the ddp variant runs CPU processes (trainer=ddp_cpu); on GPUs use trainer=ddp")
    if args.batch_size % args.processes:
        raise SystemExit(f"--batch-size {args.batch_size} does not split evenly over --processes {args.processes}")
    with tempfile.TemporaryDirectory() as run_dir:
        seconds_file = Path(run_dir) / "seconds"
        command = [
            sys.executable,
            str(ROOT / "train.py"),
            *overrides(args, "ddp_cpu", args.batch_size // args.processes),
            f"trainer.devices={args.processes}",
            "logger=none",
            f"hydra.run.dir={run_dir}/run",
            "+callbacks.step_clock._target_=benchmarks.throughput.StepClockFile",
            f"+callbacks.step_clock.warmup={args.warmup}",
            f"+callbacks.step_clock.path={seconds_file}",
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode or not seconds_file.exists():
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return float(seconds_file.read_text())


def fit_timed(cfg, datamodule, warmup: int) -> tuple[float, list[L.Callback]]:
    """A run as train.py builds it (module, callbacks, loggers, trainer): the seconds of its steps after `warmup`,
    and its callbacks."""
    L.seed_everything(cfg.seed, verbose=False)
    module = build.make_module(cfg, datamodule)
    compile_model(module.model, cfg.compile, cfg.compile_mode)
    clock = StepClock(warmup)
    callbacks, loggers = build.make_callbacks_and_loggers(cfg)
    trainer = build.make_trainer(cfg, [clock, *callbacks], loggers)
    trainer.fit(module, datamodule=datamodule)
    return clock.end - clock.start, callbacks


def run_lightning(args, datamodule: TextDataModule) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        return fit_timed(compose_cfg(args, run_dir), datamodule, args.warmup)[0]


def time_steps(step, args, device: torch.device, profiler=None) -> float:
    """Seconds for `args.steps` calls of `step` after `args.warmup` untimed ones (inside `profiler`, if given)."""
    for _ in range(args.warmup):
        step()
    sync(device)
    with profiler or contextlib.nullcontext():
        start = CLOCK[0]()
        for _ in range(args.steps):
            step()
        sync(device)
        return CLOCK[0]() - start


def run_plain(args, datamodule: TextDataModule, profiler=None) -> float:
    """The same model, batches, optimizer, schedule, clipping and precision, in a four-step loop."""
    device = torch.device(args.device)
    cfg = compose_cfg(args, tempfile.gettempdir())
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=datamodule.tokenizer.vocab_size, **cfg.model)).to(device)
    compile_model(model, cfg.compile, cfg.compile_mode)
    optimizer = make_optimizer(model, OmegaConf.to_container(cfg.optimizer), device)
    schedule = make_schedule(optimizer, OmegaConf.to_container(cfg.scheduler), args.warmup + args.steps)
    tokens = datamodule.train_tokens.to(device)
    batches = iter(RandomWindows(tokens, cfg.model.block_size, args.batch_size, cfg.seed))
    precision = str(cfg.trainer.precision)  # as Lightning's: bf16-mixed or 16-mixed autocast, 32-true none
    autocast = torch.autocast(
        device.type,
        dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16,
        enabled=precision in ("bf16-mixed", "16-mixed"),
    )
    clip = cfg.trainer.gradient_clip_val

    def step() -> None:
        x, y = next(batches)
        new_cuda_graph_step()  # as the module's training_step (compile_mode=reduce-overhead)
        with autocast:
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()

    return time_steps(step, args, device, profiler)


def run_lesson(args, datamodule: TextDataModule, profiler=None) -> float:
    device = torch.device(args.device)
    cfg = compose_cfg(args, tempfile.gettempdir())
    torch.manual_seed(cfg.seed)
    model = LessonGPT(
        datamodule.tokenizer.vocab_size, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_layer, cfg.model.block_size
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr)
    data = datamodule.train_tokens.long()  # the lesson keeps the text as int64 on the host
    return time_steps(
        partial(lesson_step, model, optimizer, data, args.batch_size, cfg.model.block_size, device),
        args,
        device,
        profiler,
    )


# Where a step's time goes, by operator (self time, so nothing counts twice): name fragments -> category.
CATEGORIES = [
    ("matrix multiplies", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("fused attention kernel", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("softmax and causal mask", ("aten::_softmax", "masked_fill", "aten::tril", "aten::triu", "aten::eq")),
    ("GELU", ("aten::gelu",)),
    ("LayerNorm", ("layer_norm",)),
    (
        "copies, fills, cat, stack",
        (
            "aten::copy_",
            "aten::fill_",
            "aten::zero_",
            "aten::cat",
            "aten::stack",
            "aten::clone",
            "aten::index",
            "aten::slice",
        ),
    ),
]


def categorize(name: str) -> str:
    return next(
        (category for category, fragments in CATEGORIES if any(f in name for f in fragments)),
        "other operators (elementwise, optimizer, embedding, loss)",
    )


def profile_variant(name: str, args, datamodule: TextDataModule) -> dict[str, float]:
    """Milliseconds per step by category of operator, from PyTorch's profiler over `args.steps` steps."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if args.device == "cuda" else []
    )
    profiler = torch.profiler.profile(activities=activities)
    seconds = VARIANTS[name](args, datamodule, profiler)
    per_step: dict[str, float] = {}
    for event in profiler.key_averages():
        self_us = event.self_device_time_total if args.device == "cuda" else event.self_cpu_time_total
        category = categorize(event.key)
        per_step[category] = per_step.get(category, 0.0) + self_us / 1000 / args.steps
    per_step["step (wall, under the profiler)"] = 1000 * seconds / args.steps
    return per_step


# Where a step's host time goes (cProfile self time, by the file of the function): path fragment -> category.
HOST_CATEGORIES = [
    (
        "compiled code's runtime (Dynamo guards, Inductor, CUDA graphs)",
        ("torch/_dynamo", "torch/_inductor", "torch/_functorch", "cudagraph"),
    ),
    ("Lightning (loops, hooks, logging, precision)", ("lightning/", "torchmetrics/")),
    ("minigpt (model, module, callbacks, data)", ("/minigpt/",)),
    ("PyTorch's Python (optimizer, clipping, autograd, modules)", ("torch/",)),
]


def host_category(filename: str) -> str:
    if filename == "~":  # cProfile's name for built-ins: operators, kernel launches, Python's own
        return "C++ calls (operators, kernel launches, built-ins)"
    return next(
        (category for category, fragments in HOST_CATEGORIES if any(f in filename for f in fragments)), "other Python"
    )


def host_profile_variant(name: str, args, datamodule: TextDataModule) -> dict[str, float]:
    """Milliseconds of host time per step by where it is spent, from cProfile over one run of the variant.

    On a GPU the step is asynchronous: this is the Python and launch time that has to stay below the kernels'
    time, or it is the step's time. The counts include cProfile's own overhead, which inflates Python-heavy code.
    """
    profiler = cProfile.Profile()
    profiler.enable()
    seconds = VARIANTS[name](args, datamodule)  # the whole run: set-up and warm-up steps are in it too
    profiler.disable()
    # Only functions called on every step count, so the set-up's one-off calls stay out.
    per_step: dict[str, float] = {}
    for (filename, _, _), (_, ncalls, self_s, _, _) in pstats.Stats(profiler).stats.items():
        if ncalls >= args.steps:
            category = host_category(filename)
            per_step[category] = per_step.get(category, 0.0) + 1000 * self_s / (args.warmup + args.steps)
    per_step["step (wall of the timed steps, under cProfile)"] = 1000 * seconds / args.steps
    return per_step


VARIANTS = {"plain": run_plain, "lightning": run_lightning, "lesson": run_lesson, "ddp": run_ddp}
PROFILED = ("plain", "lesson")  # a Lightning step runs the plain loop's operators


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="seed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per variant and repetition")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="true",
        default="false",
        choices=["false", "true", "regional"],
        help="compile our model (not the lesson's): the whole model, or with `regional` each block",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead")
    parser.add_argument(
        "--variants",
        default="plain,lightning,lesson",
        help=f"from {', '.join(VARIANTS)}: ddp is ours in --processes processes (trainer=ddp_cpu)",
    )
    parser.add_argument("--processes", type=int, default=2, help="processes of the ddp variant")
    parser.add_argument("--baseline", help="the variant the ratios are against (default: plain, else the first)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for our runs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then, where the plain and lesson steps spend their time, by kind of operator (PyTorch's profiler)",
    )
    parser.add_argument(
        "--host-profile",
        action="store_true",
        help="then, where the plain and Lightning steps "
        "spend their host time: Lightning, the compiled code's runtime, PyTorch's Python... (cProfile)",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="time steps by the wall clock, or by this process's CPU time (steadier on a machine shared with other "
        "jobs; with OMP_NUM_THREADS=1 the two agree on an idle machine). The ddp variant is timed by the wall clock",
    )
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    if unknown := sorted(set(args.variants.split(",")) - set(VARIANTS)):  # before minutes of the others
        parser.error(f"--variants {args.variants}: {', '.join(unknown)} is not one of {', '.join(VARIANTS)}")
    if args.baseline and args.baseline not in args.variants.split(","):
        parser.error(f"--baseline {args.baseline} is not among --variants {args.variants}")

    cfg = compose_cfg(args, tempfile.gettempdir())
    datamodule = hydra.utils.instantiate(cfg.data)
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
    base = args.baseline or ("plain" if "plain" in speed else variants[0])
    ms = {v: 1000 * statistics.median(s) / args.steps for v, s in seconds.items()}
    rows = [
        f"| variant | tokens/s (median) | ms/step | vs {base} | ms/step more than {base} |",
        "|---|---|---|---|---|",
    ]
    for name in variants:
        rows.append(
            f"| {name} | {speed[name]:,.0f} | {ms[name]:.2f} | {speed[name] / speed[base]:.3f} | "
            f"{ms[name] - ms[base]:+.2f} |"
        )
    compiled = {
        "false": "",
        "true": f"compiled ({args.compile_mode}), ",
        "regional": f"compiled ({args.compile_mode}, each block), ",
    }[args.compile]
    title = (
        f"Throughput: model={args.model}, batch {args.batch_size} x {cfg.model.block_size}, {compiled}"
        f"{'bf16-mixed' if args.device == 'cuda' else 'fp32'}"
    )
    body = "\n".join(rows) + (
        f"\n\n{args.reps} repetitions of {args.steps} timed steps after {args.warmup} "
        "warm-up steps, variants alternating; ratios of medians"
        + (", timed by the process's CPU time (--clock cpu)." if args.clock == "cpu" else ".")
    )
    if "ddp" in variants:  # the threads Lightning gives each process, unless OMP_NUM_THREADS says
        threads = os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // args.processes)
        body += (
            f" ddp: `python train.py trainer=ddp_cpu trainer.devices={args.processes}`, {args.processes} "
            f"processes of {args.batch_size // args.processes} windows and {threads} thread(s) each, gradients "
            "averaged over gloo; their start-up is outside the clock."
        )
    profiled = [v for v in PROFILED if v in variants] if args.profile else []
    if profiled:
        profiles = {v: profile_variant(v, args, datamodule) for v in profiled}
        categories = [c for c, _ in CATEGORIES] + [categorize("")]
        table = ["| ms per step | " + " | ".join(profiled) + " |", "|---" * (len(profiled) + 1) + "|"]
        table += [
            f"| {c} | " + " | ".join(f"{profiles[v].get(c, 0.0):.1f}" for v in profiled) + " |"
            for c in categories + ["step (wall, under the profiler)"]
        ]
        body += (
            "\n\nWhere the time goes: PyTorch's profiler over one more run of each; operators' self "
            + ("GPU time" if args.device == "cuda" else "CPU time (wall time on the calling thread)")
            + " by kind, per step.\n\n"
            + "\n".join(table)
        )
    host_profiled = [v for v in ("plain", "lightning") if v in variants] if args.host_profile else []
    if host_profiled:
        profiles = {v: host_profile_variant(v, args, datamodule) for v in host_profiled}
        categories = [c for c, _ in HOST_CATEGORIES] + [
            "other Python",
            host_category("~"),
            "step (wall of the timed steps, under cProfile)",
        ]
        table = ["| host ms per step | " + " | ".join(host_profiled) + " |", "|---" * (len(host_profiled) + 1) + "|"]
        table += [
            f"| {c} | " + " | ".join(f"{profiles[v].get(c, 0.0):.2f}" for v in host_profiled) + " |" for c in categories
        ]
        body += (
            "\n\nWhere the host's time goes: cProfile over one more run of each; self time of the functions "
            "called on every step, by where they live, per step (cProfile's own cost inflates the Python "
            "rows).\n\n" + "\n".join(table)
        )
    append_results(args.results, title, " ".join(sys.argv), machine_summary(args.device), body)
    print(body)


if __name__ == "__main__":
    main()
