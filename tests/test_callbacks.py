"""The callbacks that show what training does: each checked on the shared tiny run and by its own properties."""

from __future__ import annotations

import logging
import math
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import train
from minigpt import plots
from minigpt.callbacks.early_stopping import EarlyStopping
from minigpt.callbacks.gradient_health import GradientHealth, layer_of, measure
from minigpt.callbacks.samples import as_markdown
from minigpt.graph import render_autograd_graph
from minigpt.model import GPT, GPTConfig
from tests.helpers import TINY, assert_is_a_picture, compose_train, decode_png

LAYERS = ["embeddings", "h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp", "ln_f", "lm_head"]  # the tiny model's


@pytest.fixture(scope="module")
def events(trained_run) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(trained_run[0] / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


@pytest.fixture
def model_with_gradients() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(11, (4, 16))
    _, loss = model(idx, torch.roll(idx, -1, dims=1))
    loss.backward()
    return model


def test_parameters_are_grouped_into_the_layers_a_reader_thinks_in(model_with_gradients):
    groups = [layer_of(name) for name, _ in model_with_gradients.named_parameters()]
    assert list(dict.fromkeys(groups)) == LAYERS  # input side first, as the gradient-flow chart draws them
    assert layer_of("transformer.h.1.ln_2.weight") == "h.1.mlp" and layer_of("transformer.h.0.ln_1.bias") == "h.0.attn"


def test_layer_statistics(model_with_gradients):
    model = model_with_gradients
    grad_norms, layers = measure(model)
    by_name = {s.name: s for s in layers}
    ln_f = [p for n, p in model.named_parameters() if n.startswith("transformer.ln_f")]
    grad_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ln_f]))
    assert by_name["ln_f"].grad_norm == pytest.approx(float(grad_norm), rel=1e-5)
    head = model.lm_head.weight.grad
    assert by_name["lm_head"].mean_abs == pytest.approx(float(head.abs().mean()), rel=1e-5)
    assert by_name["lm_head"].max_abs == pytest.approx(float(head.abs().max()), rel=1e-5)
    total = math.sqrt(sum(v**2 for v in grad_norms.values()))
    assert total == pytest.approx(
        float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))), rel=1e-5
    )


def test_update_ratio_is_the_optimizers_actual_step_against_the_weights(model_with_gradients):
    model = model_with_gradients
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    logged = {}
    logger = SimpleNamespace(
        log_metrics=lambda metrics, step: logged.update({(k, step): v for k, v in metrics.items()})
    )
    trainer = SimpleNamespace(global_step=9, is_global_zero=True, loggers=[logger], gradient_clip_val=None)
    module = SimpleNamespace(model=model)
    health = GradientHealth(every_n_steps=10)
    ln_f = [p for n, p in model.named_parameters() if n.startswith("transformer.ln_f")]
    before = [p.detach().clone() for p in ln_f]

    health.on_before_optimizer_step(trainer, module, optimizer)  # step 10 is a measured one
    optimizer.step()
    trainer.global_step = 10
    health.on_train_batch_end(trainer, module, None, None, 0)
    health.on_train_batch_end(trainer, module, None, None, 1)  # once per measured step

    moved = torch.linalg.vector_norm(torch.cat([(p.detach() - w).flatten() for p, w in zip(ln_f, before)]))
    size = torch.linalg.vector_norm(torch.cat([w.flatten() for w in before]))
    ratios = {key: value for key, value in logged.items() if key[0].startswith("grad/update_ratio/")}
    assert set(ratios) == {(f"grad/update_ratio/{layer}", 9) for layer in LAYERS}  # Lightning's count for step 10
    assert ratios[("grad/update_ratio/ln_f", 9)] == pytest.approx(float(moved / size), rel=1e-5)


def test_vanishing_and_exploding_gradients_are_named_in_the_log(model_with_gradients, caplog):
    model = model_with_gradients
    block = model.transformer.h[0]
    for p in [*block.ln_2.parameters(), *block.mlp.parameters()]:
        p.grad.zero_()  # a dead layer: the MLP and the LayerNorm that feeds it
    model.lm_head.weight.grad.mul_(1e6)  # a blown-up one
    _, layers = measure(model)
    with caplog.at_level(logging.WARNING):
        GradientHealth().warn(step=123, layers=layers)
    vanished, exploded = (r.getMessage() for r in caplog.records)
    assert "step 123" in vanished and "vanishes" in vanished and "h.0.mlp" in vanished and "h.1.mlp" not in vanished
    assert "step 123" in exploded and "explodes" in exploded and "lm_head" in exploded and "h.0.attn" not in exploded


def test_healthy_gradients_give_no_warning(model_with_gradients, caplog):
    _, layers = measure(model_with_gradients)
    with caplog.at_level(logging.WARNING):
        GradientHealth().warn(step=1, layers=layers)
    assert not caplog.records


def test_gradient_scalars_are_written_only_on_logging_steps(events):
    tags = set(events.Tags()["scalars"])
    assert {f"grad/layer/{layer}" for layer in LAYERS} <= tags
    assert {f"grad/update_ratio/{layer}" for layer in LAYERS} <= tags
    assert len(events.Scalars("grad/norm_total")) == 4  # 40 steps, written every 10: measured 4 times, not 40
    steps = [e.step for e in events.Scalars("grad/norm_total")]
    assert all([e.step for e in events.Scalars(f"grad/update_ratio/{layer}")] == steps for layer in LAYERS)
    for layer in LAYERS:
        ratios = [e.value for e in events.Scalars(f"grad/update_ratio/{layer}")]
        norms = [e.value for e in events.Scalars(f"grad/layer/{layer}")]
        assert all(0 < r < 1 for r in ratios), (layer, ratios)  # a step is a small fraction of the weights
        assert all(0 < n < 100 and math.isfinite(n) for n in norms), (layer, norms)
    # clipping at trainer.gradient_clip_val=1 scales each measured gradient by min(1, 1 / its norm)
    scales = [e.value for e in events.Scalars("grad/clip_scale")]
    assert scales == pytest.approx([min(1.0, 1.0 / e.value) for e in events.Scalars("grad/norm_total")], rel=1e-5)
    # the per-layer norms add up to the total
    total = events.Scalars("grad/norm_total")[-1].value
    assert math.sqrt(sum(events.Scalars(f"grad/layer/{layer}")[-1].value ** 2 for layer in LAYERS)) == pytest.approx(
        total, rel=1e-4
    )


def test_gradient_flow_chart_is_an_image_in_tensorboard_and_the_run_folder(events, trained_run):
    flow = events.Images("grad/flow")
    assert [e.step for e in flow] == [20, 40]  # one chart per validation
    pixels = decode_png(flow[-1].encoded_image_string)
    assert_is_a_picture(pixels)
    saved = decode_png((trained_run[0] / "gradient_flow.png").read_bytes())
    assert saved.shape[:2] == pixels.shape[:2]


def test_attention_maps_have_one_image_per_layer(events, trained_run):
    for layer in range(2):
        images = events.Images(f"attention/layer_{layer}")
        assert [e.step for e in images] == [20, 40]
        pixels = decode_png(images[-1].encoded_image_string)
        assert_is_a_picture(pixels)
        assert pixels.shape[1] > pixels.shape[0]  # the 2 heads side by side
        assert (trained_run[0] / f"attention_layer{layer}.png").is_file()


@pytest.mark.parametrize("max_steps, drawn", [(40, [10, 30, 40]), (25, [10, 20])])
def test_attention_maps_are_drawn_every_n_validations_and_at_the_last(max_steps, drawn, cfg_tiny):
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.max_steps = max_steps  # 25: the last validation is at step 20, not at the end
        cfg_tiny.trainer.val_check_interval = 10  # validations at steps 10, 20, 30 (, 40)
        cfg_tiny.callbacks.attention_maps.every_n_validations = 2
        for name in ("computation_graph", "text_samples", "gradient_health"):
            del cfg_tiny.callbacks[name]
    train.train(cfg_tiny)
    events = EventAccumulator(str(Path(cfg_tiny.run_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("attention/layer_0")] == drawn


def test_attention_maps_label_each_key_and_query_with_its_character():
    weights = torch.softmax(torch.randn(2, 4, 4), dim=-1).numpy()
    figure = plots.attention_heads(weights, "ab c", "layer 0")
    axes = figure.axes[:2]  # the two heads (the colorbar comes last)
    for ax in axes:
        below = [t for t in ax.texts if t.get_position()[1] > 3]  # under the image: y grows downwards
        assert [t.get_text() for t in below] == ["a", "b", "␣", "c"]
        assert [t.get_position()[0] for t in below] == [0, 1, 2, 3]  # one per column
    left = [t for t in axes[0].texts if t.get_position()[0] < 0]
    assert [t.get_text() for t in left] == ["a", "b", "␣", "c"]
    assert [t.get_position()[1] for t in left] == [0, 1, 2, 3]  # one per row
    assert not [t for t in axes[1].texts if t.get_position()[0] < 0]  # the other heads share the first's rows


def test_attention_colours_show_weights_spread_over_many_keys_on_one_scale_for_every_map():
    T = 64
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # each query spread evenly
    images = [
        plots.attention_heads(w[None].numpy(), "x" * T, "layer 0").axes[0].images[0] for w in (uniform, torch.eye(T))
    ]
    for image in images:  # 0 and 1 are the ends of the scale whatever the map holds: maps of two steps compare
        assert image.norm(0.0) == 0.0 and image.norm(1.0) == 1.0
    # the last query's even 1/64 gets an eighth of the colour scale, not the 1.6% a linear scale gives it
    assert images[0].norm(1 / T) == pytest.approx(1 / 8)


def test_samples_are_logged_as_text_at_each_validation(events):
    tag = next(t for t in events.Tags()["tensors"] if t.startswith("samples/ROMEO"))
    samples = events.Tensors(tag)
    assert [e.step for e in samples] == [20, 40]
    text = samples[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("```\nROMEO:") and text.endswith("\n```")
    assert len(text) == len("```\n\n```") + len("ROMEO:") + 60  # the prompt and max_new_tokens new characters


def test_markdown_keeps_line_breaks():
    assert as_markdown("ROMEO:\nO, she doth\n  teach") == "```\nROMEO:\nO, she doth\n  teach\n```"


def test_graph_names_the_parameters_and_is_in_tensorboard(events, trained_run):
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's `dot` is not installed (apt-get install graphviz): the run wrote graph.dot instead")
    svg = ET.parse(trained_run[0] / "graph.svg").getroot()
    text = " ".join(t.text or "" for t in svg.iter("{http://www.w3.org/2000/svg}text"))
    assert "transformer.h.0.attn.c_attn.weight" in text and "lm_head.weight" in text  # parameters by name
    assert "NllLossBackward" in text  # the graph starts at the loss
    assert events.Tags()["graph"]  # TensorBoard's Graphs tab has the model
    assert any("c_attn" in node.name for node in events.Graph().node)


@pytest.mark.parametrize("blocks, drawn", [(1, [0]), (2, [0, 1]), (None, [0, 1, 2]), (5, [0, 1, 2])])
def test_graph_draws_the_first_blocks_and_says_what_it_left_out(tmp_path, monkeypatch, blocks, drawn):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot`: the Graphviz source is the drawing, as text
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=8, dropout=0.1)).train()
    idx = torch.randint(11, (1, 8))
    source = render_autograd_graph(model, idx, idx, tmp_path / "graph.svg", blocks).read_text()
    assert [b for b in range(3) if f"transformer.h.{b}.attn.c_attn.weight" in source] == drawn
    assert "lm_head.weight" in source and "transformer.wte.weight" in source  # the whole way from the input
    said = {
        1: "through the first of 3 transformer blocks: blocks 1 to 2, the same graph, left out",
        2: "through the first 2 of 3 transformer blocks: block 2, the same graph, left out",
    }
    assert (said[blocks] in source) if blocks in said else "left out" not in source
    assert ("(all of them: blocks=null)" in source) == (blocks in said)
    assert model.training and model.config.n_layer == 3  # the model itself is as it was


def test_a_shortened_graph_is_drawn_with_the_models_own_weights():
    from minigpt.graph import first_blocks

    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=3, n_head=2, n_embd=8)).eval()
    rng = torch.get_rng_state()
    short = first_blocks(model, 1)
    assert torch.equal(rng, torch.get_rng_state())  # the copy's initialisation leaves the run's random numbers
    assert not short.training and short.config.n_layer == 1
    own = dict(model.named_parameters())
    for name, weight in short.named_parameters():
        assert torch.equal(weight, own[name]), name


@pytest.mark.parametrize("blocks", ["0", "1.0", "one", "true"])
def test_a_graph_of_no_blocks_is_refused_before_training(blocks, text_file, tmp_path):
    cfg = compose_train(TINY + [f"data.path={text_file}", f"callbacks.computation_graph.blocks={blocks}"], tmp_path)
    message = "blocks=0: it is how many transformer blocks" if blocks == "0" else "could not be converted to Integer"
    with pytest.raises(Exception, match=message):  # Hydra's InstantiationException wraps the callback's ValueError
        train.train(cfg)


def test_graph_without_graphviz_writes_the_source_and_how_to_render_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` anywhere
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8))
    idx = torch.randint(11, (1, 8))
    with caplog.at_level(logging.WARNING):
        written = render_autograd_graph(model, idx, idx, tmp_path / "graph.svg")
    assert [p.name for p in tmp_path.iterdir()] == ["graph.dot"] and written == tmp_path / "graph.dot"  # no .gv
    assert written.read_text().startswith("digraph") and "lm_head.weight" in written.read_text()
    assert f"dot -Tsvg {written} -o {tmp_path / 'graph.svg'}" in caplog.text


def test_loss_curve_and_hparams_at_the_end_of_the_run(events, trained_run):
    run_dir, metrics = trained_run
    assert_is_a_picture(decode_png((run_dir / "loss_curve.png").read_bytes()), min_width=600, min_height=300)
    best = min(e.value for e in events.Scalars("val/loss"))
    assert events.Scalars("val/loss_best")[-1].value == pytest.approx(best)
    assert metrics["val/loss_best"] == pytest.approx(best, abs=1e-4)  # the checkpoint callback agrees
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    ).session_start_info
    assert start.hparams["optimizer/lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["model/n_layer"].number_value == 2
    assert start.hparams["data/batch_size"].number_value == 8
    assert "vocab" not in start.hparams


def test_progress_bar_counts_optimizer_steps_not_epochs(text_file, tmp_path, capsys):
    cfg = compose_train(
        [o for o in TINY if o != "~callbacks.progress_bar"]
        + [f"data.path={text_file}", "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=none"]
        + ["trainer.log_every_n_steps=2"],
        run_dir=tmp_path,
    )
    train.train(cfg)
    out = capsys.readouterr().out
    assert "train: 100%" in out and " 4/4 " in out
    assert re.search(r"4/4 .*train/loss=\d\.\d+", out)  # the latest logged loss, read at the bar's refresh
    assert "Epoch" not in out  # a run is one endless epoch: Lightning's epoch bar would say nothing useful
    with open_dict(cfg):  # resumed part-way through its epoch, the bar still counts towards max_steps
        cfg.ckpt_path, cfg.trainer.max_steps, cfg.trainer.val_check_interval = str(tmp_path), 8, 8
    train.train(cfg)
    out = capsys.readouterr().out
    assert re.match(r"train: 100%\S* 8/8 ", out.rstrip().split("\r")[-1])  # the bar's last state: 8 of 8 steps


def test_a_graph_file_without_a_format_is_refused_before_training():
    from minigpt.callbacks.graph import ComputationGraph

    with pytest.raises(ValueError, match=r"callbacks.computation_graph.filename=graph: .* end the name in .svg"):
        ComputationGraph(filename="graph")


def test_sample_prompts_read_backslash_n_as_a_new_line():
    from minigpt.callbacks.samples import TextSamples

    samples = TextSamples(prompt="\\nROMEO:")  # as Hydra passes it on from callbacks.text_samples.prompt='\nROMEO:'
    assert samples.prompt == "\nROMEO:" and samples.tag == "samples/ROMEO"


def test_early_stopping_says_when_it_stopped_a_run_and_a_resume_takes_a_new_patience(cfg_tiny, run_log):
    with open_dict(cfg_tiny):
        cfg_tiny.trainer.update(max_steps=100, val_check_interval=10)
        cfg_tiny.callbacks.early_stopping.update(patience=1, min_delta=10.0)  # no validation can improve enough
    metrics = train.train(cfg_tiny)
    assert metrics["step"] == 20
    assert (
        "Stopped early at step 20 of 100: Monitored metric val/loss did not improve in the last 1 records"
        in run_log.text
    )

    stopping = EarlyStopping(monitor="val/loss", patience=5)
    stopping.load_state_dict({**EarlyStopping(monitor="val/loss", patience=1).state_dict(), "wait_count": 1})
    assert stopping.patience == 5 and stopping.wait_count == 1  # the count goes on, against the new patience
