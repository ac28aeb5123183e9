import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ki_data.normalize import NormStats, compute_stats, load_norm_stats, normalize, save_norm_stats, unnormalize


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 4)) * np.array([1.0, 10.0, 0.01, 3.0]) + np.array([0.0, -5.0, 2.0, 100.0])
    x[:, 3] = rng.exponential(2.0, 5000)  # a skewed dimension
    return x.astype(np.float32)


def test_stats_agree_with_numpy(data):
    s = compute_stats(data)
    x = data.astype(np.float64)
    for got, want in [
        (s.mean, x.mean(0)), (s.std, x.std(0)), (s.q01, np.quantile(x, 0.01, axis=0)),
        (s.q99, np.quantile(x, 0.99, axis=0)), (s.min, x.min(0)), (s.max, x.max(0)),
    ]:
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.astype(np.float32))


def test_quantile_maps_q01_q99_to_minus_one_one(data):
    s = compute_stats(data)
    np.testing.assert_allclose(normalize(s.q01, s), -1.0, atol=1e-4)
    np.testing.assert_allclose(normalize(s.q99, s), 1.0, atol=1e-4)
    y = normalize(data, s)
    inside = np.mean((y >= -1) & (y <= 1), axis=0)
    assert ((inside > 0.97) & (inside < 0.99)).all()  # ~98% between the quantiles, the rest beyond: no clip
    assert np.abs(normalize(data, s, clip=True)).max() <= 1.0


@pytest.mark.parametrize("mode", ["quantile", "zscore"])
def test_round_trip(data, mode):
    s = compute_stats(data)
    y = normalize(data, s, mode)
    if mode == "zscore":
        np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-3)
        np.testing.assert_allclose(y.std(0), 1.0, atol=1e-3)
    err = np.abs(unnormalize(y, s, mode) - data).max(0)
    assert (err <= 1e-6 * np.abs(data).max(0) + 1e-6).all()  # float32 round-off only


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 200), d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), spread=st.floats(1e-3, 1e3),
    mode=st.sampled_from(["quantile", "zscore"]),
)
def test_round_trip_property(n, d, seed, spread, mode):
    x = (np.random.default_rng(seed).normal(size=(n, d)) * spread).astype(np.float32)
    s = compute_stats(x)
    np.testing.assert_allclose(unnormalize(normalize(x, s, mode), s, mode), x, rtol=1e-4, atol=1e-4 * spread)


def test_broadcasts_over_chunks(data):
    s = compute_stats(data)
    chunks = data[:60].reshape(3, 20, 4)
    np.testing.assert_array_equal(normalize(chunks, s).reshape(60, 4), normalize(data[:60], s))


def test_constant_dimension_is_finite():
    x = np.ones((10, 2), np.float32)
    x[:, 1] = np.arange(10)
    s = compute_stats(x)
    y = normalize(x, s)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(unnormalize(y, s), x, atol=1e-5)


def test_json_in_openpi_shape_round_trips(data, tmp_path):
    stats = {"state": compute_stats(data), "actions": compute_stats(data[:, :2])}
    save_norm_stats(tmp_path / "norm_stats.json", stats)
    raw = json.loads((tmp_path / "norm_stats.json").read_text())
    assert set(raw) == {"norm_stats"} and set(raw["norm_stats"]) == {"state", "actions"}
    assert set(raw["norm_stats"]["state"]) == {"mean", "std", "q01", "q99", "min", "max"}
    loaded = load_norm_stats(tmp_path / "norm_stats.json")
    for key, s in stats.items():
        for field in ("mean", "std", "q01", "q99", "min", "max"):
            np.testing.assert_array_equal(getattr(loaded[key], field), getattr(s, field))  # exact float32


def test_loads_openpi_file_without_min_max(tmp_path):
    (tmp_path / "n.json").write_text(json.dumps({"norm_stats": {"state": {"mean": [0, 1], "std": [1, 2], "q01": [-1, -1], "q99": [1, 3]}}}))
    s = load_norm_stats(tmp_path / "n.json")["state"]
    assert s.min is None and s.max is None
    np.testing.assert_allclose(normalize(np.array([1.0, 3.0]), s), [1.0, 1.0], atol=1e-5)


def test_bad_input_raises(data, no_shape_checks):
    s = compute_stats(data)
    with pytest.raises(ValueError, match="last dimension 3"):
        normalize(np.zeros((2, 3)), s)
    with pytest.raises(ValueError, match="mode"):
        normalize(data, s, "minmax")
    with pytest.raises(ValueError, match="q01 and q99"):
        normalize(data, NormStats(mean=s.mean, std=s.std), "quantile")
    bad = data[:10].copy()
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="row 3, dim 2"):
        compute_stats(bad)
    with pytest.raises(ValueError, match=r"\[n>0, d\]"):
        compute_stats(np.zeros(5))
    with pytest.raises(ValueError, match="disagree"):
        NormStats(mean=np.zeros(2), std=np.zeros(3))
