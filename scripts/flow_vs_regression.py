"""What bounds the demo's flow head: the same small transformer, reading the state as number tokens (the demo's 256
bins with `--number-embeddings`' value code), trained on the demo's rows by regression or by flow matching, scored on
the validation rows as MSE ÷ hold still (pixels²; the flow head by the mean of 8 samples of 10 Euler steps).

    python scripts/flow_vs_regression.py SHARDS --objective regression|flow|flow-x [--batch 32] [--draws 1]
        [--steps 1000] [--no-shared] [--no-positions] [--rollout]

`flow` trains the network's output toward the velocity (noise - chunk, π0's target); `flow-x` toward the clean chunk,
the velocity for sampling derived from it (`pipelines.train --flow-target clean`): the same flow, another output.

No images, no FAST, no backbone/expert split: a yardstick for how fast each objective learns this mapping at a given
batch, not a model of ki's own. `--no-positions` leaves out the learned row per chunk step that the action tokens
start from: each token then knows its step only through RoPE, as π0.5's action expert (the demo's has the rows:
`Pi05KIConfig.action_positions`). `--draws K` gives every row K noise/time draws per step (what `pipelines.train
--flow-samples K` does for the action expert, at little cost there). `--rollout` then drives gym-pusht with the
trained network (shards of the pusht demo with the block's pose in the state) on the 20 unseen initial states of
`pipelines.rollout`, replanning every half horizon: what closed-loop figure a network with this open-loop error
reaches, beside the expert that recorded the data.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ki_data.artifacts import DataArtifacts
from ki_data.prompt import STATE_BINS
from ki_data.schema import read_rows
from ki_model.number_embeddings import number_rows

WIDTH, HEADS, HEAD_DIM, DEPTH = 64, 8, 16, 2


def load(data: DataArtifacts, split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [read_rows(p) for p in data.shard_paths(split)]
    return np.concatenate([r["state"] for r in rows]), np.concatenate([r["actions"] for r in rows])


def to_bins(state: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.clip(state, -1, 1) + 1) / 2 * (STATE_BINS - 1)), 0, STATE_BINS - 1).astype(np.int32)


def rope(x: jax.Array, pos: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    angle = pos[:, None] / 10_000 ** (np.arange(half) / half)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)


def rms(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)


def init(key: jax.Array, horizon: int, dim: int) -> dict:
    keys = iter(jax.random.split(key, 16 + 8 * DEPTH))
    dense = lambda i, o, s=1.0: jax.random.normal(next(keys), (i, o)) * s / np.sqrt(i)  # noqa: E731
    layers = [dict(q=dense(WIDTH, HEADS * HEAD_DIM), k=dense(WIDTH, HEAD_DIM), v=dense(WIDTH, HEAD_DIM),
                   o=dense(HEADS * HEAD_DIM, WIDTH), up=dense(WIDTH, 4 * WIDTH), down=dense(4 * WIDTH, WIDTH, 0.1))
              for _ in range(DEPTH)]
    return dict(queries=jax.random.normal(next(keys), (horizon, WIDTH)), action_in=dense(dim, WIDTH),
                time_in=dense(16, WIDTH), out=dense(WIDTH, dim, 0.1), layers=layers)


def forward(p: dict, table: jax.Array, bins: jax.Array, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """[state tokens | horizon action tokens], all reading all; the action tokens carry their step's learned row
    (when `p` has them: not with --no-positions), x_t and t (zeros for regression). Returns one output per action
    token."""
    b, h = x_t.shape[:2]
    freqs = np.exp(np.linspace(0, np.log(100), 8))
    t_emb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1) @ p["time_in"]
    steps = p["queries"][None] if "queries" in p else 0
    x = jnp.concatenate([table[bins], steps + x_t @ p["action_in"] + t_emb[:, None]], 1)
    pos = jnp.arange(x.shape[1], dtype=jnp.float32)
    for layer in p["layers"]:
        y = rms(x)
        q = rope((y @ layer["q"]).reshape(b, -1, HEADS, HEAD_DIM).transpose(0, 2, 1, 3), pos)
        k, v = rope(y @ layer["k"], pos), y @ layer["v"]
        att = jax.nn.softmax(jnp.einsum("bhld,bmd->bhlm", q, k) / np.sqrt(HEAD_DIM), -1)
        x = x + jnp.einsum("bhlm,bmd->blhd", att, v).reshape(b, -1, HEADS * HEAD_DIM) @ layer["o"]
        x = x + jax.nn.gelu(rms(x) @ layer["up"]) @ layer["down"]
    return rms(x[:, -h:]) @ p["out"]


def check_rollout_state(data: DataArtifacts) -> None:
    """--rollout rebuilds the network's state from the simulator: the agent's x, y, then the block's pose."""
    from ki_sim import pusht

    if list(data.manifest.state_keys) != [pusht.STATE_KEY, pusht.ENV_STATE_KEY]:
        raise SystemExit(f"--rollout needs shards whose state is {pusht.STATE_KEY} + {pusht.ENV_STATE_KEY} "
                         f"(preprocess --state-keys); these hold {' + '.join(data.manifest.state_keys)}")


def closed_loop(data: DataArtifacts, chunk_of, episodes: int = 20) -> None:
    """Drives gym-pusht with chunk_of(raw state [s]) -> absolute chunk [h, 2], as pipelines.rollout drives a
    checkpoint (same initial states, episode limit and replanning), and prints the policy's and the expert's rows.
    `data` passed check_rollout_state before the network was trained."""
    from ki_sim import pusht
    from ki_sim.rollout import Expert, format_table, recording_info, relative_to_expert, run_episode, summarize

    recording = recording_info(data.manifest) or pusht.RECORDING_DEFAULTS
    max_steps, replan = recording.get("max_steps", 150), data.manifest.action_horizon // 2

    class Net:
        chunk_jumps = None

        def reset(self, episode: int) -> None:
            pass

        def act(self, env, obs):
            raw = np.concatenate([np.asarray(obs["agent_pos"], np.float32), pusht.environment_state(env)])
            return chunk_of(raw)[:replan]

    env = pusht.make_env(recording.get("image_size", 96), max_steps=max_steps)
    seeds = [pusht.evaluation_reset_seed(0, i) for i in range(episodes)]
    controllers = {"policy": Net(), "expert": Expert(0, recording["expert"])}
    start = recording["start"]
    report = {name: summarize([run_episode(env, c, s, i, max_steps, start=start) for i, s in enumerate(seeds)])
              for name, c in controllers.items()}
    env.close()
    relative_to_expert(report)
    median = np.median([e["distance_closed"] for e in report["policy"]["episodes"]])
    print(format_table(report, ("policy", "expert")).replace("policy (flow head)", f"{'network':<18}"))
    print(f"network: median distance closed {median:.0%} (replanning every {replan} steps, {episodes} episodes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards")
    ap.add_argument("--objective", choices=("regression", "flow", "flow-x"), required=True,
                    help="flow: the network predicts the velocity (π0); flow-x: it predicts the clean chunk, the "
                         "velocity is derived from it")
    ap.add_argument("--batch", type=int, default=32, help="rows per step")
    ap.add_argument("--draws", type=int, default=1, help="noise/time draws per row and step (flow)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-shared", action="store_true", help="number rows without their shared direction")
    ap.add_argument("--no-positions", action="store_true", help="action tokens without a learned row per chunk step")
    ap.add_argument("--rollout", action="store_true", help="then drive gym-pusht with the trained network")
    a = ap.parse_args()
    data = DataArtifacts.open(a.shards)
    if a.rollout:  # refused before training, not after
        check_rollout_state(data)
    (s_tr, y_tr), (s_va, y_va) = load(data, "train"), load(data, "val")
    horizon, dim = y_tr.shape[1:]
    rng = np.random.default_rng(a.seed)
    # The rows --number-embeddings gives the state bins.
    table = jnp.asarray(number_rows(np.arange(STATE_BINS), WIDTH, shared=not a.no_shared), jnp.float32)
    b_tr, b_va = to_bins(s_tr), to_bins(s_va)
    raw = data.unnormalize_state(s_va)
    truth = data.absolute_actions(y_va, raw)
    hold = float(np.mean((data.hold_still_chunks(raw, horizon) - truth) ** 2))
    flow = a.objective != "regression"
    clean = a.objective == "flow-x"

    def loss(p, bins, y, key):
        if not flow:
            zeros = jnp.zeros_like(y)
            return jnp.mean((forward(p, table, bins, zeros, jnp.zeros(len(y))) - y) ** 2)
        k1, k2 = jax.random.split(key)
        noise = jax.random.normal(k1, y.shape)
        t = jax.random.beta(k2, 1.5, 1.0, (len(y),)) * 0.999 + 0.001  # π0's time distribution
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * y
        out = forward(p, table, bins, x_t, t)
        return jnp.mean((out - (y if clean else noise - y)) ** 2)

    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 100, a.steps, 3e-4), b2=0.95)

    @jax.jit
    def step(p, o, bins, y, key):
        value, grads = jax.value_and_grad(loss)(p, bins, y, key)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, value

    @jax.jit
    def predict(p, bins, key):
        if not flow:
            zeros = jnp.zeros((len(bins), horizon, dim))
            return forward(p, table, bins, zeros, jnp.zeros(len(bins)))
        x = jax.random.normal(key, (len(bins), horizon, dim))
        for i in range(10):  # Euler from t = 1 (noise) to 0, as the policy samples
            t = 1 - i / 10
            out = forward(p, table, bins, x, jnp.full((len(bins),), t))
            x = x - 0.1 * ((x - out) / t if clean else out)
        return x

    p = init(jax.random.key(a.seed), horizon, dim)
    if a.no_positions:  # the other weights as drawn with them
        del p["queries"]
    o = tx.init(p)
    t0 = time.perf_counter()
    for i in range(1, a.steps + 1):
        rows = np.repeat(rng.integers(0, len(b_tr), a.batch), a.draws)
        p, o, value = step(p, o, b_tr[rows], y_tr[rows], jax.random.key(i))
        if i % (a.steps // 4) == 0:
            draws = [np.asarray(predict(p, b_va, jax.random.key(10_000 + j))) for j in range(8 if flow else 1)]
            mse = float(np.mean((data.absolute_actions(np.mean(draws, 0), raw) - truth) ** 2))
            print(f"{a.objective} batch {a.batch} x {a.draws} draws  step {i}  loss {float(value):.4f}  "
                  f"val MSE / hold still {mse / hold:.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    if a.rollout:
        keys = iter(range(20_000, 10**9))

        def chunk_of(raw: np.ndarray) -> np.ndarray:
            bins = to_bins(data.normalize_state(raw)[None])
            draws = [np.asarray(predict(p, bins, jax.random.key(next(keys)))) for _ in range(8 if flow else 1)]
            return data.absolute_actions(np.mean(draws, 0), raw[None])[0]

        closed_loop(data, chunk_of)


if __name__ == "__main__":
    main()
