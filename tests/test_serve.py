"""openpi's websocket protocol out: `python -m pipelines.serve` as a subprocess, talked to with the unmodified
`openpi-client` package, answers as `Policy.infer` does, refuses bad and malicious messages by name and keeps
serving; `ki_model.serving`'s decoding refuses every unsafe array before numpy sees it. With an API key it lets in
only openpi clients made with `api_key=` that key, refuses the others at the handshake, and never logs the key."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import numpy as np
import pytest
import websockets.exceptions
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.datastructures import Headers
from websockets.http11 import Request

from ki_data.manifest import Manifest
from ki_model import Policy
from ki_model.serving import (
    ApiKeyError,
    RequestError,
    authorization_problem,
    check_api_key,
    exposure_warning,
    pack,
    read_api_key_file,
    rtc_from_request,
    unpack_request,
)
from pipelines import serve as serve_cli

# openpi-client 0.1.2 opens its connection without a context manager, which websockets 17 deprecates (it still works;
# pyproject keeps websockets below 18).
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SEED = 5
STARTUP_S = 600


class Server:
    """`python -m pipelines.serve` on a port the OS picks; its output is drained on a thread (a full pipe would
    block it) and kept for failure messages."""

    def __init__(self, checkpoint: Path, *args: str, env: dict[str, str] | None = None):
        inherited = {k: v for k, v in os.environ.items() if k != serve_cli.API_KEY_ENV}  # only the keys a test gives
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", "--checkpoint", str(checkpoint), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env=inherited | {"HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"} | (env or {}),
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

    def client(self, api_key: str | None = None) -> WebsocketClientPolicy:
        return WebsocketClientPolicy(self.host, self.port, api_key=api_key)

    def log_once(self, complete: Callable[[str], bool], wait_s: float = 60) -> str:
        """The server's output so far, once `complete(output)` holds (its lines arrive on a thread) or after
        `wait_s`; the caller asserts on what it holds."""
        deadline = time.monotonic() + wait_s
        while not complete(log := "".join(self.lines)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return log

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
    assert meta["flow_samples"] == 1  # one sample per chunk, as openpi serves
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


def test_real_time_chunking_keys_guide_the_answer_and_bad_ones_are_named(server, frames):
    """openpi's request dict with `previous_chunk` and `delay`: the answer begins on the previous chunk (within 30 px,
    a tenth of the pusht action range; test_rtc.py explains the tolerance), a plain answer does not; absent keys are
    plain sampling (the test above), bad ones an error naming the key, and the connection goes on."""
    client = server.client()
    assert client.get_server_metadata()["rtc_keys"] == ["previous_chunk", "delay", "execution_horizon"]
    first = client.infer(frames[0])["actions"]
    previous = first[4:]  # the first chunk executed for 4 steps: 6 actions left, the next one first
    guided = client.infer({**frames[1], "previous_chunk": previous, "delay": 2})["actions"]
    plain = client.infer(frames[1])["actions"]
    miss = lambda a: float(np.abs(a[:2] - previous[:2]).mean())  # noqa: E731 - pixels
    assert guided.shape == (10, 2) and miss(guided) < 30.0 and miss(guided) < miss(plain) / 3, (miss(guided),
                                                                                                 miss(plain))
    bad = {
        "'previous_chunk' must be [k, 2]": {**frames[1], "previous_chunk": np.zeros((4, 3), np.float32)},
        "'previous_chunk' must be an array of numbers": {**frames[1], "previous_chunk": "left"},
        "'delay' must be an integer": {**frames[1], "previous_chunk": previous, "delay": 1.5},
        "'delay' must be in [0, 6]": {**frames[1], "previous_chunk": previous, "delay": 7},
        "'execution_horizon' must be in [0, 10]": {**frames[1], "previous_chunk": previous, "execution_horizon": -1},
        "previous_chunk must be finite": {**frames[1], "previous_chunk": np.full((3, 2), np.inf, np.float32)},
    }
    for error, request in bad.items():
        with pytest.raises(RuntimeError, match=re.escape(error)):
            client.infer(request)
    assert client.infer({**frames[2], "previous_chunk": previous})["actions"].shape == (10, 2)


def test_rtc_from_request_reads_the_optional_keys():
    meta = {"action_dim": 2, "action_horizon": 10}
    chunk = np.ones((3, 2), np.float64)
    assert rtc_from_request({"delay": 2}, meta) == {}  # no previous chunk: plain sampling
    got = rtc_from_request({"previous_chunk": chunk, "delay": np.int64(2), "execution_horizon": 5}, meta)
    assert got["delay"] == 2 and got["execution_horizon"] == 5 and got["previous_chunk"].dtype == np.float32
    assert rtc_from_request({"previous_chunk": chunk}, meta)["delay"] == 0
    with pytest.raises(RequestError, match="'previous_chunk' must be"):
        rtc_from_request({"previous_chunk": np.ones((11, 2))}, meta)
    with pytest.raises(RequestError, match="'delay' must be an integer, got bool"):
        rtc_from_request({"previous_chunk": chunk, "delay": True}, meta)


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
# The API key

KEY = secrets.token_urlsafe(24)
DECOY = secrets.token_urlsafe(24)  # in $KI_API_KEY, which --api-key-file overrides


@pytest.fixture(scope="module")
def keyed_server(trained_checkpoint, tmp_path_factory):
    """Served with --api-key-file (KEY) while $KI_API_KEY holds DECOY; at DEBUG, where websockets logs each
    handshake's headers; each chunk the mean of 3 samples."""
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(KEY + "\n")
    s = Server(trained_checkpoint, "--api-key-file", str(key_file), "--log-level", "DEBUG", "--flow-samples", "3",
               env={serve_cli.API_KEY_ENV: DECOY})
    yield s
    s.close()


def handshake_status(server: Server, headers: list[tuple[str, str]]) -> int:
    """The HTTP status a websocket handshake with `headers` is answered with, when it is refused."""
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        websockets.sync.client.connect(f"ws://{server.host}:{server.port}", additional_headers=headers,
                                       compression=None, open_timeout=60)
    return refused.value.response.status_code


def test_keyed_server_lets_in_only_openpi_clients_with_the_key(keyed_server, frames):
    robot = keyed_server.client(api_key=KEY)  # connected throughout
    assert robot.get_server_metadata()["state_dim"] == 2 and robot.get_server_metadata()["flow_samples"] == 3
    assert robot.infer(frames[0])["actions"].shape == (10, 2)

    # openpi-client without a key, with a wrong one, with $KI_API_KEY's (the file wins), with near misses: the
    # handshake is answered 401, so the client never gets a connection to send on.
    for api_key in (None, "wrong", DECOY, KEY + "x", KEY[:-1]):
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            keyed_server.client(api_key=api_key)
        assert refused.value.response.status_code == 401, api_key
        assert refused.value.response.headers["WWW-Authenticate"] == "Api-Key"
    # The right key in the wrong shape is refused too; the scheme's case is free (RFC 9110 §11.1).
    assert handshake_status(keyed_server, [("Authorization", f"Bearer {KEY}")]) == 401
    assert handshake_status(keyed_server, [("Authorization", KEY)]) == 401
    assert handshake_status(keyed_server, [("Authorization", f"Api-Key {KEY}")] * 2) == 401
    with websockets.sync.client.connect(f"ws://{keyed_server.host}:{keyed_server.port}", compression=None,
                                        additional_headers=[("Authorization", f"api-key  {KEY}")]) as ws:
        assert msgpack_numpy.unpackb(ws.recv())["state_dim"] == 2

    # Eight strangers at once while the robot is served, then a robot that connects afterwards.
    with ThreadPoolExecutor(8) as pool:
        strangers = [pool.submit(handshake_status, keyed_server, [("Authorization", f"Api-Key guess{i}")])
                     for i in range(8)]
        answer = robot.infer(frames[1])
        assert [f.result(timeout=120) for f in strangers] == [401] * 8
    assert answer["actions"].shape == (10, 2)
    assert keyed_server.client(api_key=KEY).infer(frames[2])["actions"].shape == (10, 2)
    with urllib.request.urlopen(f"http://{keyed_server.host}:{keyed_server.port}/healthz", timeout=30) as r:
        assert r.status == 200  # health probes carry no key; the answer reveals nothing
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"http://{keyed_server.host}:{keyed_server.port}/", timeout=30)
    assert keyed_server.proc.poll() is None

    # The log: each refusal with the peer and its reason; websockets' DEBUG header dump ran, the key hidden in it;
    # neither the key, nor $KI_API_KEY's, nor a near miss anywhere.
    reasons = ["no Authorization header", "wrong API key", "the Authorization header is not 'Api-Key <key>'",
               "2 Authorization headers"]
    refusals = 5 + 3 + 8 + 1
    log = keyed_server.log_once(lambda log: log.count("refused a connection") >= refusals)
    assert "(API key required)" in log and "(KI_API_KEY is set too and ignored)" in log
    for reason in reasons:
        assert re.search(rf"WARNING ki_model.serving: refused a connection from 127\.0\.0\.1:\d+: {re.escape(reason)}",
                         log), reason
    assert log.count("refused a connection") == refusals
    assert "Authorization: [hidden]" in log
    for secret in (KEY, DECOY, KEY[:-1], "guess0"):
        assert secret not in log


def test_a_server_without_a_key_still_lets_in_clients_that_send_one(server, frames):
    """A client configured with a key keeps working against a loopback server that needs none."""
    assert server.client(api_key="unused").infer(frames[0])["actions"].shape == (10, 2)


@pytest.mark.parametrize(
    "content, error",
    [(None, "No such file or directory"), ("", "is empty"), ("\n \n", "is empty"),
     ("two\nlines\n", "one API key of printable ASCII"), ("with space", "one API key of printable ASCII"),
     ("clé".encode(), "is not ASCII text"), ("dir", "Is a directory")],
    ids=["missing", "empty", "blank", "two-lines", "space", "not-ascii", "directory"],
)
def test_an_unusable_key_file_is_one_clear_error_and_nothing_starts(tmp_path, monkeypatch, capsys, content, error):
    key_file = tmp_path / "api_key"
    if content == "dir":
        key_file.mkdir()
    elif isinstance(content, bytes):
        key_file.write_bytes(content)
    elif content is not None:
        key_file.write_text(content)
    monkeypatch.delenv(serve_cli.API_KEY_ENV, raising=False)
    # The checkpoint does not exist either: an error about the key file (not the checkpoint) shows that the key is
    # settled before anything loads.
    code = serve_cli.main(["--checkpoint", str(tmp_path / "no_checkpoint"), "--port", "0",
                           "--api-key-file", str(key_file)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and repr(str(key_file)) in err and error in err, err


def test_flow_samples_below_one_is_one_clear_error_and_nothing_serves(trained_checkpoint, capsys):
    code = serve_cli.main(["--checkpoint", str(trained_checkpoint), "--port", "0", "--flow-samples", "0"])
    out, err = capsys.readouterr()
    assert code == 2 and "listening" not in out
    assert err == "error: flow_samples must be an integer of at least 1, got 0\n", err


def test_an_empty_key_variable_is_an_error_and_the_key_file_wins_over_it(tmp_path):
    key_file = tmp_path / "api_key"
    key_file.write_text(f"  {KEY}\n")
    assert serve_cli.api_key_from(str(key_file), {"KI_API_KEY": DECOY}) == (KEY, f"the file {str(key_file)!r}")
    assert serve_cli.api_key_from(None, {"KI_API_KEY": DECOY}) == (DECOY, "$KI_API_KEY")
    assert serve_cli.api_key_from(None, {}) == (None, None)
    with pytest.raises(ApiKeyError, match="the environment variable KI_API_KEY is empty"):
        serve_cli.api_key_from(None, {"KI_API_KEY": ""})
    assert read_api_key_file(key_file) == KEY == check_api_key(f"{KEY}\r\n", "x")


def test_binding_beyond_loopback_without_a_key_prints_a_warning(tmp_path, monkeypatch, capsys):
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "LocalHost", "::1"):
        assert exposure_warning(host, 8000, None) is None, host
    for host in ("0.0.0.0", "::", "", "192.168.1.20", "robot-lab.local"):
        assert "without an API key" in exposure_warning(host, 8000, None), host
        assert exposure_warning(host, 8000, KEY) is None

    # The CLI prints it before loading the model (here a checkpoint that does not exist: nothing is bound).
    monkeypatch.delenv(serve_cli.API_KEY_ENV, raising=False)
    args = ["--checkpoint", str(tmp_path / "no_checkpoint"), "--host", "0.0.0.0", "--port", "8123"]
    assert serve_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("warning: serving on every interface without an API key: anyone who can reach port 8123 "
                          "can drive the robot."), err
    monkeypatch.setenv(serve_cli.API_KEY_ENV, KEY)
    assert serve_cli.main(args) == 2
    out, err = capsys.readouterr()
    assert "warning" not in err and "clients must send the API key from $KI_API_KEY" in out and KEY not in out + err


@pytest.mark.parametrize(
    "headers, problem",
    [([], "no Authorization header"), ([("Authorization", f"Api-Key {KEY}")], None),
     ([("authorization", f"API-KEY {KEY} ")], None), ([("Authorization", f"Api-Key {KEY}x")], "wrong API key"),
     ([("Authorization", "Api-Key ")], "wrong API key"), ([("Authorization", f"Basic {KEY}")], "is not 'Api-Key"),
     ([("Authorization", f"Api-Key {KEY}"), ("Authorization", "Api-Key x")], "2 Authorization headers")],
    ids=["none", "right", "case-and-spaces", "longer", "blank-key", "other-scheme", "two-headers"],
)
def test_authorization_problem_names_what_is_wrong_and_never_the_key(headers, problem):
    got = authorization_problem(Request("/", Headers(headers)), hashlib.sha256(KEY.encode()).digest())
    if problem is None:
        assert got is None
    else:
        assert problem in got and KEY not in got, got


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
