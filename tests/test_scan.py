"""The scanned layer stacks: the same model as a per-layer loop (losses, gradients, samples, under every remat
policy), and checkpoints written with per-layer parameters refused with one line / converted."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ki_bench.synthetic import perturb_params, synthetic_batch, synthetic_tokenizers
from ki_model import Pi05KIConfig, gemma, siglip
from ki_model import checkpoint as ckpt
from ki_model.checkpoint import CheckpointError
from ki_model.config import ConfigError

H, D = 4, 3


def loop_layers(stacks, layer, carry, xs=None, *, remat="none", per_example=(), batch_chunks=1):
    """The reference: a Python loop over the layers, each block cut out of the stacked parameters by hand, on the
    whole batch."""
    depth = jax.tree.leaves(nnx.state(stacks[0]))[0].shape[0]
    ys = []
    for i in range(depth):
        blocks = []
        for s in stacks:
            graphdef, state = nnx.split(s)
            blocks.append(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)))
        x = None if xs is None else jax.tree.map(lambda a, i=i: a[i], xs)
        carry, y = layer(blocks, carry, x, *per_example)
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None


@pytest.fixture(scope="module")
def setup():
    toks = synthetic_tokenizers(H, D)
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=toks.vocab_size, max_token_len=40,
                            max_text_len=24, flow_samples=2)
    batch = synthetic_batch(cfg, toks, 2, seed=4, pad_steps=[0, 1])
    return cfg, batch


def _run(cfg, batch):
    """(losses, grads by path, sampled actions) of a perturbed random model."""
    model = cfg.create(nnx.Rngs(0))
    perturb_params(model, 1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    noise = jax.random.normal(jax.random.key(1), (2, 2, H, D))
    time = jnp.array([[0.9, 0.2], [0.4, 0.05]])

    def loss(p):
        out = nnx.merge(graphdef, p, rest).losses_given_noise(batch.obs, batch.actions, noise, time,
                                                              batch.action_is_pad)
        return out["total"], out

    grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
    sample = jax.jit(lambda p: nnx.merge(graphdef, p, rest).sample_actions(jax.random.key(2), batch.obs))(params)
    flat = {path: np.asarray(g) for path, g in nnx.to_flat_state(grads)}
    return {k: float(v) for k, v in out.items()}, flat, np.asarray(sample)


@pytest.mark.parametrize("remat", ["none", "nothing_saveable", "dots"])
def test_scanned_model_equals_a_per_layer_loop(setup, monkeypatch, remat):
    cfg, batch = setup
    cfg = cfg.__class__(**{**cfg.to_dict(), "remat": remat})
    scanned = _run(cfg, batch)
    monkeypatch.setattr(gemma, "scan_layers", loop_layers)
    monkeypatch.setattr(siglip, "scan_layers", loop_layers)
    looped = _run(cfg, batch)
    for k in ("flow", "fast", "total"):
        np.testing.assert_allclose(scanned[0][k], looped[0][k], rtol=1e-5, atol=1e-6)
    assert scanned[1].keys() == looped[1].keys()
    assert any(np.any(g != 0) for p, g in scanned[1].items() if p[1] in ("layers", "blocks"))
    for path in scanned[1]:
        np.testing.assert_allclose(scanned[1][path], looped[1][path], rtol=1e-4, atol=1e-6, err_msg=str(path))
    np.testing.assert_allclose(scanned[2], looped[2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 80 s for the three
@pytest.mark.parametrize("remat", ["none", "nothing_saveable", "dots"])
def test_layer_chunks_equal_the_whole_batch(remat):
    """layer_chunks: every layer run on strided chunks of the batch in turn gives the same losses, gradients and
    samples as the whole batch at once (6 rows: 4 chunks asked, 3 run, the largest divisor not above 4)."""
    toks = synthetic_tokenizers(H, D)
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=toks.vocab_size, max_token_len=40,
                            max_text_len=24, flow_samples=2, remat=remat)
    batch = synthetic_batch(cfg, toks, 6, seed=5, pad_steps=[0, 1, 2, 0, 1, 2])
    noise = jax.random.normal(jax.random.key(1), (6, 2, H, D))
    time = jax.random.uniform(jax.random.key(2), (6, 2), minval=0.05, maxval=0.95)
    runs = []
    for chunks in (1, 4):
        model = cfg.__class__(**{**cfg.to_dict(), "layer_chunks": chunks}).create(nnx.Rngs(0))
        perturb_params(model, 1)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            out = nnx.merge(graphdef, p, rest).losses_given_noise(batch.obs, batch.actions, noise, time,
                                                                  batch.action_is_pad)
            return out["total"], out

        grads, out = jax.jit(jax.grad(loss, has_aux=True))(params)
        runs.append(({k: float(v) for k, v in out.items()}, {p: np.asarray(g) for p, g in nnx.to_flat_state(grads)}))
    (whole, g_whole), (chunked, g_chunked) = runs
    for k in ("flow", "fast", "total", "fast_accuracy"):
        np.testing.assert_allclose(chunked[k], whole[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert g_whole.keys() == g_chunked.keys()
    for path in g_whole:
        np.testing.assert_allclose(g_chunked[path], g_whole[path], rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_layer_stacks_have_a_leading_depth_axis():
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=50)
    flat = dict(nnx.to_flat_state(nnx.state(cfg.create(nnx.Rngs(0)), nnx.Param)))
    assert flat[("backbone", "layers", "attn", "q_einsum")].get_value().shape[0] == cfg.backbone.depth
    assert flat[("vision", "blocks", "mlp", "fc1", "kernel")].get_value().shape[0] == cfg.vision.depth
    # Layers are drawn one after another as in an unrolled stack: two layers never share their initial weights.
    q = flat[("backbone", "layers", "attn", "q_einsum")].get_value()
    assert not np.allclose(q[0], q[1])


def test_remat_config_reads_booleans_and_names():
    assert Pi05KIConfig.tiny(remat=True).remat == "nothing_saveable"
    assert Pi05KIConfig.tiny(remat=False).remat == "none"
    assert Pi05KIConfig.from_json(Pi05KIConfig.tiny(remat="dots").to_json()).remat == "dots"
    with pytest.raises(ConfigError, match="remat must be one of"):
        Pi05KIConfig.tiny(remat="everything")


def _per_layer(tree):
    """The layout of checkpoints written before the stacking: one subtree per layer, keys "0", "1", ..."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        if k in ("layers", "blocks"):
            depth = jax.tree.leaves(v)[0].shape[0]
            out[k] = {str(i): jax.tree.map(lambda a, i=i: np.asarray(a[i]), v) for i in range(depth)}
        else:
            out[k] = _per_layer(v)
    return out


def test_old_per_layer_checkpoints_are_refused_in_one_line_then_converted(tmp_path):
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=50)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(cfg.create(nnx.Rngs(0)), nnx.Param)))
    old = _per_layer(params)
    assert "0" in old["backbone"]["layers"] and "layers" not in old["backbone"]["layers"]["0"]
    converted = ckpt.stack_per_layer(old)
    assert jax.tree.structure(converted) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(params)))

    mngr = ckpt.manager(tmp_path)
    ckpt.save(mngr, 3, params=old, opt_state={"mu": old}, ema_params=None, loader_state={"pos": 1}, meta={"m": 1})
    mngr.wait_until_finished()
    mngr.close()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    with pytest.raises(CheckpointError) as err:
        ckpt.restore_params(tmp_path, abstract)
    line = str(err.value)
    assert "\n" not in line and f"python -m ki_model.checkpoint stack-layers {tmp_path}" in line

    ckpt.main(["stack-layers", str(tmp_path)])
    restored, step, _ = ckpt.restore_params(tmp_path, abstract)
    assert step == 3
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)))
