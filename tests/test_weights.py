"""PaliGemma weights from a Hugging Face checkpoint: a tiny random transformers PaliGemma, saved with save_pretrained,
loaded by ki_model.weights, gives our vision features and backbone logits equal to transformers' (float32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from ki_data import TextTokenizer
from ki_model import Observation, Pi05KIConfig
from ki_model.config import ConfigError
from ki_model.gemma import forward as gemma_forward
from ki_model.checkpoint import CheckpointError
from ki_model.weights import init_from_paligemma, load_paligemma, parse_init

# Mirrors PaliGemma's 257152-token vocabulary stored as 257216 rows: 64 padding rows past the model's vocabulary.
VOCAB, ROWS = 256, 320
IMAGE_TOKEN = 300  # like PaliGemma's <image> (257152): past the model vocabulary, inside the stored rows
IMAGE_SIZE, PATCH = 32, 16
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
TEXT_LENGTHS = (10, 7)


def hf_config() -> PaliGemmaConfig:
    """The structure of paligemma-3b (Gemma MQA + SigLIP without pooling head) at the sizes of our tiny variants."""
    return PaliGemmaConfig(
        text_config=dict(
            model_type="gemma", hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, vocab_size=ROWS, hidden_act="gelu_pytorch_tanh",
        ),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=2, patch_size=PATCH, image_size=IMAGE_SIZE, vision_use_head=False,
        ),
        image_token_id=IMAGE_TOKEN,
        projection_dim=64,
    )


def our_config(**overrides) -> Pi05KIConfig:
    return Pi05KIConfig.tiny(action_horizon=4, action_dim=3, vocab_size=overrides.pop("vocab_size", VOCAB), **overrides)


@pytest.fixture(scope="module")
def hf_model() -> PaliGemmaForConditionalGeneration:
    torch.manual_seed(0)
    model = PaliGemmaForConditionalGeneration(hf_config()).eval()
    # Every weight random and O(1) (HF initialises norms to 0 and uses std 0.02): a transposed or misplaced tensor
    # then changes the outputs visibly.
    with torch.no_grad():
        for _, p in model.named_parameters():
            std = 0.2 if p.ndim == 1 else float(np.prod(p.shape[1:])) ** -0.5
            p.normal_(0.0, std)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as PaliGemma
    return model


@pytest.fixture(scope="module")
def ckpt_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("paligemma")
    hf_model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt_dir):
    model = our_config().create(nnx.Rngs(0))
    report = init_from_paligemma(model, ckpt_dir, progress=False)
    return model, report


def _state(path: Path) -> dict[str, np.ndarray]:
    with safe_open(path / "model.safetensors", framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _copy_with(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, dst / "model.safetensors")
    return dst


def _params(model) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (len(TEXT_LENGTHS), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def _pixel_values(images: np.ndarray) -> torch.Tensor:
    # The same float32 arithmetic as ki_model.siglip.to_unit_range, in NCHW.
    unit = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(unit).permute(0, 3, 1, 2).contiguous()


def test_vision_features_match_transformers(hf_model, loaded):
    model, report = loaded
    images = _images()
    ours = np.asarray(model.vision(jnp.asarray(images), jnp.float32))
    with torch.no_grad():
        theirs = hf_model.model.get_image_features(pixel_values=_pixel_values(images)).pooler_output.numpy()
    assert ours.shape == theirs.shape == (len(images), NUM_IMAGE_TOKENS, 64)
    err = np.max(np.abs(ours - theirs))
    assert err <= 1e-5 * max(1.0, np.max(np.abs(theirs))), err
    assert report.vocab_rows == ROWS and report.vocab_rows_dropped == ROWS - VOCAB


def test_backbone_logits_match_transformers_prefix_lm(hf_model, loaded):
    """[image | text] with full attention among them: our prefix pass (padded text, masks) vs transformers'
    PaliGemma with token_type_ids 0 (bidirectional prefix) on the unpadded sequence of each row."""
    model, _ = loaded
    cfg = model.config
    rng = np.random.default_rng(1)
    images = _images(1)
    text = np.zeros((len(TEXT_LENGTHS), cfg.max_text_len), np.int32)
    text_mask = np.zeros_like(text, bool)
    for r, n in enumerate(TEXT_LENGTHS):
        text[r, :n] = np.concatenate([[2], rng.integers(4, VOCAB, n - 1)])  # BOS, then any in-vocabulary ids
        text_mask[r, :n] = True
    b = len(TEXT_LENGTHS)
    obs = Observation(
        images={"cam": jnp.asarray(images)},
        image_masks={"cam": jnp.ones((b,), bool)},
        tokenized_prompt=jnp.zeros((b, cfg.max_token_len), jnp.int32),
        tokenized_prompt_mask=jnp.zeros((b, cfg.max_token_len), bool),
        token_ar_mask=jnp.zeros((b, cfg.max_token_len), bool),
        token_loss_mask=jnp.zeros((b, cfg.max_token_len), bool),
        text_prompt=jnp.asarray(text),
        text_prompt_mask=jnp.asarray(text_mask),
    )
    cache = model.prefix_cache(obs)
    ours = np.asarray(model.backbone.embedder.decode(cache.out))  # [b, img + max_text_len, VOCAB]

    pixels = _pixel_values(images)
    for r, n in enumerate(TEXT_LENGTHS):
        ids = np.concatenate([np.full(NUM_IMAGE_TOKENS, IMAGE_TOKEN), text[r, :n]])[None]
        length = ids.shape[1]
        with torch.no_grad():
            out = hf_model(
                input_ids=torch.from_numpy(ids).long(),
                pixel_values=pixels[r : r + 1],
                attention_mask=torch.ones((1, length), dtype=torch.long),
                token_type_ids=torch.zeros((1, length), dtype=torch.long),
                position_ids=torch.arange(length)[None],  # ours count from 0; transformers' default is 1-based
            )
        theirs = out.logits[0, :, :VOCAB].numpy()
        mine = ours[r, :length]
        err = np.max(np.abs(mine - theirs))
        assert err <= 1e-5 * max(1.0, np.max(np.abs(theirs))), (r, err)
        # Sanity: logits are O(1)-varied, so a wrong conversion could not pass the tolerance above.
        assert np.std(theirs) > 0.1


def test_expert_fresh_untouched_and_backbone_init_equals_backbone(ckpt_dir):
    cfg = our_config(expert_variant="gemma_tiny")
    model = cfg.create(nnx.Rngs(3))
    before = _params(model)
    load_paligemma(ckpt_dir, cfg).apply_to(model)
    after = _params(model)
    for p in before:
        same = np.array_equal(before[p], after[p])
        assert same == (p[0] not in ("vision", "backbone")), p

    load_paligemma(ckpt_dir, cfg, expert_init="backbone").apply_to(model)
    x = jax.random.normal(jax.random.key(0), (2, 5, 64))
    cond = jax.random.normal(jax.random.key(1), (2, 1, 64))  # one conditioning vector for all 5 tokens
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = jnp.ones((2, 5, 5), bool)
    (bb, _), _ = gemma_forward([model.backbone, model.action_expert], [x, None], positions=positions, mask=mask)
    (_, ex), _ = gemma_forward(
        [model.backbone, model.action_expert], [None, x], positions=positions, mask=mask, conds=[None, cond]
    )
    np.testing.assert_allclose(np.asarray(ex), np.asarray(bb), rtol=1e-6, atol=1e-6)

    with pytest.raises(ConfigError, match="gemma_tiny_expert"):
        load_paligemma(ckpt_dir, our_config(), expert_init="backbone")


def test_sharded_hf5_names_bf16_and_pure_dict_params_load_the_same(hf_model, ckpt_dir, loaded, tmp_path):
    model, _ = loaded
    expected = _params(model)

    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    # The trainer's form: a pure-dict tree placed on a mesh; leaves are replaced in place, keeping their sharding.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = nnx.to_pure_dict(nnx.state(our_config().create(nnx.Rngs(5)), nnx.Param))
    params = jax.device_put(params, replicated)
    assert load_paligemma(sharded, our_config()).apply_to_params(params) is params
    for path, value in expected.items():
        node = params
        for key in path:
            node = node[key]
        assert node.sharding == replicated
        if path[0] in ("vision", "backbone"):
            np.testing.assert_array_equal(np.asarray(node), value, err_msg=str(path))

    # transformers-5 in-memory names and an explicit (tied) lm_head.
    renames = {"language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower.vision_model.",
               "multi_modal_projector.": "model.multi_modal_projector."}
    state = _state(ckpt_dir)
    hf5 = {}
    for name, value in state.items():
        prefix = next(p for p in renames if name.startswith(p))
        hf5[renames[prefix] + name[len(prefix) :]] = value
    hf5["lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
    other = our_config().create(nnx.Rngs(6))
    report = init_from_paligemma(other, _copy_with(ckpt_dir, tmp_path / "hf5", hf5), progress=False)
    assert report.tied_lm_head
    got = _params(other)
    for p in expected:
        if p[0] in ("vision", "backbone"):
            np.testing.assert_array_equal(got[p], expected[p], err_msg=str(p))

    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    hf_model.to(torch.float32)
    other = our_config().create(nnx.Rngs(7))
    init_from_paligemma(other, tmp_path / "bf16", progress=False)
    got = _params(other)
    for p in expected:
        if p[0] in ("vision", "backbone"):
            rounded = np.asarray(jnp.asarray(expected[p]).astype(jnp.bfloat16).astype(jnp.float32))
            np.testing.assert_array_equal(got[p], rounded, err_msg=str(p))


def test_broken_checkpoints_name_what_is_wrong(ckpt_dir, tmp_path):
    cfg = our_config()
    state = _state(ckpt_dir)

    no_config = tmp_path / "no_config"
    shutil.copytree(ckpt_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_paligemma(no_config, cfg)

    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt_dir, truncated)
    file = truncated / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_paligemma(truncated, cfg)

    gone = "language_model.model.layers.1.mlp.up_proj.weight"
    missing = _copy_with(ckpt_dir, tmp_path / "missing", {k: v for k, v in state.items() if k != gone})
    with pytest.raises(CheckpointError, match=r"missing tensors: language_model\.model\.layers\.1\.mlp\.up_proj"):
        load_paligemma(missing, cfg)

    extra = _copy_with(ckpt_dir, tmp_path / "extra", state | {"vision_tower.head.probe": np.zeros((1, 1, 64), "f4")})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: vision_tower\.head\.probe"):
        load_paligemma(extra, cfg)

    bad = "vision_tower.post_layernorm.weight"
    wrong = _copy_with(ckpt_dir, tmp_path / "wrong", state | {bad: np.zeros((63,), "f4")})
    with pytest.raises(CheckpointError, match=r"vision_tower\.post_layernorm\.weight \(63,\) \(expected \(64,\)\)"):
        load_paligemma(wrong, cfg)

    quantized = _copy_with(ckpt_dir, tmp_path / "int8", state | {bad: np.zeros((64,), "i1")})
    with pytest.raises(CheckpointError, match=r"not floating point: vision_tower\.post_layernorm\.weight \(I8\)"):
        load_paligemma(quantized, cfg)

    untied = _copy_with(ckpt_dir, tmp_path / "untied", state | {"lm_head.weight": np.ones((ROWS, 64), "f4")})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_paligemma(untied, cfg)

    # Nothing was written by a failed load: the checks all run before the first weight.
    model = cfg.create(nnx.Rngs(0))
    before = _params(model)
    with pytest.raises(CheckpointError):
        init_from_paligemma(model, wrong, progress=False)
    assert all(np.array_equal(before[p], v) for p, v in _params(model).items())


def test_config_and_vocabulary_mismatches(ckpt_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"vocab_size is 200 .* has 320 rows"):
        load_paligemma(ckpt_dir, our_config(vocab_size=200))
    with pytest.raises(CheckpointError, match=r"vocab_size is 384 .* has 320 rows"):
        load_paligemma(ckpt_dir, our_config(vocab_size=384))
    assert load_paligemma(ckpt_dir, our_config(vocab_size=ROWS)).report.vocab_rows_dropped == 0
    with pytest.raises(CheckpointError, match=r"vision_config\.hidden_size = 64 but siglip_small\.width = 256"):
        load_paligemma(ckpt_dir, our_config(vision_variant="siglip_small"))
    with pytest.raises(CheckpointError, match=r"vision_config\.image_size = 32 but config\.image_size = 64"):
        load_paligemma(ckpt_dir, our_config(image_size=64))
    hf = json.loads((ckpt_dir / "config.json").read_text())
    assert hf["text_config"]["vocab_size"] == ROWS
    gemma2 = tmp_path / "gemma2"
    shutil.copytree(ckpt_dir, gemma2)
    hf["text_config"]["model_type"] = "gemma2"  # PaliGemma 2: soft-capping and sliding windows we do not compute
    (gemma2 / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="text_config: model_type 'gemma2' is not supported"):
        load_paligemma(gemma2, our_config())


def test_text_tokenizer_must_be_the_checkpoints(ckpt_dir, tmp_path):
    tok = TextTokenizer.train(["pick up the red cube", "open the drawer"], vocab_size=300)
    assert VOCAB <= tok.vocab_size <= ROWS  # the tiny checkpoint covers it after dropping padding rows
    tok.save(tmp_path / "text.model")
    ckpt = load_paligemma(ckpt_dir, our_config(vocab_size=tok.vocab_size))
    ckpt.check_text_tokenizer(tmp_path / "text.model")
    with pytest.raises(CheckpointError, match=f"{tok.vocab_size} pieces .* embeds {VOCAB}"):
        load_paligemma(ckpt_dir, our_config()).check_text_tokenizer(tmp_path / "text.model")

    shipped = tmp_path / "with_tokenizer"
    shutil.copytree(ckpt_dir, shipped)
    TextTokenizer.train(["something else entirely"], vocab_size=300).save(shipped / "tokenizer.model")
    with pytest.raises(CheckpointError, match="differs from the checkpoint's"):
        load_paligemma(shipped, our_config(vocab_size=tok.vocab_size)).check_text_tokenizer(tmp_path / "text.model")


# google/paligemma-3b-pt-224's config.json (fields it leaves out take transformers' defaults: head_dim 256, image 224).
HUB_CONFIG = {
    "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma", "hidden_size": 2048,
    "image_token_index": 257152, "projection_dim": 2048, "vocab_size": 257216, "torch_dtype": "float32",
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "ignore_index": -100,
    "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_attention_heads": 8,
                    "num_hidden_layers": 18, "num_image_tokens": 256, "num_key_value_heads": 1, "vocab_size": 257216,
                    "torch_dtype": "float32"},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256, "patch_size": 14,
                      "projection_dim": 2048, "projector_hidden_act": "gelu_fast", "vision_use_head": False},
}
HUB_NAMES = {"model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower.vision_model.",
             "model.multi_modal_projector.": "multi_modal_projector."}


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float32 safetensors file of all-zero tensors written as a sparse file (the 11 GiB take no disk space)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        f.truncate(8 + len(blob) + offset)


def test_paligemma_3b_layout_checks_out_for_the_pi05_config(tmp_path):
    """The real checkpoint's names and shapes (transformers' PaliGemma on the meta device, hub naming and
    config.json) pass every check for Pi05KIConfig.pi05(); no weight data is read."""
    with torch.device("meta"):
        hf = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(HUB_CONFIG))
    shapes = {}
    for name, t in hf.state_dict().items():
        if name != "lm_head.weight":  # tied: save_pretrained leaves it out, as the hub files do
            prefix = next(p for p in HUB_NAMES if name.startswith(p))
            shapes[HUB_NAMES[prefix] + name[len(prefix) :]] = tuple(t.shape)
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIG))
    _sparse_safetensors(tmp_path / "model.safetensors", shapes)
    ckpt = load_paligemma(tmp_path, Pi05KIConfig.pi05())
    assert ckpt.report.vocab_rows == 257216 and ckpt.report.vocab_rows_dropped == 64
    assert ckpt.report.num_tensors == len(shapes) == 604 - 1
    with pytest.raises(CheckpointError, match="vocab_size is 2048 .* has 257216 rows"):
        load_paligemma(tmp_path, Pi05KIConfig.pi05(vocab_size=2048))


def test_parse_init():
    assert parse_init("paligemma:/data/pg") == Path("/data/pg")
    for bad in ("/data/pg", "paligemma:", "gemma:/x"):
        with pytest.raises(CheckpointError, match="paligemma:PATH"):
            parse_init(bad)


def test_train_cli_refuses_a_broken_init_checkpoint_in_one_line(ckpt_dir, demo_shards, tmp_path):
    """`pipelines.train --init paligemma:DIR` on a truncated or mis-shaped file: one line naming it, exit non-zero,
    and the checkpoint directory (even with --overwrite) left as it was."""
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    # Mis-shaped: otherwise fit for the shards (their vocabulary, the tiny preset), one tensor one row short.
    vocab = json.loads((demo_shards / "manifest.json").read_text())["vocab_size"]
    bad, embed = "vision_tower.post_layernorm.weight", "language_model.model.embed_tokens.weight"
    tensors = _state(ckpt_dir) | {bad: np.zeros((63,), "f4"), embed: np.ones((vocab, 64), "f4")}
    misshaped = _copy_with(ckpt_dir, tmp_path / "misshaped", tensors)
    config = json.loads((misshaped / "config.json").read_text())
    config["text_config"]["vocab_size"] = vocab
    (misshaped / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run's notes")
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    for init, names in ((truncated, str(truncated / "model.safetensors")), (misshaped, bad)):
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.train", "--shards", str(demo_shards), "--checkpoint-dir", str(out),
             "--overwrite", "--steps", "1", "--init", f"paligemma:{init}"],
            capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and names in errors[0], proc.stderr[-3000:]
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
        assert (out / "notes.txt").read_text() == "an earlier run's notes"
