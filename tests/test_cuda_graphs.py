"""compile_mode=reduce-overhead: CUDA graphs replay into the same output memory, so what outlives a step is a copy,
and every step tells PyTorch that a new one begins. CUDA graphs need a GPU (benchmarks/gpu.sh runs them there); on
the CPU these tests check the two rules, and that the mode itself composes and trains (Inductor skips the graphs)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from omegaconf import open_dict

import train
from minigpt.model import GPT, GPTConfig
from minigpt.report import read_scalars

TINY = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def step_marks(monkeypatch) -> list[int]:
    """Counts the calls of torch.compiler.cudagraph_mark_step_begin (one element per call), with CUDA graphs' machinery
    loaded as compile_mode=reduce-overhead loads it."""
    import torch._inductor.cudagraph_trees  # noqa: F401

    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    return marks


def test_generation_marks_a_new_step_for_each_token(step_marks):
    GPT(GPTConfig(**TINY)).eval().generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=7)
    assert len(step_marks) == 7


def test_every_training_step_begins_a_new_cuda_graph_step(cfg_tiny, step_marks):
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.update(max_steps=4, val_check_interval=2, num_sanity_val_steps=0)
        cfg_tiny.callbacks.text_samples.max_new_tokens = 5
    train.train(cfg_tiny)
    # 4 training steps and, after each of the 2 validations (eager: no graphs), a sample of 5 tokens
    assert len(step_marks) == 4 + 2 * 5


def test_the_losses_a_run_keeps_survive_the_models_next_call(cfg_tiny, monkeypatch, run_log):
    """A CUDA graph's replay overwrites the outputs of the one before (PyTorch then raises "accessing tensor output of
    CUDAGraphs that has been overwritten by a subsequent run"). Emulated here: each call of the model fills its
    previous outputs with nan. The console's mean train/loss, summed over steps, must still be the losses'."""
    forward, previous = GPT.forward, []

    def overwriting_forward(self, idx, targets=None):
        for output in previous:
            output.data.fill_(float("nan"))  # what the next replay does to the memory of the last outputs
        logits, loss = forward(self, idx, targets)
        previous[:] = [logits] if loss is None else [logits, loss]
        return logits, loss

    monkeypatch.setattr(GPT, "forward", overwriting_forward)
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.update(max_steps=4, val_check_interval=4, log_every_n_steps=1, num_sanity_val_steps=0)
    train.train(cfg_tiny)
    line = next(r.getMessage() for r in run_log.records if r.getMessage().startswith("step 4: train/loss"))
    mean = float(re.search(r"train/loss ([0-9.nai]+)", line)[1])
    logged = read_scalars(f"{cfg_tiny.run_dir}/tensorboard")[0]["train/loss"].values  # steps 1..4, copied by Lightning
    assert math.isfinite(mean) and mean == pytest.approx(sum(logged) / len(logged), abs=1e-3)


@pytest.mark.slow
def test_reduce_overhead_compiles_trains_validates_and_samples(cfg_tiny):
    """On the CPU Inductor compiles the model and skips the CUDA graphs: the mode's composition and code path."""
    torch._dynamo.reset()
    with open_dict(cfg_tiny):
        cfg_tiny.compile, cfg_tiny.compile_mode = True, "reduce-overhead"
        cfg_tiny.trainer.update(max_steps=6, val_check_interval=3)
        cfg_tiny.callbacks.text_samples.max_new_tokens = 5
    metrics = train.train(cfg_tiny)
    assert metrics["step"] == 6 and math.isfinite(metrics["val/loss"])


@pytest.mark.slow
def test_a_run_that_compiles_nothing_does_not_load_inductor_for_cuda_graphs():
    """Marking a CUDA-graph step would import Inductor (seconds) into every run; it waits until Inductor is loaded."""
    from tests.helpers import run_python

    code = (
        "import sys, torch, train; from minigpt.model import GPT, GPTConfig; "
        "GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=32)).generate("
        "torch.zeros(1, 2, dtype=torch.long), 3); print('torch._inductor.cudagraph_trees' in sys.modules)"
    )
    out = run_python("-c", code)
    assert out.stdout.strip() == "False"
