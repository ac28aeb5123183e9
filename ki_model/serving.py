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

With an API key (`PolicyServer(api_key=...)`), a websocket handshake is answered 401 unless it carries the header
`Authorization: Api-Key <key>`, which is what openpi-client sends when made with `WebsocketClientPolicy(...,
api_key=KEY)`. The refusal is the HTTP answer to the handshake, so no message of a refused peer is ever read. The key
is compared through SHA-256 digests with `hmac.compare_digest` (constant time, whatever the sent key's length), only
the digest is kept, refusals are logged with the peer and the reason but never what was sent, and websockets' own
DEBUG dump of request headers shows `Authorization` hidden. `GET /healthz` stays open: it reveals only that the
server is up, and health probes carry no key.

Observations are LeRobot frames as `ki_model.Policy.infer` takes them: the dataset's camera keys
(`observation.images.<cam>`, HxWx3 uint8 or 3xHxW float in [0, 1]), `observation.state`, and `task` (openpi's clients
send `prompt`; it is read when `task` is absent). Inference runs on one worker thread, so a slow model call never
stalls the event loop: other connections are accepted and refused messages answered meanwhile.

Real-time chunking (ki_model.rtc), keys openpi's clients never send, so without them the answer is plain sampling:
`previous_chunk` ([k, action_dim] numbers: the previous answer's actions not executed yet when the observation was
taken, the next one first, absolute as the server sent them), `delay` (int: the actions the robot executes from it
while this request is answered; default 0) and optionally `execution_horizon` (int; default horizon - k). See
`Policy.rtc_prefix`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import http
import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
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


# Optional request keys of real-time chunking (ki_model.rtc).
RTC_KEYS = ("previous_chunk", "delay", "execution_horizon")

# openpi-client sends `Authorization: Api-Key <key>` (websocket_client_policy.py); HTTP auth schemes are
# case-insensitive (RFC 9110 §11.1).
API_KEY_SCHEME = "Api-Key"


class RequestError(ValueError):
    """A message the server refuses: not msgpack, an unsafe or inconsistent array, or an observation that does not
    fit the policy. The message names the key at fault."""


class ApiKeyError(ValueError):
    """An API key that cannot be used (empty, several lines, not header-safe) or a key file that cannot be read.
    The message names the file or the variable, never the key."""


# ---------------------------------------------------------------------------------------------------------------
# The API key: where it comes from, who may skip it, how a handshake is checked


def check_api_key(key: str, source: str) -> str:
    """`key` with surrounding whitespace (a key file's final newline) removed; ApiKeyError naming `source` when it is
    empty or not one run of printable ASCII without spaces (it travels in an HTTP header)."""
    key = key.strip()
    if not key:
        raise ApiKeyError(f"{source} is empty: it must hold the API key")
    if not all("!" <= c <= "~" for c in key):
        raise ApiKeyError(f"{source} must hold one API key of printable ASCII characters without spaces "
                          "or line breaks (it is sent in an HTTP header)")
    return key


def read_api_key_file(path: str | Path) -> str:
    """The key in `path` (one line; see check_api_key); ApiKeyError naming the file when it cannot be used."""
    try:
        text = Path(path).read_bytes().decode("ascii")
    except OSError as e:
        raise ApiKeyError(f"cannot read the API key file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ApiKeyError(f"the API key file {str(path)!r} is not ASCII text") from None
    return check_api_key(text, f"the API key file {str(path)!r}")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine. Any other name may reach the network ('' and
    '0.0.0.0' are every interface)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int, api_key: str | None) -> str | None:
    """The warning to print when a server without a key is bound beyond loopback; None when there is nothing to say."""
    if api_key or is_loopback(host):
        return None
    where = "every interface" if host in ("", "0.0.0.0", "::") else repr(host)
    return (f"warning: serving on {where} without an API key: anyone who can reach port {port} can drive the robot. "
            "Pass --api-key-file FILE (or set KI_API_KEY) and give the key to the robots' openpi clients "
            "(WebsocketClientPolicy(..., api_key=KEY)).")


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def authorization_problem(request: Request, key_digest: bytes) -> str | None:
    """None when `request` carries `Authorization: Api-Key <key>` with the right key; else why it is refused, in
    words that never quote what the peer sent (a wrong key may be a near miss, or another secret of theirs)."""
    values = request.headers.get_all("Authorization")
    if not values:
        return "no Authorization header"
    if len(values) > 1:
        return f"{len(values)} Authorization headers"
    scheme, _, sent = values[0].strip().partition(" ")
    if scheme.lower() != API_KEY_SCHEME.lower():
        return f"the Authorization header is not '{API_KEY_SCHEME} <key>'"
    # Digests have one length, so the comparison's time says nothing about the sent key's length either.
    if not hmac.compare_digest(_key_digest(sent.strip()), key_digest):
        return "wrong API key"
    return None


def _peer(connection: ServerConnection) -> str:
    address = connection.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class _HideAuthorization(logging.Filter):
    """websockets logs every request header at DEBUG as ('< %s: %s', name, value); an Authorization value is a key."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], str)
                and args[0].lower() in ("authorization", "proxy-authorization")):
            record.args = (args[0], "[hidden]")
        return True


# The websockets server logs its connections here (instead of "websockets.server"), where the filter applies.
websockets_logger = logging.getLogger(f"{__name__}.websockets")
websockets_logger.addFilter(_HideAuthorization())


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
        "state_key": m.state_keys[0],  # the first; kept for clients that read one key
        "state_keys": list(m.state_keys),  # concatenated in this order into a state of state_dim values
        "state_dim": int(m.state_dim),
        "action_dim": int(m.action_dim),
        "action_horizon": int(m.action_horizon),
        "image_size": int(m.image_size),
        "fps": float(m.fps),
        "source": m.source.get("repo_id"),
        "rtc_keys": list(RTC_KEYS),  # optional request keys: real-time chunking (module docstring)
        "flow_samples": policy.flow_samples,  # each chunk is the mean of this many sampled chunks
    }


def frame_from_request(obs: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The LeRobot frame `Policy.infer` takes, checked key by key (RequestError names the key at fault)."""
    task = obs["task"] if "task" in obs else obs.get("prompt")
    if task is None:
        raise RequestError("missing 'task' (or openpi's 'prompt'): the instruction string")
    if not isinstance(task, str):
        raise RequestError(f"'{'task' if 'task' in obs else 'prompt'}' must be a string, got {type(task).__name__}")
    keys = metadata.get("state_keys") or [metadata["state_key"]]
    frame: dict[str, Any] = {"task": task}
    for key in keys:
        if key not in obs:
            raise RequestError(f"missing {key!r} (the policy's state is {' + '.join(keys)})")
        state = np.asarray(obs[key])
        if state.dtype.kind not in "biuf":
            raise RequestError(f"{key!r} must be numbers (bool, integer or float), got dtype {state.dtype}")
        frame[key] = state.astype(np.float32).reshape(-1)
    size = sum(frame[k].size for k in keys)
    if size != metadata["state_dim"]:
        raise RequestError(f"{' + '.join(repr(k) for k in keys)} has {size} values; the policy takes "
                           f"{metadata['state_dim']}")
    for cam_key in metadata["camera_keys"]:
        if cam_key not in obs:
            raise RequestError(f"missing camera image {cam_key!r} (the policy takes {metadata['camera_keys']})")
        try:
            frame[cam_key] = to_uint8_hwc(obs[cam_key], where=repr(cam_key))
        except FrameError as e:
            raise RequestError(str(e)) from None
    return frame


def _request_int(obs: Mapping[str, Any], key: str) -> int | None:
    value = obs.get(key)
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RequestError(f"{key!r} must be an integer, got {type(value).__name__}")
    return int(value)


def rtc_from_request(obs: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """`Policy.infer`'s real-time chunking arguments from a request's optional keys ({} without `previous_chunk`);
    RequestError names the key at fault."""
    delay, horizon = _request_int(obs, "delay"), _request_int(obs, "execution_horizon")
    if "previous_chunk" not in obs:
        return {}
    chunk = obs["previous_chunk"]
    dim, h = metadata["action_dim"], metadata["action_horizon"]
    if not isinstance(chunk, np.ndarray) or chunk.dtype.kind not in "iuf":
        raise RequestError(f"'previous_chunk' must be an array of numbers, got "
                           f"{getattr(chunk, 'dtype', type(chunk).__name__)}")
    if chunk.ndim != 2 or chunk.shape[1] != dim or not 1 <= chunk.shape[0] <= h:
        raise RequestError(f"'previous_chunk' must be [k, {dim}] with 1 <= k <= {h} (the actions not executed yet), "
                           f"got shape {list(chunk.shape)}")
    if delay is not None and not 0 <= delay <= chunk.shape[0]:
        raise RequestError(f"'delay' must be in [0, {chunk.shape[0]}] (the rows of 'previous_chunk'), got {delay}")
    if horizon is not None and not 0 <= horizon <= h:
        raise RequestError(f"'execution_horizon' must be in [0, {h}], got {horizon}")
    return {"previous_chunk": chunk.astype(np.float32), "delay": delay or 0, "execution_horizon": horizon}


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
        api_key: str | None = None,
    ):
        """api_key: when given, only handshakes with `Authorization: Api-Key <api_key>` are let in (see the module
        docstring); only its digest is kept."""
        self.policy = policy
        self.host, self.port = host, port
        self.metadata = dict(metadata or policy_metadata(policy))
        self.max_message_bytes = max_message_bytes
        self._key_digest = None if api_key is None else _key_digest(check_api_key(api_key, "the API key"))
        self.requires_key = self._key_digest is not None
        # One thread: the Policy (its jitted call and its rng counter) is used by one request at a time.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")

    def answer(self, message: bytes | str, prev_total_s: float | None = None) -> bytes | str:
        """One message -> the binary answer, or the text of an error (openpi's clients raise it)."""
        start = time.monotonic()
        try:
            obs = unpack_request(message)
            frame, rtc = frame_from_request(obs, self.metadata), rtc_from_request(obs, self.metadata)
            actions = np.asarray(self.policy.infer(frame, **rtc), dtype=np.float32)
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

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Runs on the handshake, before the connection is opened: an HTTP answer here ends it unread."""
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self._key_digest is None:
            return None
        problem = authorization_problem(request, self._key_digest)
        if problem is None:
            return None
        logger.warning("refused a connection from %s: %s", _peer(connection), problem)
        # One answer for every refusal: a stranger learns the scheme, not which part was wrong.
        response = connection.respond(
            http.HTTPStatus.UNAUTHORIZED, f"This server needs the header 'Authorization: {API_KEY_SCHEME} <key>'.\n")
        response.headers["WWW-Authenticate"] = API_KEY_SCHEME
        return response

    async def _handler(self, ws: ServerConnection) -> None:
        logger.info("connection from %s", _peer(ws))
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
        logger.info("connection from %s closed", _peer(ws))

    async def run(self, on_ready: Callable[[str, int], None] | None = None) -> None:
        """Serve until cancelled; `on_ready(host, port)` once listening (port 0 picks a free port)."""
        async with serve(self._handler, self.host, self.port, compression=None, max_size=self.max_message_bytes,
                         process_request=self._process_request, logger=websockets_logger) as server:
            host, port = next(iter(server.sockets)).getsockname()[:2]
            if on_ready is not None:
                on_ready(host, port)
            await server.serve_forever()

    def serve_forever(self, on_ready: Callable[[str, int], None] | None = None) -> None:
        try:
            asyncio.run(self.run(on_ready))
        finally:
            self._worker.shutdown(wait=False, cancel_futures=True)



def warm_up(policy: Policy, metadata: Mapping[str, Any]) -> float:
    """Compile the policy's sampling programs, plain and real-time chunking's, on a blank frame (seconds taken), so
    that no robot waits for a compilation. It draws with its own key, so the policy's sequence of draws (and thus
    `--seed`'s answers) is unchanged."""
    import jax

    size = metadata["image_size"]
    keys = metadata.get("state_keys") or [metadata["state_key"]]
    frame = {"task": "", **{k: np.zeros(0, np.float32) for k in keys}}
    frame[keys[0]] = np.zeros(metadata["state_dim"], np.float32)  # warm-up only: the sizes add up
    frame |= {k: np.zeros((size, size, 3), np.uint8) for k in metadata["camera_keys"]}
    start = time.monotonic()
    obs = policy.prepare(frame)
    policy.sample_normalized(obs, rng=jax.random.key(0))
    previous = np.zeros((metadata["action_horizon"], metadata["action_dim"]), np.float32)
    prefix = policy.rtc_prefix(previous, policy.frame_state(frame))
    policy.sample_normalized(obs, rng=jax.random.key(0), prefix=prefix)
    return time.monotonic() - start
