"""The real ImageNet-weights download path (timm → Hugging Face hub) against a local hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("safetensors")

SCRIPT = """
import json, sys, torch
from edgedx.errors import EdgeDxError
from edgedx.training import models
net = models.create_model("resnet10t", 2)
try:
    source = models.load_weights(net, "resnet10t", "imagenet")
except EdgeDxError as exc:
    print(json.dumps({"error": str(exc)})); sys.exit(0)
print(json.dumps({"source": source, "conv1": net.state_dict()["conv1.0.weight"].flatten()[:5].tolist()}))
"""


@pytest.fixture()
def local_hub(tmp_path: Path) -> Iterator[tuple[str, dict, list[str]]]:
    """A minimal hub: HEAD/GET .../resolve/main/model.safetensors with the headers the client checks."""
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("resnet10t")
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(weights))
    payload = weights.read_bytes()
    etag = hashlib.sha256(payload).hexdigest()
    files = {"/timm/resnet10t.c3_in1k/resolve/main/model.safetensors": payload}
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _head(self) -> bytes | None:
            seen.append(f"{self.command} {self.path}")
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            if body is not None:
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(body)))
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            return body

        def do_HEAD(self) -> None:
            self._head()

        def do_GET(self) -> None:
            body = self._head()
            if body is not None:
                self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", {"files": files, "donor": donor}, seen
    finally:
        server.shutdown()


def run_with_hub(endpoint: str, home: Path) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_imagenet_weights_download_from_the_hub(local_hub, tmp_path: Path) -> None:
    endpoint, hub, seen = local_hub
    result = run_with_hub(endpoint, tmp_path / "hf home")
    assert result["source"] == "imagenet:timm:resnet10t"
    expected = hub["donor"].state_dict()["conv1.0.weight"].flatten()[:5].tolist()
    assert result["conv1"] == pytest.approx(expected)
    assert any(s.startswith("GET /timm/resnet10t") for s in seen)


def test_missing_hub_weights_are_one_clear_error(local_hub, tmp_path: Path) -> None:
    endpoint, hub, seen = local_hub
    hub["files"].clear()  # the hub answers 404
    result = run_with_hub(endpoint, tmp_path / "hf home")
    assert "could not get ImageNet weights for resnet10t" in result["error"]
    assert "--weights none" in result["error"]
