"""A trained policy behind openpi's websocket protocol, so that robots running openpi's client (`openpi-client`,
`WebsocketClientPolicy`) can use it unchanged.

The protocol (openpi's `WebsocketPolicyServer`): on connect the server sends the policy metadata; then each binary
message is one msgpack-numpy observation dict and gets one binary answer, a dict with `actions` and
`server_timing` (`infer_ms`, and from the second request on `prev_total_ms`, the previous request's round trip on
the server). An answer that is a text frame is an error (the client raises it). `GET /healthz` answers 200.

Differences from openpi's server, on purpose:
- Every message is untrusted. The msgpack-numpy decoding here is our own: an array is built only for a whitelisted
  bool/integer/float dtype whose shape matches its data exactly (an `object` dtype would make numpy read raw bytes as
  pointers), ext types are refused, and a message that is not msgpack is answered with an error, never unpacked.
- A bad request (missing camera, wrong state size, wrong dtype) is answered with an error naming the key, and the
  connection stays open for the next request; openpi's server closes it.
- It binds 127.0.0.1 unless told otherwise (openpi's binds every interface).

Observations are LeRobot frames as `ki_model.Policy.infer` takes them: the dataset's camera keys
(`observation.images.<cam>`, HxWx3 uint8 or 3xHxW float in [0, 1]), `observation.state`, and `task` (openpi's clients
send `prompt`; it is read when `task` is absent). Inference runs on one worker thread, so a slow model call never
stalls the event loop: other connections are accepted and refused messages answered meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
from websockets.asyncio.server import Request, Response, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from ki_model.policy import FrameError, Policy, to_uint8_hwc

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# A frame of three 640x480 RGB cameras is ~2.8 MB; anything far larger is refused by the websocket layer unread.
MAX_MESSAGE_BYTES = 64 * 2**20
# openpi-client's wire format for numpy values (keys are msgpack bin, i.e. bytes; older clients used str).
_NDARRAY, _NPGENERIC = "__ndarray__", "__npgeneric__"
# Byte order, then kind (b)ool, (i)nt, (u)int, (f)loat, then the item size: no object, void, string or complex.
_SAFE_DTYPE = re.compile(r"[<>|=]?[biuf][1248]")
_MAX_NDIM = 32


class RequestError(ValueError):
    """A message the server refuses: not msgpack, an unsafe or inconsistent array, or an observation that does not
    fit the policy. The message names the key at fault."""


# ---------------------------------------------------------------------------------------------------------------
# msgpack-numpy, decoded defensively


def _key(d: Mapping, name: str) -> Any:
    return d[name.encode()] if name.encode() in d else d.get(name)


def _safe_dtype(value: Any) -> np.dtype:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not isinstance(text, str) or not _SAFE_DTYPE.fullmatch(text):
        raise RequestError(f"array dtype {value!r} refused: only bool, integer and float arrays are accepted")
    return np.dtype(text)


def _array_hook(d: dict) -> Any:
    """msgpack object_hook: openpi-client's array and scalar maps -> numpy, checked before numpy sees a byte."""
    if (_NDARRAY.encode() in d) or (_NDARRAY in d):
        data, dtype, shape = _key(d, "data"), _safe_dtype(_key(d, "dtype")), _key(d, "shape")
        if not isinstance(data, bytes):
            raise RequestError("array data must be msgpack bin")
        if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_NDIM or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        ):
            raise RequestError(f"array shape {shape!r} is not a list of at most {_MAX_NDIM} sizes")
        if math.prod(shape) * dtype.itemsize != len(data):
            raise RequestError(f"array of shape {list(shape)} and dtype {dtype} needs "
                               f"{math.prod(shape) * dtype.itemsize} bytes, got {len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    if (_NPGENERIC.encode() in d) or (_NPGENERIC in d):
        data, dtype = _key(d, "data"), _safe_dtype(_key(d, "dtype"))
        if not isinstance(data, (bool, int, float)):
            raise RequestError(f"numpy scalar data must be a number, got {type(data).__name__}")
        return dtype.type(data)
    return d


def _refuse_ext(code: int, data: bytes) -> Any:
    raise RequestError(f"msgpack ext type {code} refused")


def unpack_request(message: bytes | str) -> dict[str, Any]:
    """One client message -> observation dict; RequestError for anything but a msgpack map of safe values."""
    if isinstance(message, str):
        raise RequestError("text frame refused: send the observation as a binary msgpack message")
    try:
        obs = msgpack.unpackb(message, object_hook=_array_hook, ext_hook=_refuse_ext, raw=False,
                              strict_map_key=True)
    except RequestError:
        raise
    except Exception as e:  # noqa: BLE001 - msgpack raises many types (ExtraData, FormatError, ValueError, ...)
        raise RequestError(f"not a msgpack message: {type(e).__name__}: {e}") from None
    if not isinstance(obs, dict) or not all(isinstance(k, str) for k in obs):
        raise RequestError("the request must be a msgpack map from observation keys (strings) to values")
    return obs


def _pack_default(obj: Any) -> Any:
    """numpy values in openpi-client's wire format (the client decodes them with its own unpackb)."""
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot send {type(obj).__name__} to an openpi client")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_pack_default)


# ---------------------------------------------------------------------------------------------------------------
# Observation -> action chunk


def policy_metadata(policy: Policy) -> dict[str, Any]:
    """What a client learns on connect: the keys and sizes the policy expects and answers with."""
    m = policy.manifest
    return {
        "policy": "ki pi05-ki",
        "camera_keys": [m.camera_keys[c] for c in policy.cameras],
        "state_key": "observation.state",
        "state_dim": int(m.state_dim),
        "action_dim": int(m.action_dim),
        "action_horizon": int(m.action_horizon),
        "image_size": int(m.image_size),
        "fps": float(m.fps),
        "source": m.source.get("repo_id"),
    }


def frame_from_request(obs: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The LeRobot frame `Policy.infer` takes, checked key by key (RequestError names the key at fault)."""
    task = obs["task"] if "task" in obs else obs.get("prompt")
    if task is None:
        raise RequestError("missing 'task' (or openpi's 'prompt'): the instruction string")
    if not isinstance(task, str):
        raise RequestError(f"'{'task' if 'task' in obs else 'prompt'}' must be a string, got {type(task).__name__}")
    key = metadata["state_key"]
    if key not in obs:
        raise RequestError(f"missing {key!r}")
    state = np.asarray(obs[key])
    if state.dtype.kind not in "biuf":
        raise RequestError(f"{key!r} must be numbers (bool, integer or float), got dtype {state.dtype}")
    if state.size != metadata["state_dim"]:
        raise RequestError(f"{key!r} has {state.size} values; the policy takes {metadata['state_dim']}")
    frame: dict[str, Any] = {"task": task, key: state.astype(np.float32).reshape(-1)}
    for cam_key in metadata["camera_keys"]:
        if cam_key not in obs:
            raise RequestError(f"missing camera image {cam_key!r} (the policy takes {metadata['camera_keys']})")
        try:
            frame[cam_key] = to_uint8_hwc(obs[cam_key], where=repr(cam_key))
        except FrameError as e:
            raise RequestError(str(e)) from None
    return frame


class PolicyServer:
    """Serves one `Policy` over openpi's websocket protocol (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        metadata: Mapping[str, Any] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ):
        self.policy = policy
        self.host, self.port = host, port
        self.metadata = dict(metadata or policy_metadata(policy))
        self.max_message_bytes = max_message_bytes
        # One thread: the Policy (its jitted call and its rng counter) is used by one request at a time.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")

    def answer(self, message: bytes | str, prev_total_s: float | None = None) -> bytes | str:
        """One message -> the binary answer, or the text of an error (openpi's clients raise it)."""
        start = time.monotonic()
        try:
            frame = frame_from_request(unpack_request(message), self.metadata)
            actions = np.asarray(self.policy.infer(frame), dtype=np.float32)
        except (RequestError, FrameError) as e:
            logger.warning("refused a request: %s", e)
            return f"error: {e}"
        except Exception as e:  # noqa: BLE001 - a failing model call must not take the server down
            logger.exception("inference failed")
            return f"error: inference failed: {type(e).__name__}: {e}"
        timing = {"infer_ms": (time.monotonic() - start) * 1000}
        if prev_total_s is not None:
            timing["prev_total_ms"] = prev_total_s * 1000
        return pack({"actions": actions, "server_timing": timing})

    async def _handler(self, ws: ServerConnection) -> None:
        logger.info("connection from %s", ws.remote_address)
        loop = asyncio.get_running_loop()
        try:
            await ws.send(pack(self.metadata))
            prev_total = None
            async for message in ws:
                start = time.monotonic()
                reply = await loop.run_in_executor(self._worker, self.answer, message, prev_total)
                await ws.send(reply)
                prev_total = time.monotonic() - start
        except ConnectionClosed:
            pass
        logger.info("connection from %s closed", ws.remote_address)

    async def run(self, on_ready: Callable[[str, int], None] | None = None) -> None:
        """Serve until cancelled; `on_ready(host, port)` once listening (port 0 picks a free port)."""
        async with serve(self._handler, self.host, self.port, compression=None, max_size=self.max_message_bytes,
                         process_request=_health_check) as server:
            host, port = next(iter(server.sockets)).getsockname()[:2]
            if on_ready is not None:
                on_ready(host, port)
            await server.serve_forever()

    def serve_forever(self, on_ready: Callable[[str, int], None] | None = None) -> None:
        try:
            asyncio.run(self.run(on_ready))
        finally:
            self._worker.shutdown(wait=False, cancel_futures=True)


def _health_check(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


def warm_up(policy: Policy, metadata: Mapping[str, Any]) -> float:
    """Compile the policy's sampling program on a blank frame (seconds taken). It draws with its own key, so the
    policy's sequence of draws (and thus `--seed`'s answers) is unchanged."""
    import jax

    size = metadata["image_size"]
    frame = {"task": "", metadata["state_key"]: np.zeros(metadata["state_dim"], np.float32)}
    frame |= {k: np.zeros((size, size, 3), np.uint8) for k in metadata["camera_keys"]}
    start = time.monotonic()
    policy.sample_normalized(policy.prepare(frame), rng=jax.random.key(0))
    return time.monotonic() - start
