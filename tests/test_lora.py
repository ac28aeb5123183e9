"""LoRA fine-tuning: a zero LoRA is the base model exactly, frozen weights are bfloat16 without optimizer state, the
whole update stays insulated, and merged weights give the LoRA model's outputs with the plain model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ki_bench.synthetic import perturb_params, synthetic_batch, synthetic_tokenizers
from ki_model import Pi05KIConfig, lora
from ki_model.config import ConfigError
from ki_model.optimizer import OptimizerConfig
from ki_model.pi05_ki import param_group

H, D = 4, 3
LORA = "backbone=4,expert=8"


@pytest.fixture(scope="module")
def setup():
    toks = synthetic_tokenizers(H, D)
    cfg = Pi05KIConfig.tiny(action_horizon=H, action_dim=D, vocab_size=toks.vocab_size, max_token_len=40,
                            max_text_len=24)
    batch = synthetic_batch(cfg, toks, 2, seed=3, pad_steps=[0, 1])
    return cfg, batch


def _outputs(model, batch):
    noise = jax.random.normal(jax.random.key(1), batch.actions.shape)
    time = jnp.array([0.7, 0.2])
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        out = m.losses_given_noise(batch.obs, batch.actions, noise, time, batch.action_is_pad)
        return out, m.sample_actions(jax.random.key(2), batch.obs)

    out, sample = run(state)
    return {k: np.asarray(v) for k, v in out.items()}, np.asarray(sample)


def _lora_model_from(base, cfg):
    """A LoRA model holding `base`'s weights (rounded to bfloat16 where frozen), its A random and B as initialised."""
    model = cfg.create(nnx.Rngs(5))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(base, nnx.Param)):
        flat[path].set_value(var.get_value().astype(flat[path].get_value().dtype))
    return model


def test_lora_config_syntax():
    assert Pi05KIConfig.tiny(lora="backbone,expert").lora == (("backbone", 16), ("expert", 32))  # openpi's ranks
    assert Pi05KIConfig.tiny(lora="expert=8").lora == (("expert", 8),)
    assert Pi05KIConfig.from_json(Pi05KIConfig.tiny(lora=LORA).to_json()).lora == (("backbone", 4), ("expert", 8))
    with pytest.raises(ConfigError, match="unknown part 'vision'"):
        Pi05KIConfig.tiny(lora="vision=4")


def test_zero_lora_is_the_base_model_exactly(setup):
    cfg, batch = setup
    base = cfg.create(nnx.Rngs(0))
    perturb_params(base, 1)
    # The base weights as bfloat16 values (what the LoRA model stores frozen), kept in float32 by the base model.
    nnx.update(base, jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), nnx.state(base, nnx.Param)))
    model = _lora_model_from(base, dataclasses.replace(cfg, lora=LORA))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert flat[("backbone", "layers", "attn", "q_einsum")].get_value().dtype == jnp.bfloat16
    assert flat[("vision", "blocks", "mlp", "fc1", "kernel")].get_value().dtype == jnp.bfloat16
    assert flat[("action_in_proj", "kernel")].get_value().dtype == jnp.float32  # trains
    assert flat[("action_expert", "layers", "mlp", "linear_lora_b")].get_value().shape == (2, 8, 32)
    assert np.any(flat[("action_expert", "layers", "mlp", "linear_lora_a")].get_value() != 0)
    (l_base, s_base), (l_lora, s_lora) = _outputs(base, batch), _outputs(model, batch)
    for k in ("flow", "fast", "total"):
        assert np.array_equal(l_base[k], l_lora[k]), k
    assert np.array_equal(s_base, s_lora)


def test_merged_lora_gives_the_lora_models_outputs_with_the_plain_model(setup):
    cfg, batch = setup
    model = dataclasses.replace(cfg, lora=LORA).create(nnx.Rngs(0))
    perturb_params(model, 2)  # B non-zero: LoRA changes the model
    perturbed = jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, nnx.Param))
    lora.freeze(model, model.config.lora)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    merged, plain_cfg = lora.merge_lora(params, model.config)
    assert plain_cfg.lora == () and not any("lora" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged))
    plain = plain_cfg.create(nnx.Rngs(0))
    nnx.replace_by_pure_dict(state := nnx.state(plain, nnx.Param), merged)
    nnx.update(plain, state)
    (l_lora, s_lora), (l_plain, s_plain) = _outputs(model, batch), _outputs(plain, batch)
    for k in ("flow", "fast", "total"):
        np.testing.assert_allclose(l_lora[k], l_plain[k], rtol=1e-5)
    np.testing.assert_allclose(s_lora, s_plain, rtol=1e-4, atol=1e-5)
    del perturbed


def test_lora_update_is_insulated_and_trains_only_lora_and_unfrozen_weights(demo_shards):
    from ki_data.loader import LoaderConfig, ShardLoader
    from ki_data.manifest import Manifest
    from ki_model import train as T

    cfg = T.model_config("tiny", Manifest.load(demo_shards), lora=LORA)
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, clip_norm=1e-3)  # clips on both sides
    mesh = T.make_mesh(1, jax.devices()[:1])
    state, shardings, graphdef = T.init_train_state(cfg, T.make_optimizer(opt), mesh, seed=0, ema=False)
    # Only LoRA factors and unfrozen weights have optimizer state: Adam's two moments of each, nothing else.
    params = jax.tree_util.tree_leaves_with_path(state.params)
    trainable = sum(x.size for _, x in params if not lora.is_frozen(x))
    frozen = sum(x.size for _, x in params if lora.is_frozen(x))
    assert frozen > 5 * trainable
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * trainable
    with ShardLoader(demo_shards, "train", LoaderConfig(batch_size=8), process_index=0, process_count=1) as loader:
        obs, actions, pad = T.device_batch(next(loader), mesh)
    before = {jax.tree_util.keystr(p): np.asarray(x) for p, x in params}
    after, metrics = {}, {}
    for seed in (0, 1):
        step = T.make_train_step(graphdef, opt, shardings, mesh, seed=seed, ema_decay=None, donate=False,
                                 fast_compile=True)
        new, m = step(state, obs, actions, pad)
        after[seed] = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(new.params)}
        metrics[seed] = jax.device_get(m)
    assert float(metrics[0]["flow_loss"]) != float(metrics[1]["flow_loss"])
    for side in T.SIDES:
        assert float(metrics[0][f"grad_norm_{side}"]) > 100 * opt.clip_norm
    side = {jax.tree_util.keystr(p): param_group((p[0].key,)) for p, _ in params}
    dtype = {k: v.dtype for k, v in before.items()}
    for k in before:
        if dtype[k] == jnp.bfloat16:  # frozen: never moves
            assert np.array_equal(after[0][k], before[k]) and after[0][k].dtype == jnp.bfloat16, k
        if side[k] == "backbone":  # insulated: the flow draw changes nothing on the backbone side
            assert np.array_equal(after[0][k], after[1][k]), k
    # The backbone's LoRA B factors (zero at the start, so the only LoRA factors with gradient) move, from the FAST
    # loss. (From scratch, the expert's adaLN-zero gates, frozen at 0 here, keep its layers from any gradient; its
    # projections in and out train, and their update depends on the draw.)
    b = "['backbone']['layers']['mlp']['linear_lora_b']"
    assert not np.array_equal(after[0][b], before[b]), b
    for k in ("['action_in_proj']['kernel']", "['action_out_proj']['kernel']"):
        assert not np.array_equal(after[0][k], after[1][k]), k
