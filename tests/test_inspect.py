"""python -m minigpt.inspect: gradient table, attention maps and graph for a checkpoint."""

from __future__ import annotations

import math
import shutil

import pytest
from hydra import compose, initialize_config_dir

from minigpt.inspect import inspect
from tests.helpers import CONF, assert_is_a_picture, decode_png, run_python


def compose_inspect(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="inspect", overrides=overrides)


@pytest.fixture
def inspect_cfg(trained_run, text_file, tmp_path):
    return lambda *overrides: compose_inspect(
        [f"ckpt_path={trained_run[0]}", f"data.path={text_file}", f"out_dir={tmp_path}", *overrides]
    )


@pytest.fixture
def inspect_command(trained_run, text_file, tmp_path):
    """python -m minigpt.inspect with the settings of inspect_cfg, in a process of its own."""
    settings = [f"ckpt_path={trained_run[0]}", f"data.path={text_file}", f"out_dir={tmp_path}"]
    return lambda *overrides: run_python("-m", "minigpt.inspect", *settings, *overrides)


def test_gradient_table_has_every_parameter(inspect_cfg, capsys, trained_run):
    from minigpt.module import MiniGPTModule

    (chart,) = inspect(inspect_cfg("what=grads"))
    table = capsys.readouterr().out.splitlines()
    names = [
        n
        for n, _ in MiniGPTModule.from_checkpoint(trained_run[0] / "checkpoints" / "last.ckpt").model.named_parameters()
    ]
    rows = {line.split()[0]: line.split() for line in table[3:]}
    assert list(rows) == names
    for name, row in rows.items():
        mean_abs, std = float(row[-2]), float(row[-1])
        assert 0 < mean_abs < 10 and math.isfinite(std), (name, row)
    assert table[0].startswith("loss ") and "8 windows of 16 tokens" in table[0]
    assert_is_a_picture(decode_png(chart.read_bytes()))


def test_attention_maps_of_a_given_text(inspect_cfg):
    written = inspect(inspect_cfg("what=attention", "text='ROMEO: the king'"))
    assert [p.name for p in written] == ["attention_layer0.png", "attention_layer1.png"]
    for path in written:
        assert_is_a_picture(decode_png(path.read_bytes()))


def test_a_text_longer_than_the_context_is_cut_and_said_so(inspect_cfg, caplog):
    with caplog.at_level("WARNING"):
        written = inspect(inspect_cfg("what=attention", "text='ROMEO: the king and queen'"))  # 25 characters
    assert len(written) == 2 and "text is 25 tokens long, and the model's context is 16" in caplog.text


def test_graph_of_a_checkpoint(inspect_cfg, tmp_path):
    (graph,) = inspect(inspect_cfg("what=graph", "graph_file=loss.svg"))
    drawn = shutil.which("dot") is not None  # without Graphviz, its source instead of the picture
    assert graph == tmp_path / ("loss.svg" if drawn else "loss.dot") and "transformer.wte.weight" in graph.read_text()
    assert [p.name for p in tmp_path.iterdir()] == [graph.name]  # no .gv source left beside it


def test_unknown_inspection_and_foreign_text_are_refused(inspect_cfg):
    with pytest.raises(ValueError, match="grads, attention, graph"):
        inspect(inspect_cfg("what=weights"))
    with pytest.raises(ValueError, match="cannot be encoded"):
        inspect(inspect_cfg("what=attention", "text='ROMEO#'"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["what=attention", "length=0"], "length must be a whole number of at least 2 tokens, got 0"),
        (["what=graph", "length=1"], "length must be a whole number of at least 2 tokens, got 1"),
        (
            ["what=graph", "graph_file=graph"],
            "graph_file=graph: the suffix picks the picture's format, and there is none",
        ),
        (["what=graph", "graph_file=g.xyz"], "'xyz' is not one Graphviz draws"),
        (["what=graph", "graph_blocks=0"], "graph_blocks=0: it is how many transformer blocks the graph draws"),
    ],
)
def test_bad_settings_are_named(inspect_cfg, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        inspect(inspect_cfg(*overrides))
    assert not any(tmp_path.iterdir())  # nothing drawn


def test_a_text_of_backslash_n_looks_at_a_new_line(inspect_cfg):
    written = inspect(inspect_cfg("what=attention", "text=\\nROMEO"))  # Hydra passes on a backslash and an n
    assert len(written) == 2


def test_the_data_hint_offers_text_only_where_text_is_used(trained_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("0123456789 " * 50)
    for what, offers_text in (("grads", False), ("attention", True)):
        cfg = compose_inspect(
            [f"ckpt_path={trained_run[0]}", f"data.path={other}", f"out_dir={tmp_path / 'out'}", f"what={what}"]
        )
        with pytest.raises(ValueError, match="not the checkpoint's") as err:
            inspect(cfg)
        assert ("text=" in str(err.value)) == offers_text


def test_a_run_folder_gives_the_data_it_was_trained_on(trained_run, cfg_tiny_global, text_file, tmp_path):
    """A run on its own text: inspect reads that text, with the run's seed, from the run's recorded config, a
    relative data.path from where the run was started, without data settings on its own command line."""
    import shutil

    from omegaconf import OmegaConf, open_dict

    from minigpt.inspect import recorded_data, sets_data, validation_data
    from minigpt.module import MiniGPTModule

    run, started_in = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(trained_run[0] / "checkpoints", run / "checkpoints")
    started_in.mkdir()
    shutil.copy(text_file, started_in / "input.txt")
    recorded = cfg_tiny_global.copy()
    with open_dict(recorded):
        recorded.data.path, recorded.seed = "input.txt", 7  # as typed, in the folder the run started from
    (run / ".hydra").mkdir()
    OmegaConf.save(recorded, run / ".hydra" / "config.yaml")  # as Hydra records it: interpolations kept
    OmegaConf.save({"hydra": {"runtime": {"cwd": str(started_in)}}}, run / ".hydra" / "hydra.yaml")
    other = tmp_path / "other.txt"
    other.write_text("0123456789 " * 50)
    cfg = compose_inspect([f"ckpt_path={run}", f"data.path={other}", "what=grads", f"out_dir={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match="not the checkpoint's"):
        inspect(cfg, data_from_run=False)  # data set on the command line: that text, which is not the run's
    (chart,) = inspect(cfg, data_from_run=True)
    assert chart.is_file()
    data = recorded_data(run / ".hydra")
    assert (data.path, data.seed) == (str(started_in / "input.txt"), 7)
    with open_dict(cfg):
        cfg.data = data
    module = MiniGPTModule.from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert validation_data(cfg, module).hparams.seed == 7  # the run's validation windows, not inspect's seed's
    assert sets_data(["data.path=x.txt"]) and sets_data(["data=text"]) and sets_data(["+data.glob=*"])
    assert not sets_data(["what=grads", "ckpt_path=outputs/data", "dataset=x"])


@pytest.mark.slow
def test_inspect_command_line(inspect_command, tmp_path):
    out = inspect_command("what=grads")
    assert "mean |grad|" in out.stdout and f"wrote {tmp_path / 'gradient_flow.png'}" in out.stdout


def printed_value(lines: list[str], label: str) -> float:
    """The number after `label` on the first printed line that starts with it."""
    line = next(line.strip() for line in lines if line.strip().startswith(label))
    return float(line.removeprefix(label).split()[0])


@pytest.mark.parametrize("x", [2.0, -1.5])
def test_autograd_prints_the_derivative_and_draws_the_graph_without_a_checkpoint(x, capsys, tmp_path):
    (picture,) = inspect(compose_inspect(["what=autograd", f"x={x}", f"out_dir={tmp_path}"]))
    lines = capsys.readouterr().out.splitlines()
    assert printed_value(lines, "y = x**2 + 3*x + 1 =") == x**2 + 3 * x + 1
    assert printed_value(lines, "y.backward() leaves dy/dx in x.grad =") == 2 * x + 3  # 7 at the lesson's x = 2
    assert [line.split()[0] for line in lines if line.startswith("  ")] == [
        "AddBackward0",  # ... + 1
        "AddBackward0",  # x**2 + 3*x
        "PowBackward0",
        "AccumulateGrad",  # into x.grad
        "MulBackward0",
        "AccumulateGrad",
    ]
    # autograd.svg, or its Graphviz source where `dot` is missing: either names the operations of y
    assert picture.parent == tmp_path and picture.stem == "autograd"
    assert "PowBackward0" in picture.read_text() and "MulBackward0" in picture.read_text()


def assert_one_gradient_descent_step(lines: list[str], lr: float) -> None:
    w, grad = printed_value(lines, "w "), printed_value(lines, "grad = dloss/dw")
    assert printed_value(lines, "lr") == lr and grad != 0
    assert printed_value(lines, "w after optimizer.step()") == pytest.approx(w - lr * grad, rel=1e-5, abs=1e-9)
    assert printed_value(lines, "loss after the step") < printed_value(lines, "loss before the step")


def test_one_step_of_a_fresh_model_is_w_minus_lr_times_grad(text_file, capsys, tmp_path):
    cfg = compose_inspect(["what=step", "model=tiny", f"data.path={text_file}", f"out_dir={tmp_path}"])
    assert inspect(cfg) == []  # numbers only, no picture
    lines = capsys.readouterr().out.splitlines()
    assert "freshly initialised" in lines[0] and "8 validation windows of 16 tokens" in lines[1]
    assert_one_gradient_descent_step(lines, 0.1)
    inspect(cfg)
    assert capsys.readouterr().out.splitlines() == lines  # seeded: the same weights and numbers every time


def test_one_step_of_a_checkpoint_on_a_parameter_of_a_block(inspect_cfg, capsys):
    inspect(inspect_cfg("what=step", "step_lr=0.03", "step_parameter=transformer.h.0.attn.c_attn.weight"))
    lines = capsys.readouterr().out.splitlines()
    assert "the checkpoint" in lines[0] and "transformer.h.0.attn.c_attn.weight[" in lines[4]
    assert_one_gradient_descent_step(lines, 0.03)


def test_the_step_refuses_a_bad_rate_or_an_unknown_parameter(inspect_cfg):
    with pytest.raises(ValueError, match="step_lr is the learning rate of the step: a positive number, got 0"):
        inspect(inspect_cfg("what=step", "step_lr=0"))
    with pytest.raises(ValueError, match="step_parameter=head.weight is not a parameter of the model: .*lm_head"):
        inspect(inspect_cfg("what=step", "step_parameter=head.weight"))


def test_the_step_check_catches_an_update_that_is_not_w_minus_lr_times_grad(monkeypatch):
    import torch

    from minigpt import inspect as inspect_module
    from minigpt.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8))
    x = torch.randint(11, (2, 8))
    assert "checked: every one" in inspect_module.gradient_descent_step(model, x, x, 0.1, "lm_head.weight", "a model")

    def decaying(model, settings, device):  # w - lr * (grad + 0.5 w): another rule
        return torch.optim.SGD(model.parameters(), settings["lr"], weight_decay=0.5)

    monkeypatch.setattr(inspect_module, "make_optimizer", decaying)
    with pytest.raises(RuntimeError, match=r"optimizer.step\(\) moved a weight .* away from w - lr \* grad"):
        inspect_module.gradient_descent_step(model, x, x, 0.1, "lm_head.weight", "a model")


@pytest.mark.slow
def test_autograd_from_the_command_line_needs_no_checkpoint(tmp_path):
    out = run_python("-m", "minigpt.inspect", "what=autograd", f"out_dir={tmp_path}")
    assert "x.grad = 7.0" in out.stdout and "by hand, dy/dx = 2x + 3 = 7.0" in out.stdout


@pytest.mark.slow
def test_warnings_reach_the_command_line(inspect_command):
    out = inspect_command("what=attention", "text='ROMEO: the king and queen'")
    assert "text is 25 tokens long, and the model's context is 16" in out.stderr  # not swallowed by Hydra's logging
