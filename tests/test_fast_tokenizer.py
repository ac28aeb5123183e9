import json

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.fft import dct, idct
from tokenizers import ByteLevelBPETokenizer
from tokenizers.trainers import BpeTrainer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ki_data import FastDecodeError, FastEncodeError, FastTokenizer
from ki_data.fast_tokenizer import chunk_from_coefficients, dct_coefficients


def smooth_chunks(rng: np.random.Generator, n: int, horizon: int, dim: int) -> np.ndarray:
    """A few low-frequency sinusoids per dimension, within [-1, 1]."""
    t = np.linspace(0.0, 1.0, horizon)[None, :, None]
    out = np.zeros((n, horizon, dim))
    for _ in range(3):
        freq = rng.uniform(0.1, 2.0, (n, 1, dim))
        phase = rng.uniform(0, 2 * np.pi, (n, 1, dim))
        out += rng.uniform(0.0, 0.33, (n, 1, dim)) * np.sin(2 * np.pi * freq * t + phase)
    return out


def noisy_chunks(rng: np.random.Generator, n: int, horizon: int, dim: int) -> np.ndarray:
    return np.clip(smooth_chunks(rng, n, horizon, dim) + rng.normal(0, 0.3, (n, horizon, dim)), -1, 1)


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def smooth_fit():
    rng = np.random.default_rng(0)
    train, held = smooth_chunks(rng, 400, 50, 2), smooth_chunks(rng, 50, 50, 2)
    return FastTokenizer.fit(train, vocab_size=1024, scale=10.0), held


@pytest.mark.parametrize("family", ["smooth", "noisy"])
def test_round_trip_within_quantization_bound(family):
    rng = np.random.default_rng(1)
    make = smooth_chunks if family == "smooth" else noisy_chunks
    horizon, dim = (50, 2) if family == "smooth" else (10, 7)
    fast = FastTokenizer.fit(make(rng, 300, horizon, dim), vocab_size=1024, scale=10.0)
    for chunk in make(rng, 50, horizon, dim):
        ids = fast.encode(chunk, strict=True)  # held out, yet inside the fitted range (margin)
        back = fast.decode(ids, horizon, dim)
        assert back.shape == (horizon, dim)
        assert rms(back, chunk) <= 0.5 / fast.scale
        assert int(fast.token_num_coefficients[ids].sum()) == horizon * dim


def test_smooth_chunks_compress(smooth_fit):
    fast, held = smooth_fit
    lengths = [len(fast.encode(c)) for c in held]
    assert np.mean(lengths) < 0.5 * 50 * 2  # far fewer tokens than one per coefficient


@settings(max_examples=60, deadline=None)
@given(
    horizon=st.integers(1, 24),
    dim=st.integers(1, 6),
    scale=st.floats(0.5, 60.0),
    noise=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_property(horizon, dim, scale, noise, seed):
    rng = np.random.default_rng(seed)
    chunks = smooth_chunks(rng, 12, horizon, dim) + noise * rng.uniform(-1, 1, (12, horizon, dim))
    coeffs = dct_coefficients(chunks, scale)
    vocab = int(coeffs.max() - coeffs.min()) + 1 + 64
    fast = FastTokenizer.fit(chunks, vocab_size=vocab, scale=scale)
    assert fast.vocab_size <= vocab
    for chunk, c in zip(chunks, coeffs):
        ids = fast.encode(chunk, strict=True)
        np.testing.assert_array_equal(fast.decode_coefficients(ids, horizon, dim), c)
        assert rms(fast.decode(ids, horizon, dim), chunk) <= 0.5 / scale + 1e-12
        assert int(fast.token_num_coefficients[ids].sum()) == horizon * dim


def test_every_value_of_the_fitted_range_has_a_token(smooth_fit):
    fast, _ = smooth_fit
    values = np.arange(fast.min_token, fast.max_token + 1)
    assert len(values) > 100  # the range is wider than any one chunk shows
    # Streams that together hold every in-range value, most never seen in training; the first starts with the
    # values whose characters are whitespace or control characters (a leading space must survive).
    lead = fast.min_token + np.array([32, 10, 9, 0, 13, 32])
    stream = np.concatenate([lead, values, values[::-1]])
    for start in range(0, len(stream) - 100 + 1, 100):
        coeffs = stream[start : start + 100].reshape(50, 2)
        chunk = chunk_from_coefficients(coeffs, fast.scale)
        ids = fast.encode(chunk, strict=True)
        np.testing.assert_array_equal(fast.decode_coefficients(ids, 50, 2), coeffs)


def test_values_beyond_range_are_clipped_and_counted(smooth_fit):
    fast, held = smooth_fit
    wild = held[0] + np.array([3.0, -3.0])  # far beyond [-1, 1]: both DC coefficients leave the range
    coeffs = dct_coefficients(wild, fast.scale)
    assert coeffs[0, 0] > fast.max_token and coeffs[0, 1] < fast.min_token
    ids, clipped = fast.encode_counted(wild)
    assert clipped >= 2 and ids == fast.encode(wild)
    coeffs = fast.decode_coefficients(ids, 50, 2)
    assert coeffs.shape == (50, 2)
    assert coeffs.min() >= fast.min_token and coeffs.max() <= fast.max_token
    with pytest.raises(FastEncodeError, match="outside the fitted range"):
        fast.encode(wild, strict=True)


def test_decode_failures_raise(smooth_fit):
    fast, held = smooth_fit
    ids = fast.encode(held[0])
    with pytest.raises(FastDecodeError) as short:
        fast.decode(ids[:-1], 50, 2)
    assert short.value.expected == 100 and short.value.found < 100
    with pytest.raises(FastDecodeError) as long:
        fast.decode(ids + ids[-1:], 50, 2)
    assert long.value.found > 100
    with pytest.raises(FastDecodeError, match="expected 98"):
        fast.decode(ids, 49, 2)
    with pytest.raises(FastDecodeError, match="outside the vocabulary"):
        fast.decode([*ids, fast.vocab_size], 50, 2)
    with pytest.raises(FastDecodeError):
        fast.decode([], 50, 2)


def test_vocab_smaller_than_value_range_raises():
    chunks = smooth_chunks(np.random.default_rng(2), 20, 50, 2)
    with pytest.raises(ValueError, match="cannot hold"):
        FastTokenizer.fit(chunks, vocab_size=16, scale=10.0)


def test_bad_input_raises(smooth_fit, no_shape_checks):
    fast, held = smooth_fit
    with pytest.raises(ValueError, match="dim 3"):
        fast.encode(np.zeros((50, 3)))
    bad = held[0].copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="step 4, dim 1"):
        fast.encode(bad)
    with pytest.raises(ValueError, match="shaped"):
        FastTokenizer.fit(np.zeros((4, 10)))


def test_save_load_identical(smooth_fit, tmp_path):
    fast, held = smooth_fit
    fast.save(tmp_path / "a")
    loaded = FastTokenizer.load(tmp_path / "a")
    assert [loaded.encode(c) for c in held] == [fast.encode(c) for c in held]
    assert loaded.encode_batch(held) == [fast.encode(c) for c in held]
    np.testing.assert_array_equal(loaded.token_num_coefficients, fast.token_num_coefficients)
    assert (loaded.vocab_size, loaded.scale, loaded.min_token, loaded.max_token) == (
        fast.vocab_size, fast.scale, fast.min_token, fast.max_token
    )
    cfg = json.loads((tmp_path / "a" / "processor_config.json").read_text())
    assert cfg["processor_class"] == "UniversalActionProcessor"
    assert {"scale", "vocab_size", "min_token", "time_horizon", "action_dim"} <= set(cfg)
    assert (cfg["time_horizon"], cfg["action_dim"]) == (50, 2)
    loaded.save(tmp_path / "b")
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_fit_is_deterministic(tmp_path):
    chunks = noisy_chunks(np.random.default_rng(3), 100, 10, 7)
    FastTokenizer.fit(chunks, vocab_size=512).save(tmp_path / "a")
    FastTokenizer.fit(chunks, vocab_size=512).save(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


# ------------------------------------------------- our files through the published processor's code path
# The steps of physical-intelligence/fast's UniversalActionProcessor (processing_action_tokenizer.py), over
# transformers' own tokenizer class, with the parameters it would get from processor_config.json.


def transformers_tokenizer(directory) -> PreTrainedTokenizerFast:
    """The tokenizer as transformers builds it from the directory's tokenizer.json and tokenizer_config.json."""
    options = json.loads((directory / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        clean_up_tokenization_spaces=options["clean_up_tokenization_spaces"],
    )


def published_encode(bpe, cfg: dict, chunk: np.ndarray) -> list[int]:
    """The processor's __call__ for one chunk: DCT over time, scale, round, chr(v - min_token), tokenizer(text)."""
    coeffs = np.around(dct(chunk[None], axis=1, norm="ortho") * cfg["scale"])[0]
    text = "".join(map(chr, np.maximum(coeffs.flatten() - cfg["min_token"], 0).astype(int)))
    return bpe(text)["input_ids"]


def published_decode(bpe, cfg: dict, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The processor's decode for one id sequence: (coefficients [h, d], inverse DCT [h, d])."""
    text = bpe.decode(ids)
    coeffs = np.array(list(map(ord, text))) + cfg["min_token"]
    coeffs = coeffs.reshape(-1, cfg["action_dim"])  # fails unless a multiple of action_dim
    assert coeffs.shape == (cfg["time_horizon"], cfg["action_dim"])
    return coeffs, idct(coeffs / cfg["scale"], axis=0, norm="ortho")


@pytest.mark.parametrize("family", ["smooth", "noisy"])
def test_saved_files_decode_through_the_published_path(family, tmp_path):
    rng = np.random.default_rng(5)
    make = smooth_chunks if family == "smooth" else noisy_chunks
    horizon, dim = (50, 2) if family == "smooth" else (10, 7)
    fast = FastTokenizer.fit(make(rng, 300, horizon, dim), vocab_size=1024, scale=10.0)
    fast.save(tmp_path / "fast")
    cfg = json.loads((tmp_path / "fast" / "processor_config.json").read_text())
    assert (cfg["time_horizon"], cfg["action_dim"], cfg["min_token"], cfg["scale"]) == (
        horizon, dim, fast.min_token, fast.scale
    )
    assert cfg["vocab_size"] == fast.vocab_size

    # Held-out chunks, plus one whose stream holds the characters transformers' clean-up would change
    # (" ." " ," " !" " ?" " ' "): a space and its neighbour are two coefficients.
    tricky = fast.min_token + np.array([ord(c) for c in " . , ! ? ' "])
    assert tricky.max() <= fast.max_token
    stream = np.resize(np.concatenate([tricky, np.zeros(horizon * dim, np.int64)]), horizon * dim)
    chunks = [*make(rng, 50, horizon, dim), chunk_from_coefficients(stream.reshape(horizon, dim), fast.scale)]

    bpe = transformers_tokenizer(tmp_path / "fast")
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "fast"))  # as ProcessorMixin.from_pretrained opens it
    for chunk in chunks:
        ids = fast.encode(chunk, strict=True)
        for tokenizer in (bpe, auto):
            coeffs, actions = published_decode(tokenizer, cfg, ids)
            np.testing.assert_array_equal(coeffs, fast.decode_coefficients(ids))
            np.testing.assert_array_equal(actions, fast.decode(ids))
            assert published_encode(tokenizer, cfg, chunk) == ids
    np.testing.assert_array_equal(fast.decode_coefficients(ids), stream.reshape(horizon, dim))
    # transformers' clean-up (applied by versions before 5 unless tokenizer_config.json turns it off, as ours does)
    # would have lost coefficients of the last chunk.
    options = json.loads((tmp_path / "fast" / "tokenizer_config.json").read_text())
    assert options["clean_up_tokenization_spaces"] is False
    assert len(bpe.clean_up_tokenization(bpe.decode(ids))) < horizon * dim


def test_directory_saved_without_decoder_still_loads(tmp_path):
    rng = np.random.default_rng(6)
    fast = FastTokenizer.fit(noisy_chunks(rng, 200, 10, 7), vocab_size=512)
    held = noisy_chunks(rng, 20, 10, 7)
    fast.save(tmp_path / "old")
    # What save wrote before it set a decoder: no decoder and no tokenizer_config.json.
    spec = json.loads((tmp_path / "old" / "tokenizer.json").read_text())
    assert spec["decoder"] == {"type": "Fuse"}
    spec["decoder"] = None
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "old" / "tokenizer_config.json").unlink()
    old_bpe = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "old" / "tokenizer.json"))
    ids = [fast.encode(c) for c in held]
    assert all(len(old_bpe.decode(i)) > 70 for i in ids)  # the defect: pieces joined with spaces

    loaded = FastTokenizer.load(tmp_path / "old")
    assert [loaded.encode(c) for c in held] == ids
    for i in ids:
        np.testing.assert_array_equal(loaded.decode_coefficients(i), fast.decode_coefficients(i))
    # Saving it again writes files the published path reads.
    loaded.save(tmp_path / "new")
    cfg = json.loads((tmp_path / "new" / "processor_config.json").read_text())
    bpe = transformers_tokenizer(tmp_path / "new")
    for i in ids:
        np.testing.assert_array_equal(published_decode(bpe, cfg, i)[1], fast.decode(i))


# --------------------------------------------------------------------------- the published layout


def published_style_dir(path, streams: np.ndarray, scale: float, vocab_size: int):
    """A directory made the way physical-intelligence/fast was fit: a byte-level BPE trained with the raw
    characters chr(0..range) as initial alphabet, saved as tokenizer.json + processor_config.json."""
    lo, hi = int(streams.min()), int(streams.max())
    bpe = ByteLevelBPETokenizer()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=[chr(i) for i in range(hi - lo + 1)],
        max_token_length=10000,
        show_progress=False,
    )
    bpe._tokenizer.train_from_iterator(("".join(map(chr, s - lo)) for s in streams), trainer=trainer)
    path.mkdir()
    bpe.save(str(path / "tokenizer.json"))
    config = {
        "action_dim": None,
        "min_token": lo,
        "processor_class": "UniversalActionProcessor",
        "scale": scale,
        "time_horizon": None,
        "vocab_size": vocab_size,
    }
    (path / "processor_config.json").write_text(json.dumps(config))
    return lo


def test_published_layout_loads_and_reproduces_ids(tmp_path):
    rng = np.random.default_rng(4)
    horizon, dim, scale = 10, 3, 10.0
    # Integer coefficient streams drawn from [-20, 20] but never -15 in training: that value gets no token.
    values = np.array([v for v in range(-20, 21) if v != -15])
    train = rng.choice(values, size=(300, horizon * dim), p=np.exp(-np.abs(values) / 6) / np.exp(-np.abs(values) / 6).sum())
    lo = published_style_dir(tmp_path / "fast", train, scale, vocab_size=300)

    ours = FastTokenizer.load(tmp_path / "fast")
    assert ours.byte_level and ours.min_token == lo and ours.time_horizon is None
    reference = tokenizers.Tokenizer.from_file(str(tmp_path / "fast" / "tokenizer.json"))
    # As the published fit builds it; the directory records no horizon or dim, so the processor is told them.
    bpe = PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "fast" / "tokenizer.json"), clean_up_tokenization_spaces=False
    )
    cfg = {"min_token": lo, "scale": scale, "time_horizon": horizon, "action_dim": dim}

    held = rng.choice(values, size=(40, horizon * dim))
    held[:5, 7] = -15  # five chunks with the unseen value
    held[5, 0] = lo - 3  # one below min_token: the published encode clips it to min_token
    lossless = lossy = clipped = 0
    for stream in held:
        chunk = chunk_from_coefficients(stream.reshape(horizon, dim), scale)
        # The published encode procedure.
        text = "".join(map(chr, np.maximum(stream - lo, 0)))
        ref_ids = reference.encode(text).ids
        if reference.decode(ref_ids) == text:
            lossless += 1
            ids, count = ours.encode_counted(chunk)
            assert ids == ref_ids
            clipped += count
            np.testing.assert_array_equal(
                ours.decode_coefficients(ref_ids, horizon, dim), np.maximum(stream, lo).reshape(horizon, dim)
            )
            assert int(ours.token_num_coefficients[ref_ids].sum()) == horizon * dim
            np.testing.assert_array_equal(published_decode(bpe, cfg, ref_ids)[1], ours.decode(ref_ids, horizon, dim))
        else:
            lossy += 1
            assert len(reference.decode(ref_ids)) < len(text)  # the published path loses a coefficient...
            with pytest.raises(FastEncodeError, match="dropped"):  # ...ours refuses instead
                ours.encode(chunk)
    assert lossy >= 5 and lossless >= 30
    assert clipped == 1

    # Our own save of a published tokenizer opens again with the same ids.
    ours.save(tmp_path / "copy")
    again = FastTokenizer.load(tmp_path / "copy")
    chunk = chunk_from_coefficients(held[-1].reshape(horizon, dim), scale)
    assert again.encode(chunk) == ours.encode(chunk)
