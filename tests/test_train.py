from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch._dynamo.utils import counters

import train
from minigpt import build, config, errors, schema
from minigpt.callbacks.startup import PREFIX as STARTUP
from minigpt.callbacks.startup import parse_startup
from minigpt.checkpoint import find_checkpoint, read_model
from minigpt.data import WindowsDataModule
from minigpt.module import MiniGPTModule, warmup_cosine
from minigpt.report import read_scalars
from minigpt.run_folder import ckpt_path_arg, shown
from tests.helpers import CONF, compose_train, run_python

GROUPS = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF.iterdir() if d.is_dir()}


def test_short_run_lowers_val_loss_and_writes_checkpoint_and_events(trained_run):
    run_dir, metrics = trained_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name != "last.ckpt" for p in (run_dir / "checkpoints").glob("*.ckpt"))  # the best on val/loss
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/ppl", "grad/norm_total", "train/lr/decay"} <= tags
    assert "epoch" not in tags  # always 0 in a run of one endless epoch
    assert any(t.startswith("grad/norm/transformer.h.0.") for t in tags)  # per-layer norms
    val = [e.value for e in events.Scalars("val/loss")]
    assert len(val) == 2 and val[-1] < val[0]
    # every axis counts the optimizer steps done: validations at their checkpoints' steps, losses at log steps
    assert [e.step for e in events.Scalars("val/loss")] == [20, 40]
    best = next(p.name for p in (run_dir / "checkpoints").glob("step*.ckpt"))
    assert best == f"step{events.Scalars('val/loss')[val.index(min(val))].step:06d}-val_loss{min(val):.4f}.ckpt"
    assert [e.step for e in events.Scalars("train/loss")] == [1, 10, 20, 30, 40]  # the first step's too
    _, tokenizer = read_model(run_dir / "checkpoints" / "last.ckpt")
    assert events.Scalars("train/loss")[0].value == pytest.approx(math.log(tokenizer.vocab_size), abs=0.25)  # at init
    assert metrics["val/loss"] == pytest.approx(val[-1], abs=1e-4)
    ppl = events.Scalars("val/ppl")[-1].value
    assert ppl == pytest.approx(math.exp(val[-1]), rel=1e-3)  # torchmetrics' perplexity agrees with the loss
    for event in events.Scalars("train/lr/decay"):  # the warmup-cosine schedule, stepped per optimizer step
        # at the step the rate made: the update from step event.step - 1 to event.step
        assert event.value == pytest.approx(3e-3 * warmup_cosine(event.step - 1, 5, 40, 0.1), rel=1e-4), event.step


def test_val_loss_best_is_the_lowest_validation_also_without_a_checkpoint_callback(cfg_tiny):
    with open_dict(cfg_tiny):  # a learning rate high enough for the last validation not to be the best
        cfg_tiny.optimizer.lr, cfg_tiny.scheduler.name = 0.1, "constant"
        cfg_tiny.trainer.val_check_interval = 5
        del cfg_tiny.callbacks.model_checkpoint  # as in the speed runs and callbacks=none
    metrics = train.train(cfg_tiny)
    val = read_scalars(Path(cfg_tiny.run_dir) / "tensorboard")[0]["val/loss"].values
    assert len(val) == 8  # (which validation is the lowest depends on the machine's arithmetic: not asserted)
    assert metrics["val/loss_best"] == pytest.approx(min(val)) and metrics["val/loss"] == pytest.approx(val[-1])


class MicroBatchLosses(Callback):
    losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        MicroBatchLosses.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)  # Lightning divides


def test_under_accumulation_train_loss_is_the_mean_over_the_steps_micro_batches(cfg_tiny):
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.update(max_steps=6, accumulate_grad_batches=2, val_check_interval=6, log_every_n_steps=1)
        cfg_tiny.callbacks.micro_batches = {"_target_": f"{__name__}.MicroBatchLosses"}
    MicroBatchLosses.losses = []
    train.train(cfg_tiny)
    scalars = read_scalars(Path(cfg_tiny.run_dir) / "tensorboard")[0]
    logged = scalars["train/loss"]
    pairs = MicroBatchLosses.losses
    assert logged.steps == [1, 2, 3, 4, 5, 6] and len(pairs) == 12
    assert logged.values == pytest.approx([(a + b) / 2 for a, b in zip(pairs[::2], pairs[1::2])], rel=1e-6)
    assert scalars["train/lr/decay"].steps == [1, 2, 3, 4, 5, 6]  # once per optimizer step, not per micro-batch


def test_sample_prints_text_that_starts_with_the_prompt(trained_run):
    run_dir, _ = trained_run
    out = run_python("sample.py", f"ckpt_path={run_dir}", "prompt=ROMEO:", "max_new_tokens=30", "num_samples=2")
    samples = out.stdout.rstrip("\n").split("\n---------------\n")
    assert len(samples) == 2 and all(s.startswith("ROMEO:") and len(s) == 36 for s in samples)


@pytest.mark.parametrize("config, command", [("sample", "sample.sample"), ("inspect", "minigpt.inspect.inspect")])
def test_reading_a_run_without_ckpt_path_says_what_to_give(config, command):
    import importlib

    module, function = command.rsplit(".", 1)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config)
    with pytest.raises(
        ValueError, match=r"ckpt_path is missing: give the run to read, e.g. python .*ckpt_path=outputs/"
    ):
        getattr(importlib.import_module(module), function)(cfg)


def test_sample_names_characters_outside_the_vocabulary(trained_run):
    import sample

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"ckpt_path={trained_run[0]}", "prompt='ROMEO€#'"])
    with pytest.raises(ValueError, match="'#', '€'"):
        sample.sample(cfg)


def test_a_prompt_of_backslash_n_starts_from_a_new_line(trained_run):
    import sample

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"ckpt_path={trained_run[0]}", "prompt=\\n", "max_new_tokens=5"])
    assert cfg.prompt == "\\n"  # as Hydra passes it on: a backslash and an n
    (text,) = sample.sample(cfg)
    assert text.startswith("\n") and len(text) == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_sampling_on_a_missing_gpu_says_so_instead_of_blaming_the_checkpoint(trained_run):
    import sample

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"ckpt_path={trained_run[0]}", "device=cuda"])
    with pytest.raises(ValueError, match=r"device=cuda is not available here .*give device=cpu"):
        sample.sample(cfg)


def _config_cases():
    for group, options in GROUPS.items():
        for option in options:
            yield group, option


@pytest.mark.parametrize("group, option", list(_config_cases()))
def test_every_config_composes_and_instantiates(group, option, text_file, tmp_path):
    # (the fixture's 13 KB are 4k BPE tokens: too few for pretrain's windows of 1024)
    short = ["model.block_size=256"] if option == "pretrain" else []
    cfg = compose_train([f"{group}={option}", f"data.path={text_file}", *short], run_dir=tmp_path)
    schema.check(cfg, schema.Train)  # every setting the project ships has its type
    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, WindowsDataModule)
    datamodule.setup("fit")
    # the module checks the model, optimizer and scheduler settings against what they take
    module = MiniGPTModule(
        **datamodule.tokenizer.hparams(),
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
    )
    for entry in (cfg.get("callbacks") or {}).values():
        hydra.utils.instantiate(entry)
    for entry in (cfg.get("logger") or {}).values():
        hydra.utils.instantiate(entry)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="trainer=cpu"):
            config.validate_trainer(cfg.trainer)
    else:
        module.trainer = build.make_trainer(cfg, [], [])
        module.configure_optimizers()  # the optimizer and the schedule, built from their settings


def test_types_are_checked_and_open_groups_take_more_settings():
    schema.check(
        compose_train(["+trainer.detect_anomaly=true", "+optimizer.eps=1e-6", "trainer.max_steps=10"]), schema.Train
    )
    with pytest.raises(ValueError, match="could not be converted to Integer\\s+full_key: model.n_head"):
        schema.check(compose_train(["model.n_head=4.0"]), schema.Train)
    # what Hydra instantiates is typed by its constructor's annotations, and takes only the arguments it names
    with pytest.raises(ValueError, match="converted to Integer\\s+full_key: callbacks.progress_bar.refresh_rate"):
        schema.check(compose_train(["callbacks.progress_bar.refresh_rate=often"]), schema.Train)
    with pytest.raises(KeyError, match="Key 'max_tokens' not in 'TextSamples'"):
        schema.check(compose_train(["+callbacks.text_samples.max_tokens=5"]), schema.Train)


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_every_experiment_trains_a_few_steps_on_the_cpu(experiment, text_file, tmp_path):
    """Each recipe as configured (its model's layers and widths, optimizer, schedule, callbacks), on the CPU, with
    short windows and batches and without compilation so that it takes seconds."""
    cfg = compose_train(
        [
            f"experiment={experiment}",
            "trainer=cpu",
            f"data.path={text_file}",
            "compile=false",
            "model.block_size=32",
            "data.batch_size=2",
            "data.val_batches=1",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "scheduler.warmup_steps=1",
            "logger=none",
            "~callbacks.progress_bar",
            # pretrain's budget in tokens (0.5 M a step, 1e9 in all) would take these steps over
            *(["data.tokens_per_step=null", "tokens=null"] if experiment == "pretrain" else []),
        ],
        run_dir=tmp_path,
    )
    metrics = train.train(cfg)
    assert metrics["step"] == 3 and math.isfinite(metrics["val/loss"])
    if experiment == "speedrun":  # documented to keep no checkpoint: no saving on its clock
        with pytest.raises(FileNotFoundError, match="saved none.*callbacks keep no checkpoint"):
            find_checkpoint(tmp_path, prefer="best")
    else:  # sample.py can read what the recipe kept
        model, _ = read_model(find_checkpoint(tmp_path, prefer="best"))
        assert model.config.n_layer == cfg.model.n_layer


def test_a_run_says_where_its_folder_is_and_how_to_sample_from_it(cfg_tiny, caplog, monkeypatch, tmp_path):
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.max_steps = 2
    with caplog.at_level(logging.INFO):
        train.train(cfg_tiny)
    messages = [r.getMessage() for r in caplog.records]
    assert f"Run folder: {cfg_tiny.run_dir}" in messages  # at the start, before the long part
    assert messages[-2].startswith("Finished at step 2") and messages[-2].endswith(f"Run folder: {cfg_tiny.run_dir}")
    assert messages[-1] == f"Generate text from it: python sample.py ckpt_path={cfg_tiny.run_dir}"
    monkeypatch.chdir(tmp_path)  # below the working directory, as outputs/ is: the path a user would type
    assert shown(str(tmp_path / "outputs" / "x")) == "outputs/x"


@pytest.mark.parametrize("path", ["outputs/2026-11-26/06-26-12", "/m/0_optimizer=adamw,model=tiny", 'a "b" c'])
def test_the_printed_ckpt_path_reads_back_as_the_folder(path):
    """A multirun job's folder name has = and , which Hydra's grammar reads as syntax unless quoted."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    (word,) = shlex.split(ckpt_path_arg(path))
    assert OverridesParser.create().parse_override(word).value() == path


def test_an_error_from_a_data_loader_worker_is_reported_without_the_workers_traceback():
    from minigpt.corpus import TokenFileChanged

    worker = TokenFileChanged(
        "Caught TokenFileChanged in DataLoader worker process 0.\nOriginal Traceback (most "
        'recent call last):\n  File "x.py", line 1\nminigpt.corpus.TokenFileChanged: gone'
    )
    assert errors.user_message(worker) == "gone"
    assert errors.user_message(ValueError("plain: message")) == "plain: message"


def test_callbacks_none_means_no_checkpoints_and_no_progress_bar_from_lightning_either(cfg_tiny):
    trainer = build.make_trainer(cfg_tiny, [], [])  # Lightning would add its own, counting epochs
    assert trainer.checkpoint_callback is None and trainer.progress_bar_callback is None


def start_up_line(caplog) -> str:
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith(STARTUP))


def test_a_run_says_where_its_start_up_went(cfg_tiny, run_log, monkeypatch):
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.max_steps = 2
    monkeypatch.setattr(train, "LAUNCHED", None)  # as for a multirun's next job: launched when train() starts
    config.quiet_known_noise()  # as main() does
    started = time.perf_counter()
    train.train(cfg_tiny)
    wall = time.perf_counter() - started
    line = start_up_line(run_log)
    phases = parse_startup(line)
    total = phases.pop("total")
    assert list(phases) == ["imports", "data and model", "trainer set-up", "first step"], line
    assert all(seconds >= 0 for seconds in phases.values()), line
    assert 0 < total <= wall + 0.05, line  # the start-up is part of the run, not more
    assert "compilation" not in line
    assert not any("litlogger" in r.getMessage() for r in run_log.records)  # Lightning's advert is left out


@pytest.mark.slow
def test_regional_compilation_trains_with_every_callback_and_compiles_once(cfg_tiny, run_log):
    """Validation, samples, attention maps and both graphs run the compiled model eagerly: one graph in all."""
    with open_dict(cfg_tiny):
        cfg_tiny.compile = "regional"
        cfg_tiny.trainer.max_steps = 10
        cfg_tiny.trainer.val_check_interval = 5
    graphs = counters["stats"]["unique_graphs"]
    metrics = train.train(cfg_tiny)
    assert metrics["step"] == 10 and math.isfinite(metrics["val/loss"])
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert "(compilation included)" in start_up_line(run_log)
    warned = [r.getMessage() for r in run_log.records if r.levelno >= logging.WARNING]  # e.g. the TensorBoard graph
    assert not [w for w in warned if "Graphviz's `dot` program is not installed" not in w]
    checkpoint = torch.load(f"{cfg_tiny.run_dir}/checkpoints/last.ckpt", weights_only=True)
    assert not [k for k in checkpoint["state_dict"] if "_orig_mod" in k]  # loads into an uncompiled model


@pytest.mark.slow
def test_multirun_makes_one_folder_per_job(multirun_dir):
    jobs = sorted(p for p in multirun_dir.iterdir() if p.is_dir())
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1"]
    assert "optimizer=adamw" in jobs[0].name and "optimizer=sgd" in jobs[1].name
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "csv" / "metrics.csv").is_file()
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "train.log").is_file()


def _tinyshakespeare_or_skip() -> None:
    cfg = compose_train([])
    datamodule = hydra.utils.instantiate(cfg.data)
    try:
        datamodule.prepare_data()
    except FileNotFoundError as err:
        pytest.skip(f"TinyShakespeare is not available here: {err}")


@pytest.mark.slow
def test_seed_model_on_tinyshakespeare_beats_the_unigram_entropy(tmp_path):
    _tinyshakespeare_or_skip()
    cfg = compose_train(
        [
            "model=seed",
            "trainer=cpu",
            "trainer.max_steps=150",
            "trainer.val_check_interval=150",
            "trainer.enable_model_summary=false",
            "~callbacks.progress_bar",
            "data.batch_size=16",
            "optimizer.lr=3e-3",
            "scheduler.warmup_steps=20",
        ],
        run_dir=tmp_path,
    )
    metrics = train.train(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup()
    counts = torch.bincount(datamodule.train_tokens.long()).double()
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * p.log()).sum())  # the best loss of a model that ignores context
    assert 3.2 < unigram_entropy < 3.4
    assert metrics["val/loss"] < unigram_entropy - 0.6, (metrics["val/loss"], unigram_entropy)


def test_the_trainer_profiles_nothing_by_default_and_profiles_when_asked(cfg_tiny):
    from lightning.pytorch.profilers import SimpleProfiler

    from minigpt.profiler import NoProfiler

    profiler = build.make_trainer(cfg_tiny, [], []).profiler
    assert isinstance(profiler, NoProfiler)
    assert profiler.profile("a") is profiler.profile("b")  # one shared no-op context: nothing built per hook
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.profiler = "simple"  # as trainer.profiler=simple on the command line
    assert isinstance(build.make_trainer(cfg_tiny, [], []).profiler, SimpleProfiler)
