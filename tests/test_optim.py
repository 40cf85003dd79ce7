from __future__ import annotations

import io

import lightning as L
import pytest
import torch

from minigpt.module import MiniGPTModule
from minigpt.optim import Muon, orthogonalize
from tests.helpers import SIZES, VOCAB, fit


@pytest.mark.parametrize("rows, cols", [(16, 64), (96, 24), (32, 32)])
def test_orthogonalize_brings_every_singular_value_near_one(rows, cols):
    torch.manual_seed(0)
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(3, rows, k)).Q
    v = torch.linalg.qr(torch.randn(3, cols, k)).Q
    singular = 10 * torch.logspace(-2, 0, k)  # spread over two decades, as a gradient's can be
    updates = u @ torch.diag(singular) @ v.mT
    directions = orthogonalize(updates)
    assert directions.shape == updates.shape
    got = torch.linalg.svdvals(directions)
    assert got.min() > 0.5 and got.max() < 1.5  # Jordan's iteration: near 1, not exactly 1
    polar = u @ v.mT  # the exact answer, U V^T: the directions point the same way
    cosine = (directions * polar).sum((-2, -1)) / (directions.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cosine > 0.95).all()


def test_orthogonalize_treats_each_matrix_of_a_stack_alone():
    torch.manual_seed(0)
    stack = torch.randn(3, 8, 20)
    torch.testing.assert_close(orthogonalize(stack)[1], orthogonalize(stack[1:2])[0])


def test_adamw_groups_follow_torch_adamw_exactly():
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    settings = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    muon = Muon([{"params": ours, "use_muon": False, **settings}])
    adamw = torch.optim.AdamW(theirs, **settings)
    for _ in range(10):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        muon.step()
        adamw.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)


def test_muon_step_is_lr_times_the_orthogonalized_nesterov_momentum():
    torch.manual_seed(0)
    w = torch.randn(48, 16, requires_grad=True)  # tall: its step is scaled by sqrt(48 / 16)
    lr, mu, wd = 0.02, 0.9, 0.1
    optimizer = Muon([{"params": [w]}], lr=lr, momentum=mu, weight_decay=wd)
    buffer = torch.zeros_like(w)
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.randn_like(w)
        buffer = mu * buffer + w.grad
        expected = before * (1 - lr * wd) - lr * 3**0.5 * orthogonalize((w.grad + mu * buffer)[None])[0]
        optimizer.step()
        torch.testing.assert_close(w.detach(), expected)


def test_muon_refuses_a_vector_in_a_muon_group():
    with pytest.raises(ValueError, match=r"2-D weight matrices only.*\(7,\).*use_muon=False"):
        Muon([{"params": [torch.zeros(7, requires_grad=True), torch.zeros(3, 3, requires_grad=True)]}])


def test_muon_resumes_from_its_state_dict():
    torch.manual_seed(1)
    params = [torch.randn(8, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    optimizer = Muon([{"params": params[:1]}, {"params": params[1:], "use_muon": False}])
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    copies = [p.detach().clone().requires_grad_() for p in params]
    resumed = Muon([{"params": copies[:1]}, {"params": copies[1:], "use_muon": False}])
    saved = io.BytesIO()  # through a file, as a checkpoint carries it (a live state_dict shares its tensors)
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    torch.manual_seed(123)  # the next gradients: the same for both continuations
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        for p, g in zip(copies, step_grads):
            p.grad = g.clone()
        optimizer.step()
        resumed.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q)


def test_module_gives_block_matrices_to_muon_and_the_rest_to_adamw():
    module = MiniGPTModule(vocab=VOCAB, model=SIZES, optimizer={"name": "muon", "lr": 0.02, "adamw_lr": 3e-3})
    module.trainer = L.Trainer(max_steps=10, logger=False)  # the schedule reads max_steps
    configured = module.configure_optimizers()
    matrices, others = configured["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    assert {names[id(p)] for p in matrices["params"]} == {
        f"transformer.h.{i}.{layer}.weight"
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight", "transformer.ln_f.weight"} <= {
        names[id(p)] for p in others["params"]
    }
    assert len(matrices["params"]) + len(others["params"]) == len(names)
    assert (matrices["lr"], others["lr"]) == (0.02, 3e-3)
    scheduler = configured["lr_scheduler"]["scheduler"]  # one schedule scales both learning rates
    configured["optimizer"].step()  # no gradients yet: changes nothing, but keeps the scheduler's order check quiet
    scheduler.step()
    assert matrices["lr"] / 0.02 == pytest.approx(others["lr"] / 3e-3)


def test_muon_trains_the_model_through_lightning():
    torch.manual_seed(0)
    module = MiniGPTModule(
        vocab=VOCAB, model=SIZES, optimizer={"name": "muon"}, scheduler={"name": "constant", "warmup_steps": 0}
    )
    x = torch.randint(len(VOCAB), (8, 16))
    y = torch.roll(x, -1, dims=1)  # a pattern to learn: the next token is the one after it in x
    first = module.model(x, y)[1].item()
    fit(module, x, y, steps=30, gradient_clip_val=1.0)
    assert module.model(x, y)[1].item() < first - 1.0


def test_matrices_of_transposed_shapes_step_as_if_alone():
    torch.manual_seed(0)
    wide, tall = torch.randn(8, 32, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    alone = [w.detach().clone().requires_grad_() for w in (wide, tall)]
    together = Muon([{"params": [wide, tall]}])  # one batched product for both
    separate = [Muon([{"params": [w]}]) for w in alone]
    for _ in range(3):
        for w, a in zip((wide, tall), alone):
            w.grad = torch.randn_like(w)
            a.grad = w.grad.clone()
        together.step()
        for optimizer in separate:
            optimizer.step()
    for w, a in zip((wide, tall), alone):
        torch.testing.assert_close(w, a)
