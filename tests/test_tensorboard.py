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
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(trained_run[0]), "--port", str(port),
         "--host", "127.0.0.1", "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
