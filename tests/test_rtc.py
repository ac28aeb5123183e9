"""Guided real-time chunking (ki_model.rtc): the paper's soft mask and guidance weight, sampling that continues the
previous chunk (one VJP through the action expert per flow step), exactly plain sampling without a previous chunk or
with weight 0, and the Policy's re-expression of the previous chunk (absolute, dataset units) in the model's space.

Tolerance of "the first d actions match the previous chunk": guidance is soft (a weight clipped at β = 5 over 10
Euler steps, through the expert's Jacobian), it pulls the sample toward the chunk without pinning it. On the tiny
random model the first d actions land within 0.2 of it on average (normalized units, where the data's q01..q99 span
[-1, 1]: a tenth of that range) while plain samples from the same noise miss by 0.5 to 3; on the 2-step checkpoint
the same 0.2 is a tenth of the pusht action range in pixels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ki_bench.synthetic import perturb_params, smooth_chunks, synthetic_batch, synthetic_tokenizers
from ki_data.manifest import Manifest
from ki_model import Pi05KIConfig, Policy, rtc
from ki_model.policy import FrameError

H, D = 10, 2
TOL = 0.2  # mean |guided - previous| over the first d actions, normalized units (module docstring)


def paper_mask(d: int, end: int, h: int) -> list[float]:
    """Eq. 5 of arXiv 2506.07339 written out per index (end = H - s; `end` wins over d)."""
    d = min(d, end)
    out = []
    for i in range(h):
        if i < d:
            out.append(1.0)
        elif i < end:
            c = (end - i) / (end - d + 1)
            out.append(c * (math.exp(c) - 1) / (math.e - 1))
        else:
            out.append(0.0)
    return out


@pytest.mark.parametrize("d, end, h", [(2, 6, 10), (0, 5, 10), (3, 3, 8), (4, 2, 8), (0, 0, 4), (1, 10, 10)])
def test_the_soft_mask_is_the_papers_schedule(d, end, h):
    np.testing.assert_allclose(np.asarray(rtc.soft_mask(d, end, h)), paper_mask(d, end, h), rtol=1e-6, atol=1e-7)
    traced = jax.jit(rtc.soft_mask, static_argnums=2)(jnp.int32(d), jnp.int32(end), h)  # delay as data: no recompile
    np.testing.assert_allclose(np.asarray(traced), paper_mask(d, end, h), rtol=1e-6, atol=1e-7)


def test_the_guidance_weight_is_clipped_and_symmetric():
    w = lambda t, beta=5.0: float(rtc.guidance_weight(jnp.float32(t), beta))  # noqa: E731
    assert w(1.0) == 5.0  # at the noise (τ = 0) the quotient is infinite: β
    assert w(0.5) == pytest.approx(2.0)  # (τ² + (1 - τ)²) / (τ (1 - τ)) at mid-flow
    assert w(0.2) == pytest.approx(w(0.8)) == pytest.approx((0.04 + 0.64) / 0.16)
    assert w(0.05) == 5.0 and w(0.5, beta=1.0) == 1.0


@pytest.fixture(scope="module")
def tiny():
    toks = synthetic_tokenizers(H, D)
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=toks.vocab_size, max_token_len=40,
                            max_text_len=24)
    model = cfg.create(nnx.Rngs(5))
    perturb_params(model, 6)
    return model, synthetic_batch(cfg, toks, 3, seed=7).obs  # three flow samples (rows) at once


@nnx.jit(static_argnames=("beta",))
def _guided(model, rng, obs, prefix, beta):
    return model.sample_actions(rng, obs, prefix=prefix, max_guidance_weight=beta)


@nnx.jit
def _plain(model, rng, obs):
    return model.sample_actions(rng, obs)


def _prefix(delay: int, seed: int = 3, batch: int = 3) -> rtc.Prefix:
    previous = jnp.asarray(smooth_chunks(np.random.default_rng(seed), batch, H, D))
    return rtc.Prefix(previous, jnp.broadcast_to(rtc.soft_mask(delay, H - 3, H), (batch, H)))


def test_without_a_prefix_or_with_weight_0_sampling_is_plain_bit_for_bit(tiny):
    model, obs = tiny
    rng = jax.random.key(3)
    plain = np.asarray(_plain(model, rng, obs))
    np.testing.assert_array_equal(np.asarray(_guided(model, rng, obs, _prefix(3), 0.0)), plain)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, r, o: m.sample_actions(r, o, prefix=None))(
        model, rng, obs)), plain)


@pytest.mark.parametrize("delay", [1, 3, 5])
def test_guided_samples_begin_on_the_previous_chunk_and_plain_ones_do_not(tiny, delay):
    model, obs = tiny
    prefix = _prefix(delay)
    rng = jax.random.key(3)
    guided, plain = np.asarray(_guided(model, rng, obs, prefix, rtc.MAX_GUIDANCE_WEIGHT)), np.asarray(
        _plain(model, rng, obs))
    y = np.asarray(prefix.actions)
    miss = lambda a: np.abs(a - y)[:, :delay].mean(axis=(1, 2))  # noqa: E731 - per sample (row)
    assert (miss(guided) < TOL).all(), miss(guided)
    assert (miss(plain) > 2 * TOL).all(), miss(plain)
    # Past the mask (weight 0 from H - s = 7 on) guidance only acts through the expert: the tail stays the model's.
    assert np.abs(guided - y)[:, 7:].mean() > TOL


# ------------------------------------------------------------------------------------------------ the Policy


@pytest.fixture(scope="module")
def frame(demo_shards) -> dict:
    """A frame of the demo dataset as LeRobotDataset returns it."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    m = Manifest.load(demo_shards)
    item = LeRobotDataset(m.source["repo_id"], root=m.source["root"], video_backend="pyav")[5]
    return {k: (v if isinstance(v, str) else v.numpy()) for k, v in item.items()
            if k.startswith("observation.") or k == "task"}


@pytest.fixture(scope="module")
def policy(trained_checkpoint) -> Policy:
    return Policy.load(trained_checkpoint, seed=4, fast_compile=True)


def _previous_chunk(policy: Policy, k: int, seed: int = 0) -> np.ndarray:
    """k smooth absolute actions inside the data's range (q01..q99), in the dataset's units."""
    stats = policy.data.norm_stats["actions"]
    unit = (smooth_chunks(np.random.default_rng(seed), 1, k, policy.manifest.action_dim)[0] + 1) / 2
    return (stats.q01 + 0.25 * (stats.q99 - stats.q01) + 0.5 * unit * (stats.q99 - stats.q01)).astype(np.float32)


def _miss(policy: Policy, chunk: np.ndarray, previous: np.ndarray, delay: int) -> float:
    """Mean |chunk - previous| over the first `delay` actions, in normalized units."""
    return float(np.abs(policy.data.normalize_actions(chunk[:delay]) -
                        policy.data.normalize_actions(previous[:delay])).mean())


def test_policy_infer_without_a_previous_chunk_or_with_weight_0_is_plain(trained_checkpoint, frame):
    a, b, c = (Policy.load(trained_checkpoint, seed=4, fast_compile=True, max_guidance_weight=w)
               for w in (5.0, 0.0, 5.0))
    previous = _previous_chunk(a, 5)
    plain = a.infer(frame)
    np.testing.assert_array_equal(b.infer(frame, previous_chunk=previous, delay=2), plain)
    np.testing.assert_array_equal(c.infer(frame, previous_chunk=None, delay=2), plain)


def test_policy_infer_continues_the_previous_chunk(policy, frame):
    h = policy.config.action_horizon
    previous = _previous_chunk(policy, h - 4)  # executed for 4 of the horizon's actions: 6 left
    for delay in (2, 4):
        guided = policy.infer(frame, previous_chunk=previous, delay=delay)
        plain = policy.infer(frame)
        assert guided.shape == (h, policy.manifest.action_dim)
        assert _miss(policy, guided, previous, delay) < TOL < _miss(policy, plain, previous, delay) / 2
    # Delay and execution horizon are data of one compiled program.
    policy.infer(frame, previous_chunk=previous[:3], delay=1, execution_horizon=5)
    assert policy._sample_guided._cache_size() == 1


def test_delta_actions_are_re_expressed_against_the_new_state(policy, frame):
    """With relative actions the previous chunk (absolute) is made relative to the NEW frame's state before it is
    normalized; the guided chunk, turned back with that state, begins on the previous chunk in absolute units."""
    data = dataclasses.replace(policy.data, manifest=dataclasses.replace(policy.manifest, delta_actions=(0, 1)))
    delta = Policy(policy.model, policy.config, data, seed=4, fast_compile=True)
    state = delta.frame_state(frame)
    # Relative to this state the chunk lies inside the data's normalized range.
    previous = _previous_chunk(delta, 6) + state[:2]
    prefix = delta.rtc_prefix(previous, state, delay=2)
    np.testing.assert_allclose(np.asarray(prefix.actions[0, :6]), data.normalize_actions(previous - state[:2]),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(prefix.actions[0, 6:]), np.repeat(prefix.actions[0, 5:6], 4, axis=0))
    np.testing.assert_allclose(np.asarray(prefix.weights[0]), paper_mask(2, 6, 10), rtol=1e-6, atol=1e-7)
    assert np.abs(state[:2]).min() > 50  # the agent is far from the origin: forgetting the state would be far off
    guided = delta.infer(frame, previous_chunk=previous, delay=2)
    assert _miss(delta, guided, previous, 2) < TOL


@pytest.mark.parametrize(
    "kwargs, error",
    [({"previous_chunk": np.zeros((11, 2))}, r"previous_chunk must be \[k, 2\]"),
     ({"previous_chunk": np.zeros((4, 3))}, r"previous_chunk must be \[k, 2\]"),
     ({"previous_chunk": np.full((4, 2), np.nan)}, "previous_chunk must be finite"),
     ({"previous_chunk": np.zeros((4, 2)), "delay": 5}, r"delay must be in \[0, 4\]"),
     ({"previous_chunk": np.zeros((4, 2)), "delay": 1.5}, "delay must be an integer"),
     ({"previous_chunk": np.zeros((4, 2)), "execution_horizon": 11}, r"execution_horizon must be in \[0, 10\]")],
    ids=["too-long", "wrong-dim", "nan", "delay-past-chunk", "delay-float", "horizon"],
)
def test_bad_previous_chunks_are_refused_by_name(policy, frame, kwargs, error, no_shape_checks):
    with pytest.raises(FrameError, match=error):
        policy.infer(frame, **kwargs)
