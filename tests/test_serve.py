"""openpi's websocket protocol out: `python -m pipelines.serve` as a subprocess, talked to with the unmodified
`openpi-client` package, answers as `Policy.infer` does, refuses bad and malicious messages by name and keeps
serving; `ki_model.serving`'s decoding refuses every unsafe array before numpy sees it."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from ki_data.manifest import Manifest
from ki_model import Policy
from ki_model.serving import RequestError, pack, unpack_request

# openpi-client 0.1.2 opens its connection without a context manager, which websockets 17 deprecates (it still works;
# pyproject keeps websockets below 18).
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SEED = 5
STARTUP_S = 600


class Server:
    """`python -m pipelines.serve` on a port the OS picks; its output is drained on a thread (a full pipe would
    block it) and kept for failure messages."""

    def __init__(self, checkpoint: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", "--checkpoint", str(checkpoint), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env=dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu"),
        )
        self.lines: list[str] = []
        found: queue.Queue = queue.Queue()

        def drain():
            for line in self.proc.stdout:
                self.lines.append(line)
                if m := re.match(r"listening on ws://(\S+):(\d+)", line):
                    found.put((m.group(1), int(m.group(2))))
            found.put(None)

        threading.Thread(target=drain, daemon=True).start()
        got = found.get(timeout=STARTUP_S)
        assert got is not None, "server exited:\n" + "".join(self.lines[-40:])
        self.host, self.port = got

    def client(self) -> WebsocketClientPolicy:
        return WebsocketClientPolicy(self.host, self.port)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained_checkpoint):
    s = Server(trained_checkpoint, "--seed", str(SEED))
    yield s
    s.close()


@pytest.fixture(scope="module")
def frames(demo_shards) -> list[dict]:
    """Frames of the real LeRobot demo dataset as LeRobotDataset returns them (CHW float images), as numpy."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    m = Manifest.load(demo_shards)
    ds = LeRobotDataset(m.source["repo_id"], root=m.source["root"], video_backend="pyav")
    out = []
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        out.append({k: (v if isinstance(v, str) else v.numpy()) for k, v in item.items()
                    if k.startswith("observation.") or k == "task"})
    return out


def as_openpi(frame: dict) -> dict:
    """As openpi's clients send it: `prompt` for the task, HWC uint8 images."""
    out = {k: v for k, v in frame.items() if k != "task"}
    out["prompt"] = frame["task"]
    for k, v in frame.items():
        if k.startswith("observation.image"):
            out[k] = np.rint(v.transpose(1, 2, 0) * 255).astype(np.uint8)
    return out


def test_serves_policy_infer_refuses_bad_requests_and_keeps_serving(server, trained_checkpoint, frames):
    local = Policy.load(trained_checkpoint, seed=SEED)
    client = server.client()
    meta = client.get_server_metadata()
    m = local.manifest
    assert meta["camera_keys"] == ["observation.image"] and meta["state_key"] == "observation.state"
    assert (meta["state_dim"], meta["action_dim"], meta["action_horizon"]) == (
        m.state_dim, m.action_dim, local.config.action_horizon)
    assert server.host == "127.0.0.1"

    # The first answer is Policy.load(DIR, seed=S).infer(frame).
    first = client.infer(frames[0])
    expected = local.infer(frames[0])
    assert first["actions"].dtype == np.float32 and first["actions"].shape == (meta["action_horizon"], m.action_dim)
    np.testing.assert_array_equal(first["actions"], expected.astype(np.float32))
    assert first["server_timing"]["infer_ms"] > 0 and "prev_total_ms" not in first["server_timing"]

    # Bad requests: an error answer naming the key, and the connection goes on.
    good = frames[1]
    bad = {
        "observation.image": {k: v for k, v in good.items() if k != "observation.image"},
        "observation.state": {**good, "observation.state": np.zeros(5, np.float32)},
        "'observation.image'": {**good, "observation.image": good["observation.image"].astype(np.int64)},
        "'task'": {**good, "task": np.zeros(2)},
        "task": {k: v for k, v in good.items() if k != "task"},
    }
    for key, request in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(key)):
            client.infer(request)

    # Then a good one, as openpi's clients send it (prompt, HWC uint8): the policy's next draw.
    second = client.infer(as_openpi(good))
    np.testing.assert_array_equal(second["actions"], local.infer(good).astype(np.float32))
    assert second["server_timing"]["prev_total_ms"] > 0


def test_malicious_messages_are_refused_unread_and_the_server_goes_on(server, frames):
    other = server.client()  # another client, connected throughout
    object_array = {"observation.image": {b"__ndarray__": True, b"data": (0x41).to_bytes(8, "little") * 4,
                                          b"dtype": "|O", b"shape": [4]},
                    "observation.state": [0.0, 0.0], "task": "push"}
    crafted = {  # message -> what the error answer says
        msgpack.packb(object_array): "dtype '|O' refused",
        b"\xc1\xc1 not msgpack at all": "not a msgpack message",
        msgpack.packb({"task": msgpack.ExtType(42, b"\x00" * 16)}): "ext type 42 refused",
        msgpack.packb({"observation.state": {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4",
                                             b"shape": [2]}}): "needs 8 bytes, got 3",
    }
    with websockets.sync.client.connect(f"ws://{server.host}:{server.port}", compression=None) as ws:
        assert msgpack_numpy.unpackb(ws.recv())["state_dim"] == 2  # the metadata
        for message, error in crafted.items():
            ws.send(message)
            reply = ws.recv()
            assert isinstance(reply, str) and reply.startswith("error:") and error in reply, reply
        ws.send(msgpack_numpy.packb(frames[2]))  # the same connection still answers a good request
        answer = msgpack_numpy.unpackb(ws.recv())
        assert answer["actions"].shape == (10, 2)
    assert other.infer(frames[2])["actions"].shape == (10, 2)
    with urllib.request.urlopen(f"http://{server.host}:{server.port}/healthz", timeout=30) as r:
        assert r.status == 200 and r.read() == b"OK\n"
    assert server.proc.poll() is None


# ---------------------------------------------------------------------------------------------------------------
# The decoding itself (no server)


def array_map(dtype: str, data: bytes, shape: list) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def test_unpack_request_reads_what_openpi_client_sends():
    obs = {"observation.state": np.arange(3, dtype=np.float32), "mask": np.array([True, False]),
           "img": np.arange(24, dtype=np.uint8).reshape(2, 4, 3), "n": np.int64(7), "prompt": "pick", "k": [1, 2]}
    got = unpack_request(msgpack_numpy.packb(obs))
    assert got.keys() == obs.keys() and got["prompt"] == "pick" and got["k"] == [1, 2]
    for k in ("observation.state", "mask", "img"):
        assert got[k].dtype == obs[k].dtype and np.array_equal(got[k], obs[k])
    assert got["n"] == 7 and got["n"].dtype == np.int64
    # And what the server sends, openpi's client reads.
    back = msgpack_numpy.unpackb(pack({"actions": np.ones((2, 3), np.float32), "t": {"ms": 1.5}}))
    assert back["actions"].dtype == np.float32 and np.array_equal(back["actions"], np.ones((2, 3))) and back["t"]["ms"] == 1.5


@pytest.mark.parametrize(
    "message, error",
    [
        (msgpack.packb({"x": array_map("|O", b"\x41" * 8, [1])}), "dtype '|O' refused"),
        (msgpack.packb({"x": array_map("<V8", b"\x00" * 8, [1])}), "dtype '<V8' refused"),
        (msgpack.packb({"x": array_map("<c8", b"\x00" * 8, [1])}), "dtype '<c8' refused"),
        (msgpack.packb({"x": array_map("(2,)f8", b"\x00" * 16, [1])}), r"dtype '\(2,\)f8' refused"),
        (msgpack.packb({"x": array_map("<f4", b"\x00" * 8, [3])}), "needs 12 bytes, got 8"),
        (msgpack.packb({"x": array_map("<f4", b"\x00" * 8, [-2, -1])}), "not a list"),
        (msgpack.packb({"x": array_map("<f4", "text", [1])}), "data must be msgpack bin"),
        (msgpack.packb({"x": {b"__npgeneric__": True, b"data": b"\x00" * 8, b"dtype": "|O"}}), "dtype '|O' refused"),
        (msgpack.packb({"x": msgpack.ExtType(1, b"abc")}), "ext type 1 refused"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (b"\xc1", "not a msgpack message"),
        (msgpack.packb({"a": 1}) + b"\x00", "not a msgpack message"),
        (b"\x91" * 100_000 + b"\x00", "not a msgpack message"),  # nested past msgpack's stack
        ("a text frame", "text frame refused"),
    ],
    ids=["object", "void", "complex", "subarray", "short", "negative-shape", "str-data", "object-scalar", "ext",
         "list", "not-msgpack", "trailing", "deep", "text"],
)
def test_unpack_request_refuses_unsafe_messages(message, error):
    with pytest.raises(RequestError, match=error):
        unpack_request(message)


def test_serving_imports_no_training_code():
    """The server is the inference path too (docs/DESIGN.md §2): no optimizer, loader or checkpoint manager."""
    code = ("import json, sys; import flax.nnx; base = set(sys.modules); import ki_model.serving; "
            "print(json.dumps(sorted(set(sys.modules) - base)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    heavy = {"optax", "grain", "orbax.checkpoint", "ki_model.train", "ki_model.optimizer", "ki_data.loader", "torch",
             "lerobot", "openpi_client"}
    assert "ki_model.serving" in loaded and "websockets" in loaded and not heavy & loaded, sorted(heavy & loaded)
