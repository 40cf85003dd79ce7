"""experiment=pretrain at tiny size: the token budget, the preparation command, a user's tokenizer.json, throughput
and the token count across a resume, DDP over gloo and FSDP."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import open_dict
from torch.utils.flop_counter import FlopCounterMode

import minigpt.corpus as corpus
import train
from minigpt import prepare
from minigpt.budget import apply_token_budget, processes_of
from minigpt.build import make_trainer, planned_strategy
from minigpt.callbacks.throughput import training_flops_per_token
from minigpt.data import CorpusDataModule
from minigpt.fsdp import fsdp_strategy
from minigpt.model import GPT, Block, GPTConfig
from minigpt.module import count_cpu_attention_flops
from minigpt.report import read_scalars
from minigpt.tokenizer import BPETokenizer
from tests.helpers import compose_train, run_python

# experiment=pretrain shrunk to run in seconds on a CPU: 4 windows of 16 tokens per micro-batch, 256 tokens per
# optimizer step (4 micro-batches on one process, 2 on two), 4 steps of the 1024-token budget.
PRETRAIN_TINY = [
    "experiment=pretrain",
    "trainer=cpu",
    "compile=false",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "data.vocab_size=300",
    "data.batch_size=4",
    "data.tokens_per_step=256",
    "tokens=1024",
    "val_every_n_steps=2",
    "data.val_batches=2",
    "data.num_workers=0",
    "scheduler.warmup_steps=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "callbacks.step_checkpoint.every_n_train_steps=1",
    "callbacks.throughput.window_size=2",
    "~callbacks.progress_bar",
    "~callbacks.gradient_health",
    "~callbacks.text_samples",
]


def tiny(text_file: Path, cache: Path, *overrides: str) -> list[str]:
    return [*PRETRAIN_TINY, f"data.path={text_file}", f"data.cache_dir={cache}", *overrides]


def test_the_token_budget_sets_accumulation_length_and_validation_for_any_number_of_processes(text_file, tmp_path):
    for processes, accumulate in ((1, 4), (2, 2), (4, 1)):
        cfg = compose_train(tiny(text_file, tmp_path), tmp_path)
        apply_token_budget(cfg, processes)
        assert cfg.trainer.accumulate_grad_batches == accumulate
        assert cfg.trainer.max_steps == 4  # 1024 tokens / 256 per step, whatever the processes
        assert cfg.trainer.val_check_interval == 2 * accumulate  # batches: every 2 optimizer steps
    cfg = compose_train(tiny(text_file, tmp_path), tmp_path)
    with pytest.raises(
        ValueError,
        match=r"data.tokens_per_step=256 is not a whole number of micro-batches .* x 3 "
        r"process\(es\) \(devices x nodes\) = 192 tokens: give a multiple of 192 \(e.g. 192 or 384\)",
    ):
        apply_token_budget(cfg, 3)
    # the real recipe: GPT-2's 2**19 tokens per step of 16 x 1024-token windows, and 1e9 tokens
    cfg = compose_train(["experiment=pretrain", f"data.path={text_file}"], tmp_path)
    for processes, accumulate in ((1, 32), (8, 4), (32, 1)):
        apply_token_budget(cfg, processes)
        assert cfg.trainer.accumulate_grad_batches == accumulate
    assert cfg.trainer.max_steps == math.ceil(1e9 / 2**19) == 1908


def test_train_counts_the_processes_its_trainer_will_have(text_file, tmp_path):
    for trainer, processes in (("cpu", 1), ("ddp_cpu", 2)):
        cfg = compose_train(tiny(text_file, tmp_path, f"trainer={trainer}"), tmp_path)
        assert processes_of(planned_strategy(cfg)) == processes


def test_the_padded_vocabulary_rounds_up_and_is_never_sampled():
    model = GPT(GPTConfig(vocab_size=300, vocab_multiple=64, n_layer=1, n_head=1, n_embd=8, block_size=8))
    assert model.lm_head.out_features == model.transformer.wte.num_embeddings == 320
    with torch.no_grad():
        model.lm_head.weight[300:] = 100.0  # padding ids made the likeliest: still never drawn
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, generator=torch.Generator().manual_seed(0))
    assert out.max() < 300


def test_the_flops_per_token_for_mfu_are_what_pytorch_counts_in_a_training_step():
    count_cpu_attention_flops()
    config = GPTConfig(vocab_size=300, vocab_multiple=64, n_layer=2, n_head=2, n_embd=32, block_size=16)
    model = GPT(config)
    x = torch.randint(300, (3, config.block_size))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    # PyTorch also counts the fused attention kernel's backward recomputing the scores (2 x layers x width x context
    # per token), which MFU leaves out: the rest is the formula, to the FLOP
    recomputed = 2 * config.n_layer * config.n_embd * config.block_size
    assert counter.get_total_flops() == (training_flops_per_token(model) + recomputed) * x.numel()


def test_prepare_writes_the_token_files_training_reads_and_is_safe_to_rerun(text_file, tmp_path, monkeypatch):
    overrides = tiny(text_file, tmp_path / "prepared")
    prepare.main(overrides)
    prepared = next((tmp_path / "prepared" / "corpora").iterdir())
    built = CorpusDataModule(path=str(text_file), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path / "trained"))
    built.setup()  # as train.py tokenizes when no one has
    for name in ("tokens.bin", "tokenizer.json"):
        assert (prepared / name).read_bytes() == (built.train_tokens.path.parent / name).read_bytes()

    monkeypatch.setattr(corpus, "build_corpus", lambda *args: pytest.fail("tokenized again"))
    prepare.main(overrides)  # a rerun finds the token file
    # a job of two processes started by torchrun reads the prepared files, and refuses to tokenize by itself
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert prepare.prepare(overrides).train_tokens.path.parent == prepared
    with pytest.raises(
        ValueError,
        match=r"one of 2 processes started by torchrun or SLURM: tokenize it once before "
        r"the job, with the same data settings: python -m minigpt.prepare data=text data.path=",
    ):
        CorpusDataModule(path=str(text_file), tokenizer="bpe", cache_dir=str(tmp_path / "none"))._tokenize()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, text_file) -> Path:
    """A Hugging Face tokenizer.json built here (nothing can be downloaded): a byte-level BPE, GPT-2's scheme, with
    a post-processor that adds an end-of-text token to each sequence, as some published tokenizers do."""
    from tokenizers import Tokenizer, processors

    tokenizer = Tokenizer.from_str(BPETokenizer.train([text_file.read_text()], 280, show_progress=False).json)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tokenizer.token_to_id("<|endoftext|>"))]
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_json_encodes_the_corpus_and_decodes_it_back(text_file, tokenizer_json, tmp_path):
    dm = CorpusDataModule(path=str(text_file), tokenizer=str(tokenizer_json), cache_dir=str(tmp_path), block_size=16)
    dm.setup()
    assert dm.tokenizer.vocab_size == 281  # its 280 tokens and the special one
    text = text_file.read_text()
    tokens = torch.cat([dm.train_tokens[:], dm.val_tokens[:]])
    assert dm.tokenizer.decode(tokens) == text  # no end-of-text token added to each line
    assert (dm.train_tokens.path.parent / "tokenizer.json").read_text() == tokenizer_json.read_text()

    edited = tmp_path / "edited" / "tokenizer.json"  # another tokenizer at another path: tokenized anew, elsewhere
    edited.parent.mkdir()
    edited.write_text(tokenizer_json.read_text().replace('"<|endoftext|>"', '"<|end|>"'))
    again = CorpusDataModule(path=str(text_file), tokenizer=str(edited), cache_dir=str(tmp_path), block_size=16)
    again.setup()
    assert again.train_tokens.path != dm.train_tokens.path
    with pytest.raises(
        ValueError,
        match=r"data.tokenizer=nope.json is not one of char, bpe nor the path of a Hugging "
        "Face tokenizer.json",
    ):
        CorpusDataModule(path=str(text_file), tokenizer="nope.json", cache_dir=str(tmp_path)).setup()


def test_resuming_from_a_step_checkpoint_continues_the_token_count_and_logs_throughput(
    text_file, tokenizer_json, tmp_path, caplog
):
    overrides = tiny(
        text_file, tmp_path / "cache", f"data.tokenizer={tokenizer_json}", "callbacks.throughput.peak_flops=1e12"
    )
    cfg = compose_train([*overrides, "tokens=512"], tmp_path / "run")  # 2 steps of 4 micro-batches
    train.train(cfg)
    cfg = compose_train([*overrides, f"ckpt_path={tmp_path / 'run'}"], tmp_path / "run")  # on to 1024 tokens
    with caplog.at_level(logging.INFO):
        metrics = train.train(cfg)
    assert metrics["step"] == 4
    assert re.search(r"step 4: [\d,]+ tokens/s \([\d,]+ per device\), MFU [\d.]+%, 1024 tokens so far", caplog.text)
    scalars, _ = read_scalars(str(tmp_path / "run" / "tensorboard"))
    tokens = scalars["train/tokens"]
    assert list(tokens.steps) == [1, 2, 3, 4] and list(tokens.values) == [256, 512, 768, 1024]
    assert 0 < scalars["train/device/mfu"].values[-1] < 1  # against the peak given
    assert scalars["train/device/items_per_sec"].values[-1] > 0  # tokens/s
    # the model has GPT-2's padded vocabulary shape: 281 tokens in 320 rows
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"][
            "model.lm_head.weight"
        ].shape[0]
        == 320
    )


@pytest.mark.slow
def test_prepare_then_the_tiny_pretrain_trains_on_a_folder_through_ddp_with_two_gloo_processes(text_file, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    lines = text_file.read_text().splitlines(keepends=True)
    (folder / "a.txt").write_text("".join(lines[: len(lines) // 2]))
    (folder / "b.txt").write_text("".join(lines[len(lines) // 2 :]))
    overrides = tiny(folder, tmp_path / "cache", "trainer=ddp_cpu")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    prepared = run_python("-m", "minigpt.prepare", *overrides, env=env)
    assert "Ready:" in prepared.stderr, prepared.stderr[-3000:]
    run = tmp_path / "run"
    run_python("train.py", *overrides, f"hydra.run.dir={run}", timeout=600, env=env)
    log = (run / "train.log").read_text()
    assert "Using the token file" in log and "Tokenizing" not in log  # prepared once, before
    assert "256 tokens per optimizer step = 4 windows of 16 tokens per device x 2 process(es) x 2 accumulated" in log
    scalars, _ = read_scalars(str(run / "tensorboard"))
    assert list(scalars["train/tokens"].values) == [256, 512, 768, 1024]  # both processes' windows counted
    assert "val/loss" in scalars and (run / "checkpoints" / "last.ckpt").is_file()


def test_fsdp_composes_with_one_unit_per_block_and_is_refused_on_a_cpu(text_file, tmp_path):
    cfg = compose_train(
        tiny(text_file, tmp_path, "trainer=fsdp", "trainer.strategy.activation_checkpointing=true"), tmp_path
    )
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "full"
    # Lightning turns each set of classes into PyTorch's policy: shard, and recompute activations, per block
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert not fsdp_strategy()._activation_checkpointing_kwargs  # off unless asked for
    if torch.cuda.is_available():
        return
    # PyTorch's FSDP needs an accelerator ("FSDP needs a non-CPU accelerator device"); Lightning says so first
    with open_dict(cfg):
        cfg.trainer.accelerator, cfg.trainer.devices = "cpu", 2
    with pytest.raises(InstantiationException, match="requires a GPU accelerator"):
        make_trainer(cfg, [], [])


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch's FSDP trains on accelerators only")
def test_fsdp_trains_and_resumes_on_a_gpu(text_file, tmp_path):
    overrides = tiny(text_file, tmp_path / "cache", "trainer=fsdp", "trainer.devices=1", "trainer.precision=bf16-mixed")
    train.train(compose_train([*overrides, "tokens=512"], tmp_path / "run"))
    metrics = train.train(compose_train([*overrides, f"ckpt_path={tmp_path / 'run'}"], tmp_path / "run"))
    assert metrics["step"] == 4 and math.isfinite(metrics["val/loss"])
