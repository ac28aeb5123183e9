"""Unit tests of the model's parts: config, Observation, the attention table, attention math, SigLIP patching,
sharding specs and the FAST grammar."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ki_model import (
    ConfigError,
    FastDecodeSpec,
    FastSpecError,
    Observation,
    ObservationError,
    Pi05KIConfig,
    param_partition_specs,
    param_shardings,
)
from ki_model import attention, decoding, gemma
from ki_model.siglip import PatchEmbed

# --------------------------------------------------------------------------------------------- config


def test_config_json_round_trip_and_presets():
    cfg = Pi05KIConfig.tiny(action_horizon=5, action_dim=2, vocab_size=123, cameras=("a", "b"), remat=True)
    back = Pi05KIConfig.from_json(cfg.to_json())
    assert back == cfg and isinstance(back.cameras, tuple)
    assert json.loads(cfg.to_json())["cameras"] == ["a", "b"]
    real = Pi05KIConfig.pi05()
    assert (real.backbone.width, real.expert.width, real.vision.width) == (2048, 1024, 1152)
    assert real.tokens_per_image == 256 and real.dtype == "bfloat16"


def test_config_rejects_experts_that_cannot_share_attention():
    with pytest.raises(ConfigError, match="depth"):
        Pi05KIConfig(backbone_variant="gemma_2b", expert_variant="gemma_tiny_expert")
    with pytest.raises(ConfigError, match="multiple of the patch"):
        Pi05KIConfig.tiny(action_horizon=2, action_dim=2, vocab_size=10, image_size=40)
    with pytest.raises(ConfigError, match="unknown Pi05KIConfig fields"):
        Pi05KIConfig.from_dict({"nope": 1})


def test_real_size_parameter_count_without_allocating():
    model = nnx.eval_shape(lambda: Pi05KIConfig.pi05().create(nnx.Rngs(0)))
    sizes = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(getattr(model, k), nnx.Param)))
             for k in ("vision", "backbone", "action_expert")}
    # PaliGemma: SigLIP So400m (~0.4B + projection), Gemma 2B (~2.5B with its 257k-token embedding). The expert is
    # Gemma 300M (0.31B) plus adaRMS modulations (2 per layer and the final norm: 37 x 1024 x 3072 = 0.12B).
    assert 0.40e9 < sizes["vision"] < 0.45e9
    assert 2.45e9 < sizes["backbone"] < 2.55e9
    assert 0.42e9 < sizes["action_expert"] < 0.44e9


def test_param_partition_specs_use_logical_axes():
    model = Pi05KIConfig.tiny(action_horizon=2, action_dim=2, vocab_size=50).create(nnx.Rngs(0))
    specs = param_partition_specs(nnx.state(model, nnx.Param))
    flat = dict(nnx.to_flat_state(specs))
    P = jax.sharding.PartitionSpec
    assert flat[("backbone", "embedder", "input_embedding")].get_value() == P(None, "fsdp")
    # Stacked layers: the leading layer axis is never sharded.
    assert flat[("backbone", "layers", "attn", "q_einsum")].get_value() == P(None, None, "fsdp", None)
    assert flat[("action_expert", "layers", "mlp", "linear")].get_value() == P(None, None, "fsdp")
    assert flat[("vision", "blocks", "mlp", "fc1", "kernel")].get_value() == P(None, "fsdp", None)
    mesh = jax.make_mesh((1,), ("fsdp",))
    shardings = param_shardings(nnx.state(model, nnx.Param), mesh)
    placed = jax.device_put(nnx.state(model, nnx.Param), shardings)
    assert len(jax.tree.leaves(placed)) == len(flat)


# ---------------------------------------------------------------------------------------- observation


def _token_columns(b: int, length: int = 6, text: int = 4) -> dict[str, np.ndarray]:
    z = np.zeros((b, length), np.int32)
    return {
        "tokenized_prompt": z, "tokenized_prompt_mask": z.astype(bool), "token_ar_mask": z.astype(bool),
        "token_loss_mask": z.astype(bool), "text_prompt": np.zeros((b, text), np.int32),
        "text_prompt_mask": np.zeros((b, text), bool),
    }


def test_observation_from_batch_discovers_any_cameras():
    cols = _token_columns(2)
    for cam in ("cam_high", "wrist.left", "a"):
        cols[f"image.{cam}"] = np.zeros((2, 8, 8, 3), np.uint8)
    cols["image_mask.cam_high"] = np.array([True, False])
    cols["episode_index"] = np.arange(2)
    obs = Observation.from_batch(cols)
    assert sorted(obs.images) == ["a", "cam_high", "wrist.left"]
    assert obs.image_masks["cam_high"].tolist() == [True, False] and obs.image_masks["a"].tolist() == [True, True]
    assert obs.state is None and obs.batch_size == 2


def test_observation_from_batch_names_the_bad_column():
    cols = _token_columns(2)
    cols["image.top"] = np.array([b"png", b"png"], dtype=object)
    with pytest.raises(ObservationError, match=r"image\.top"):
        Observation.from_batch(cols)
    cols["image.top"] = np.zeros((2, 8, 8, 3), np.uint8)
    del cols["token_loss_mask"]
    with pytest.raises(ObservationError, match="token_loss_mask"):
        Observation.from_batch(cols)


# ------------------------------------------------------------------------------------------ attention


def test_training_layout_is_the_design_table():
    # I: 2 image tokens (the second of a masked camera); prompt: T T F F F pad; A: 2 action tokens.
    image_valid = jnp.array([[True, False]])
    prompt_mask = jnp.array([[1, 1, 1, 1, 1, 0]], bool)
    prompt_ar = jnp.array([[0, 0, 1, 1, 1, 0]], bool)
    layout = attention.training_layout(image_valid, prompt_mask, prompt_ar, horizon=2)
    names = ["I", "i", "T", "T", "F1", "F2", "F3", "p", "A", "A"]  # i: masked image token, p: padding
    readable = {  # docs/DESIGN.md §5: who may read whom (rows: queries)
        "I": {"I", "T"}, "i": {"I", "T"}, "T": {"I", "T"}, "p": {"I", "T"},
        "F1": {"I", "T", "F1"}, "F2": {"I", "T", "F1", "F2"}, "F3": {"I", "T", "F1", "F2", "F3"},
        "A": {"I", "T", "A"},
    }
    expected = np.array([[k in readable[q] for k in names] for q in names])
    np.testing.assert_array_equal(np.asarray(layout.mask[0]), expected)
    # I and T count over real tokens, F continues after T, A starts right after T.
    assert np.asarray(layout.positions[0]).tolist() == [0, 0, 1, 2, 3, 4, 5, 5, 3, 4]


def test_training_layout_backbone_part_matches_big_vision_prefix_lm():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n_img, length = 3, 8
        image_valid = rng.random((2, n_img)) < 0.7
        n_text, n_fast = rng.integers(1, 4, 2), rng.integers(1, 4, 2)
        mask = np.arange(length)[None] < (n_text + n_fast)[:, None]
        ar = mask & (np.arange(length)[None] >= n_text[:, None])
        ours = attention.training_layout(jnp.asarray(image_valid), jnp.asarray(mask), jnp.asarray(ar), horizon=3)
        ref = attention.cumulative_ar_layout(
            jnp.asarray(np.concatenate([image_valid, mask], 1)),
            jnp.asarray(np.concatenate([np.zeros_like(image_valid), ar], 1)),
        )
        real = np.concatenate([image_valid, mask], 1)
        n_bb = n_img + length
        for r in range(2):
            rows = np.flatnonzero(real[r])
            ours_rows = np.asarray(ours.mask)[r][np.ix_(rows, np.arange(n_bb))]
            np.testing.assert_array_equal(ours_rows, np.asarray(ref.mask)[r][rows])
            np.testing.assert_array_equal(np.asarray(ours.positions)[r, rows], np.asarray(ref.positions)[r, rows])


def test_grouped_query_attention_equals_repeated_kv_heads():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 5, 7)) < 0.6).at[:, :, 0].set(True)
    for kv_heads in (1, 2):
        k = jnp.asarray(rng.normal(size=(2, 7, kv_heads, 8)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(2, 7, kv_heads, 8)), jnp.float32)
        out = gemma.attend(q, k, v, mask)
        rep = 4 // kv_heads
        kk, vv = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        logits = jnp.einsum("bqnh,bknh->bnqk", q, kk) / np.sqrt(8)
        probs = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1)
        ref = jnp.einsum("bnqk,bknh->bqnh", probs, vv)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
    def score(m, n):
        return float(jnp.sum(gemma.apply_rope(q, jnp.array([[m]])) * gemma.apply_rope(k, jnp.array([[n]]))))
    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    np.testing.assert_allclose(np.asarray(gemma.apply_rope(q, jnp.array([[0]]))), np.asarray(q), atol=1e-6)


def test_patch_embedding_is_a_strided_convolution():
    embed = PatchEmbed(4, 6, rngs=nnx.Rngs(0))
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 3)), jnp.float32)
    ours = embed(images, jnp.float32)
    conv = jax.lax.conv_general_dilated(
        images, embed.kernel[...], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ) + embed.bias[...]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(conv.reshape(2, 4, 6)), atol=1e-5)


# -------------------------------------------------------------------------------------- FAST grammar


def _grammar(coefficients=(1, 2, 3, 1)):
    from ki_data.prompt import PostfixGrammar

    return PostfixGrammar((5, 6), (7, 1), np.array(coefficients), fast_id_top=19, vocab_size=20)


def _spec() -> FastDecodeSpec:
    # Model vocab 20; FAST ids 0..3 at model ids 19, 18, 17, 16 expanding to 1, 2, 3, 1 coefficients.
    return FastDecodeSpec.from_grammar(_grammar(), horizon=2, dim=3)


def _run_grammar(spec, tokens):
    state = decoding.DecodeState.initial(spec, 1)
    for t in tokens:
        state = decoding.advance(spec, state, jnp.array([t]))
    return bool(decoding.completed(state, spec)[0])


@pytest.mark.parametrize(
    "tokens, ok",
    [
        ([5, 6, 17, 17, 7, 1], True),  # 3 + 3 coefficients
        ([5, 6, 19, 18, 16, 19, 19, 7, 1], True),  # 1 + 2 + 1 + 1 + 1
        ([5, 6, 17, 7, 1], False),  # too few
        ([5, 6, 17, 17, 19, 7, 1], False),  # too many
        ([6, 5, 17, 17, 7, 1], False),  # wrong prefix
        ([5, 6, 17, 17, 7], False),  # no EOS
        ([5, 6, 17, 9, 17, 7, 1], False),  # a text token among the FAST ids
    ],
)
def test_grammar_state_machine_agrees_with_the_parser(tokens, ok):
    """The jax state machine of constrained decoding and ki_data's postfix parser (what turns tokens into actions)
    accept the same sequences."""
    spec, grammar = _spec(), _grammar()
    assert _run_grammar(spec, tokens) == ok
    assert spec.coeffs_per_model_id.tolist() == [0] * 16 + [1, 3, 2, 1]  # the grammar's table, by model id
    fast = grammar.fast_ids(tokens + [0, 0])
    parsed = fast is not None and sum(grammar.fast_coefficients[f] for f in fast) == spec.total_coefficients
    assert parsed == ok


def test_allowed_tokens_keep_the_count_reachable():
    spec = _spec()
    state = decoding.DecodeState.initial(spec, 1)
    assert np.flatnonzero(np.asarray(decoding.allowed_tokens(spec, state)[0])).tolist() == [5]
    for t in (5, 6, 17, 18):  # prefix, then 3 + 2 coefficients: one left
        state = decoding.advance(spec, state, jnp.array([t]))
    assert np.flatnonzero(np.asarray(decoding.allowed_tokens(spec, state)[0])).tolist() == [16, 19]
    state = decoding.advance(spec, state, jnp.array([19]))
    assert np.flatnonzero(np.asarray(decoding.allowed_tokens(spec, state)[0])).tolist() == [7]


def test_fast_spec_rejects_a_grammar_it_could_get_stuck_in():
    # (Ambiguous or out-of-vocabulary grammars cannot be built at all: tests/test_prompt.py.)
    with pytest.raises(FastSpecError, match="exactly one coefficient"):
        FastDecodeSpec.from_grammar(_grammar((2, 3)), horizon=2, dim=3)


# ---------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("vocab, chunk", [(1000, 200), (1000, 64), (1000, None), (37, None)])
def test_chunked_fast_cross_entropy_equals_full_logits(vocab, chunk):
    """Chunked log-sum-exp over the vocabulary (divisor chunks, a padded last chunk, one chunk): the same loss,
    accuracy and gradients as the whole [b, l, vocab] logits."""
    from ki_model import losses, reference

    rng = np.random.default_rng(0)
    b, length, width = 3, 11, 16
    hidden = jnp.asarray(rng.normal(size=(b, length, width)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(vocab, width)) * 0.5, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (b, length)), jnp.int32)
    mask = jnp.asarray(rng.random((b, length)) < 0.6)
    # Some targets predicted exactly (the accuracy counts them) and a target in the last chunk.
    best = jnp.argmax(hidden @ table.T, axis=-1)
    tokens = tokens.at[:, 1:5].set(best[:, 0:4]).at[0, 6].set(vocab - 1)
    mask = mask.at[:, 1:7].set(True)

    def chunked(h, t):
        nll, pred = losses.token_nll(h[:, :-1], t, tokens[:, 1:], chunk=chunk)
        weight = mask[:, 1:].astype(jnp.float32)
        count = jnp.sum(weight)
        return jnp.sum(nll * weight) / count, jnp.sum((pred == tokens[:, 1:]) * weight) / count

    full = lambda h, t: reference.fast_cross_entropy_full_logits(h, t, tokens, mask)  # noqa: E731
    (loss_c, acc_c), grads_c = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, table)
    (loss_f, acc_f), grads_f = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, table)
    assert float(acc_f) > 0.2 and float(acc_c) == float(acc_f)
    np.testing.assert_allclose(loss_c, loss_f, rtol=1e-6)
    for gc, gf in zip(grads_c, grads_f):
        np.testing.assert_allclose(gc, gf, rtol=1e-5, atol=1e-7)
    if chunk is None:  # the model's entry point is the same computation
        loss_m, acc_m = losses.fast_cross_entropy(hidden, table, tokens, mask)
        assert float(loss_m) == pytest.approx(float(loss_c), rel=1e-6) and float(acc_m) == float(acc_c)


def test_fast_cross_entropy_on_target_slots_equals_every_position():
    """Logits at each row's first `slots` target positions only (ragged, non-contiguous targets; a row without any;
    slots = the most targets of a row): the same loss, accuracy and gradients as at all positions."""
    from ki_model import losses

    rng = np.random.default_rng(1)
    b, length, width, vocab = 4, 12, 8, 50
    hidden = jnp.asarray(rng.normal(size=(b, length, width)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(vocab, width)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, vocab, (b, length)), jnp.int32)
    mask = np.zeros((b, length), bool)
    mask[0, 5:9] = True
    mask[1, [2, 7, 11]] = True
    mask[3, 1:6] = True  # row 2 has no target
    tokens = tokens.at[0, 6].set(int(jnp.argmax(hidden[0, 5] @ table.T)))  # one predicted exactly
    slots = int(mask[:, 1:].sum(1).max())
    assert slots == 5 < length - 1

    def ce(h, t, s):
        return losses.fast_cross_entropy(h, t, tokens, jnp.asarray(mask), slots=s)

    (l_all, a_all), g_all = jax.value_and_grad(ce, argnums=(0, 1), has_aux=True)(hidden, table, None)
    (l_few, a_few), g_few = jax.value_and_grad(ce, argnums=(0, 1), has_aux=True)(hidden, table, slots)
    assert float(a_all) > 0 and float(a_few) == float(a_all)
    np.testing.assert_allclose(l_few, l_all, rtol=1e-6)
    for gf, ga in zip(g_few, g_all):
        np.testing.assert_allclose(gf, ga, rtol=1e-5, atol=1e-7)
    # One slot fewer leaves a target of row 3 out: the loss differs (why training checks every batch).
    assert abs(float(ce(hidden, table, slots - 1)[0]) - float(l_all)) > 1e-3


def test_vocab_chunk_prefers_divisors():
    from ki_model.losses import vocab_chunk

    assert vocab_chunk(257152) == 4018 and 257152 % 4018 == 0  # PaliGemma: 64 chunks, no padded copy
    assert vocab_chunk(940) == 940
    assert vocab_chunk(8191) == 4096  # a prime: padded
