from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import yaml

from minigpt.checkpoint import read_model
from minigpt.module import MiniGPTModule, warmup_cosine
from tests.helpers import SIZES, VOCAB, fit, run_python


def test_module_is_built_by_hand_without_hydra():
    module = MiniGPTModule(vocab=VOCAB, model=SIZES)
    assert module.model.config.vocab_size == len(VOCAB)
    assert module.hparams.optimizer["name"] == "adamw"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(optimizer={"name": "lion"}), "not one of"),
        (dict(optimizer={"lr": 0}), "lr must be a positive number"),
        (
            dict(optimizer={"name": "sgd", "betas": [0.9, 0.99]}),
            r"sgd does not take the setting\(s\) \['betas'\]; .* "
            r"choose an optimizer that takes them: optimizer=adamw, optimizer=adam, optimizer=muon",
        ),
        (dict(optimizer={"name": "adamw", "nesterov": True}), r"choose an optimizer that takes them: optimizer=sgd,"),
        (dict(scheduler={"name": "step"}), "not one of"),
        (dict(model={**SIZES, "n_head": 3}), "divisible"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiniGPTModule(vocab=VOCAB, **{"model": SIZES, **kwargs})


def test_warmup_cosine_schedule():
    f = lambda step: warmup_cosine(step, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warmup
    assert f(60) == pytest.approx(0.55)  # half-way down the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # floor after max_steps
    assert all(f(s) >= f(s + 1) for s in range(10, 200))
    assert warmup_cosine(50, 0, 100, 0.1, decay=False) == 1.0


def test_one_sgd_step_is_w_minus_lr_times_grad():
    torch.manual_seed(0)
    lr = 0.5
    module = MiniGPTModule(
        vocab=VOCAB, model=SIZES, optimizer={"name": "sgd", "lr": lr}, scheduler={"name": "constant", "warmup_steps": 0}
    )
    x = torch.randint(len(VOCAB), (4, 16))
    y = torch.randint(len(VOCAB), (4, 16))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    # the gradient by hand, on a copy of the same weights
    _, loss = module.model(x, y)
    grads = dict(zip(before, torch.autograd.grad(loss, list(module.model.parameters()))))

    fit(module, x, y, steps=1)
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] - lr * grads[name], rtol=1e-5, atol=1e-7)


def test_adamw_skips_weight_decay_on_biases_norms_and_embeddings():
    module = MiniGPTModule(vocab=VOCAB, model=SIZES, optimizer={"name": "adamw", "weight_decay": 0.1})
    module.trainer = L.Trainer(max_steps=10, logger=False)  # the schedule reads max_steps
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(
        names[id(p)].endswith(".weight")
        and "ln" not in names[id(p)]
        and "wte" not in names[id(p)]
        and "wpe" not in names[id(p)]
        for p in decay["params"]
    )
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.h.0.attn.c_attn.bias",
    }
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert optimizer.defaults["fused"]  # one kernel per update on the CPU too (PyTorch's CPU default loops)


def test_checkpoint_is_self_contained_and_hparams_are_plain_yaml(trained_run):
    run_dir, _ = trained_run
    module = MiniGPTModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.tokenizer.decode(module.tokenizer.encode("ROMEO:")) == "ROMEO:"
    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())  # no python/object tags
    assert hparams["model"]["n_embd"] == 32 and hparams["optimizer"]["name"] == "adamw"
    assert "vocab" not in hparams  # the tokenizer is in the checkpoint; a BPE's JSON would fill the file


def test_missing_and_damaged_checkpoints_name_the_file(tmp_path, trained_run):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        MiniGPTModule.from_checkpoint(tmp_path / "nope.ckpt")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes((trained_run[0] / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    with pytest.raises(ValueError, match="damaged.ckpt.*truncated, damaged"):
        MiniGPTModule.from_checkpoint(damaged)


@pytest.mark.parametrize("read", [MiniGPTModule.from_checkpoint, read_model])
def test_a_checkpoint_of_another_format_is_refused_by_every_reader(read, tmp_path, trained_run):
    checkpoint = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["minigpt_format"] = 0
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    with pytest.raises(ValueError, match=r"older.ckpt was written by another version of minigpt \(checkpoint format 0"):
        read(older)


def test_read_model_rebuilds_the_trained_model_and_tokenizer(trained_run):

    path = trained_run[0] / "checkpoints" / "last.ckpt"
    model, tokenizer = read_model(path)
    module = MiniGPTModule.from_checkpoint(path)
    assert not model.training and tokenizer.vocab == module.tokenizer.vocab
    assert model.state_dict().keys() == module.model.state_dict().keys()
    assert all(torch.equal(v, module.model.state_dict()[k]) for k, v in model.state_dict().items())


def test_sampling_does_not_import_lightning(trained_run):
    """sample.py reads the checkpoint without Lightning, whose import is most of its start-up on a small CPU."""
    code = (
        "import sys; import sample; from minigpt.checkpoint import find_checkpoint, read_model; "
        f"read_model(find_checkpoint({str(trained_run[0])!r}, prefer='best')); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'torchmetrics'}))"
    )
    out = run_python("-c", code)
    assert out.stdout.strip() == "[]"


def test_fused_adamw_with_bf16_and_gradient_clipping_trains(cfg_tiny):
    """trainer=gpu uses fused AdamW under bf16-mixed with clipping, which Lightning alone refuses; CPU has both."""
    from omegaconf import open_dict

    import train

    with open_dict(cfg_tiny):
        cfg_tiny.trainer.precision = "bf16-mixed"
        cfg_tiny.trainer.max_steps = 4
        cfg_tiny.trainer.val_check_interval = 4
        cfg_tiny.optimizer.fused = True
        cfg_tiny.logger = None  # logger=none, with the default callbacks
    metrics = train.train(cfg_tiny)
    assert metrics["step"] == 4 and math.isfinite(metrics["val/loss"])


def test_the_best_of_several_kept_checkpoints_is_the_one_the_run_recorded(tmp_path):
    """With save_top_k > 1 the newest kept checkpoint need not be the best: the run's own record decides."""
    import os

    from minigpt.checkpoint import find_checkpoint

    folder = tmp_path / "moved_run" / "checkpoints"
    folder.mkdir(parents=True)
    record = {
        "ModelCheckpoint{'monitor': 'val/loss'}": {
            "monitor": "val/loss",
            "best_model_path": "/old/place/checkpoints/step000100.ckpt",
        },
        "StepCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": ""},
    }
    for i, (name, content) in enumerate(
        [("step000100.ckpt", {}), ("step000200.ckpt", {}), ("last.ckpt", {"callbacks": record})]
    ):
        torch.save(content, folder / name)
        os.utime(folder / name, (1000 + i, 1000 + i))  # written in this order
    assert find_checkpoint(tmp_path / "moved_run", prefer="best") == folder / "step000100.ckpt"
    assert find_checkpoint(tmp_path / "moved_run", prefer="last") == folder / "last.ckpt"
    torch.save({}, folder / "last.ckpt")  # no record (e.g. another callback set-up): the newest kept one
    os.utime(folder / "last.ckpt", (1002, 1002))
    assert find_checkpoint(tmp_path / "moved_run", prefer="best") == folder / "step000200.ckpt"


def test_the_model_summary_counts_a_forward_passes_flops():
    from lightning.pytorch.utilities.model_summary import ModelSummary

    module = MiniGPTModule(vocab=VOCAB, model=SIZES)
    flops = ModelSummary(module, max_depth=1).total_flops  # Lightning's, through example_input_array
    # a multiply and an add per weight of each linear layer and token of the window, and per channel of each layer's
    # two attention products (queries by keys, weights by values: T x T x n_embd each), as on a GPU
    T, C = SIZES["block_size"], SIZES["n_embd"]
    linear = sum(m.weight.numel() for m in module.model.modules() if isinstance(m, torch.nn.Linear))
    assert flops == 2 * linear * T + SIZES["n_layer"] * 2 * (2 * T * T * C)
