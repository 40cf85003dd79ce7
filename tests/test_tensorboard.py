"""A real TensorBoard server over a run folder serves what the run logged."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.mark.slow
def test_tensorboard_serves_scalars_images_and_text(trained_run):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(trained_run[0]),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline, scalars = time.monotonic() + 90, {}
        while time.monotonic() < deadline and "val/loss" not in scalars:
            assert server.poll() is None, server.stderr.read()
            try:
                scalars = get_json(f"{base}/scalars/tags").get("tensorboard", {})
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert {"train/loss", "val/loss", "train/lr/decay", "grad/norm_total"} <= set(scalars)
        assert any(t.startswith("grad/norm/transformer.h.0.") for t in scalars)  # per-parameter
        assert any(t.startswith("grad/layer/h.0.") for t in scalars)  # per-layer
        images = get_json(f"{base}/images/tags")["tensorboard"]
        assert {"grad/flow", "attention/layer_0", "attention/layer_1"} <= set(images)
        assert all(images[tag]["samples"] == 1 for tag in ("grad/flow", "attention/layer_0"))
        text = get_json(f"{base}/text/tags")["tensorboard"]
        assert "samples/ROMEO/text_summary" in text  # torch's add_text files text under <tag>/text_summary
        points = get_json(f"{base}/scalars/scalars?run=tensorboard&tag=val/loss")
        assert len(points) == 2 and points[-1][2] < points[0][2]  # [wall_time, step, value]: the loss fell
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def test_a_resumed_csv_log_keeps_the_rows_before_the_checkpoint_and_drops_one_cut_short(tmp_path):
    from minigpt.loggers import CSVLogger, count_steps_done

    folder = tmp_path / "csv"
    folder.mkdir()
    # killed while writing the row of step 30 (its checkpoint was saved), after writing one of step 40 (not saved)
    for rows, kept in [
        ("10,2.5,\n20,2.4,2.6\n30,2.", ["10,2.5,", "20,2.4,2.6"]),
        ("10,2.5,\n20,2.4,2.6\n30,2.3,\n40,2.2,\n", ["10,2.5,", "20,2.4,2.6", "30,2.3,"]),
    ]:
        (folder / "metrics.csv").write_text("step,train/loss,val/loss\n" + rows)
        logger = count_steps_done(CSVLogger(save_dir=str(tmp_path), name="csv", version="", purge_step=31))
        logger.log_metrics({"train/loss": 2.1}, step=30)  # Lightning's count: written at step 31
        logger.save()
        assert (folder / "metrics.csv").read_text().splitlines() == ["step,train/loss,val/loss", *kept, "31,2.1,"]
    assert not list(folder.glob(".*"))  # nothing left aside
