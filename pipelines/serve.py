"""Serve a trained checkpoint over openpi's websocket protocol:
`python -m pipelines.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--seed S] [--flow-samples N]
[--api-key-file FILE]`.

Robots talk to it with openpi's client (`openpi_client.websocket_client_policy.WebsocketClientPolicy(host, port)`).

API key: with `--api-key-file FILE` (one line: the key) or, when that flag is absent, the environment variable
KI_API_KEY, only clients made with `WebsocketClientPolicy(host, port, api_key=KEY)` are let in; the others are
refused at the handshake (HTTP 401). The flag wins over the variable. There is no flag taking the key itself: command
lines are visible to every user of the machine (`ps`). Binding beyond loopback without a key prints a warning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping

from ki_model.checkpoint import CheckpointError
from ki_model.policy import Policy
from ki_model.serving import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_MESSAGE_BYTES,
    ApiKeyError,
    PolicyServer,
    check_api_key,
    exposure_warning,
    policy_metadata,
    read_api_key_file,
    warm_up,
)

API_KEY_ENV = "KI_API_KEY"


def api_key_from(key_file: str | None, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(key, where it came from): `key_file` when given, else $KI_API_KEY when set, else (None, None).
    ApiKeyError for a file that cannot be used or a variable that is set but empty: serving without the key the
    operator meant to give would be the wrong way to fail."""
    if key_file is not None:
        return read_api_key_file(key_file), f"the file {key_file!r}"
    if API_KEY_ENV in environ:
        return check_api_key(environ[API_KEY_ENV], f"the environment variable {API_KEY_ENV}"), f"${API_KEY_ENV}"
    return None, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pipelines.train checkpoint directory")
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed when listening)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help=f"let in only clients sending this key (default: ${API_KEY_ENV} when set; else no key)")
    p.add_argument("--seed", type=int, default=0, help="the policy's noise seed (as Policy.load(..., seed=S))")
    p.add_argument("--step", type=int, help="the saved step to serve (default: the latest)")
    p.add_argument("--flow-samples", type=int, default=1,
                   help="each chunk is the mean of N sampled for the observation (as Policy.load(..., flow_samples=N))")
    p.add_argument("--no-ema", action="store_true", help="serve the raw weights even if the run kept an EMA")
    p.add_argument("--max-message-mb", type=float, default=MAX_MESSAGE_BYTES / 2**20,
                   help="larger messages are refused unread")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"],
                   help="DEBUG also shows every handshake's headers (an Authorization value is hidden)")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Everything about the key is settled before the model loads: a bad key file starts nothing.
    try:
        api_key, key_source = api_key_from(a.api_key_file, os.environ)
    except ApiKeyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if warning := exposure_warning(a.host, a.port, api_key):
        print(warning, file=sys.stderr, flush=True)
    if key_source is not None:
        ignored = f" ({API_KEY_ENV} is set too and ignored)" if a.api_key_file and API_KEY_ENV in os.environ else ""
        print(f"clients must send the API key from {key_source}{ignored}", flush=True)

    try:
        policy = Policy.load(a.checkpoint, step=a.step, use_ema=not a.no_ema, seed=a.seed, flow_samples=a.flow_samples)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metadata = policy_metadata(policy)
    print(f"compiled the policy in {warm_up(policy, metadata):.1f} s; cameras {metadata['camera_keys']}, "
          f"state {metadata['state_dim']}, actions {metadata['action_horizon']}x{metadata['action_dim']}", flush=True)
    server = PolicyServer(policy, host=a.host, port=a.port, metadata=metadata,
                          max_message_bytes=int(a.max_message_mb * 2**20), api_key=api_key)
    try:
        server.serve_forever(lambda host, port: print(
            f"listening on ws://{host}:{port}" + (" (API key required)" if server.requires_key else ""), flush=True))
    except KeyboardInterrupt:
        pass
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
