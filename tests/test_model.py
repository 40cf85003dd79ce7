from __future__ import annotations

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

from minigpt.model import GPT, GPTConfig, Rotary, compile_model, eager

TINY = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(
    params=[{}, {"rope": True}, {"qk_norm": True}, {"rope": True, "qk_norm": True}],
    ids=["learned-positions", "rope", "qk-norm", "rope-qk-norm"],
)
def model(request):
    """Every test of this file that takes `model` holds for each attention variant."""
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, **request.param)).eval()


def test_output_shapes(model):
    idx = torch.randint(11, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 11) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == () and torch.isfinite(loss)


def test_causality(model):
    idx = torch.randint(11, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 11
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6)  # positions up to t see no future
    assert not torch.allclose(before[:, t + 1], after[:, t + 1])


def test_loss_at_initialisation_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(65, (8, 32))
    _, loss = model(idx, torch.randint(65, (8, 32)))
    assert abs(loss.item() - math.log(65)) < 0.1


def test_generate_length_and_context_cropping(model):
    prompt = torch.randint(11, (2, 5))
    out = model.generate(prompt, max_new_tokens=40, top_k=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 45)  # far past block_size=16: the context is cropped, not overflowed
    assert torch.equal(out[:, :5], prompt)
    assert int(out.max()) < 11


def test_generate_is_reproducible_with_a_generator(model):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 20, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_sequence_longer_than_block_size_is_refused(model):
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive"),
        (dict(block_size=-1), "block_size must be a positive"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_sizes_are_refused(sizes, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **sizes})


def test_attention_path_gives_the_fused_output_and_causal_weights(model):
    idx = torch.randint(11, (3, 16))
    fused, _ = model(idx)
    explicit, maps = model.forward_with_attention(idx)
    assert torch.allclose(explicit, fused, atol=1e-5)  # the same model, only computed step by step
    assert maps.shape == (2, 3, 2, 16, 16)  # (n_layer, B, nh, T, T)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 3, 2, 16), atol=1e-5)  # each query's weights sum to 1
    assert torch.all(maps.triu(diagonal=1) == 0)  # no position attends to a later one
    assert torch.allclose(maps[..., 0, 0], torch.ones(2, 3, 2))  # the first character can only look at itself


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    torch.manual_seed(0)
    rotary = Rotary(head_size=8, block_size=32)
    q, k = torch.randn(8), torch.randn(8)
    # the same query and key vector at every position: (B=1, T=32, heads=1, hs=8)
    rq, rk = rotary(q.expand(1, 32, 1, 8)), rotary(k.expand(1, 32, 1, 8))
    score = lambda m, n: (rq[0, m, 0] * rk[0, n, 0]).sum()  # noqa: E731
    for m, n in [(5, 2), (9, 9), (20, 3)]:
        for shift in (1, 7, 11):
            torch.testing.assert_close(score(m, n), score(m + shift, n + shift))
    assert not torch.allclose(score(5, 2), score(5, 3))  # a different distance, a different score
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(1, 32, 1))  # a rotation keeps lengths


def test_rope_replaces_the_learned_position_embeddings():
    model = GPT(GPTConfig(**TINY, rope=True))
    assert "wpe" not in model.transformer
    with pytest.raises(ValueError, match="even number of them.*Pick n_head among"):
        GPT(GPTConfig(**{**TINY, "n_embd": 30, "n_head": 2}, rope=True))


def test_compile_refuses_an_unknown_choice():
    with pytest.raises(ValueError, match=r"compile='full' is not one of the choices: false, true .* or regional"):
        compile_model(GPT(GPTConfig(**TINY)), "full")


@pytest.mark.slow
def test_regional_compilation_compiles_one_block_graph_and_changes_no_numbers():
    """Every block runs the graph traced for the first; names (so checkpoints) and results are the eager model's;
    under eager() other shapes, eval mode and generation add no graphs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    reference = GPT(GPTConfig(**{**TINY, "n_layer": 3}))
    compiled = copy.deepcopy(reference)
    compile_model(compiled, "regional")
    assert list(compiled.state_dict()) == list(reference.state_dict())
    idx = torch.randint(11, (4, 16))
    graphs = counters["stats"]["unique_graphs"]
    losses = []
    for model in (reference, compiled):
        _, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        losses.append(loss)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one block traced, three blocks run it
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(reference.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)

    compiled.eval()
    with eager(), torch.no_grad():
        compiled(idx[:3, :7].contiguous())
        compiled.generate(idx[:1, :2], max_new_tokens=3)
    assert counters["stats"]["unique_graphs"] - graphs == 1
