"""Serve a trained checkpoint over openpi's websocket protocol:
`python -m pipelines.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--seed S]`.

Robots talk to it with openpi's client (`openpi_client.websocket_client_policy.WebsocketClientPolicy(host, port)`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ki_model.checkpoint import CheckpointError
from ki_model.policy import Policy
from ki_model.serving import DEFAULT_HOST, DEFAULT_PORT, MAX_MESSAGE_BYTES, PolicyServer, policy_metadata, warm_up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a pipelines.train checkpoint directory")
    p.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed when listening)")
    p.add_argument("--seed", type=int, default=0, help="the policy's noise seed (as Policy.load(..., seed=S))")
    p.add_argument("--step", type=int, help="the saved step to serve (default: the latest)")
    p.add_argument("--no-ema", action="store_true", help="serve the raw weights even if the run kept an EMA")
    p.add_argument("--max-message-mb", type=float, default=MAX_MESSAGE_BYTES / 2**20,
                   help="larger messages are refused unread")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        policy = Policy.load(a.checkpoint, step=a.step, use_ema=not a.no_ema, seed=a.seed)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metadata = policy_metadata(policy)
    print(f"compiled the policy in {warm_up(policy, metadata):.1f} s; cameras {metadata['camera_keys']}, "
          f"state {metadata['state_dim']}, actions {metadata['action_horizon']}x{metadata['action_dim']}", flush=True)
    server = PolicyServer(policy, host=a.host, port=a.port, metadata=metadata,
                          max_message_bytes=int(a.max_message_mb * 2**20))
    try:
        server.serve_forever(lambda host, port: print(f"listening on ws://{host}:{port}", flush=True))
    except KeyboardInterrupt:
        pass
    except OSError as e:  # e.g. the port is taken
        print(f"error: cannot serve on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
