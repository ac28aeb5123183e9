import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ki_data import FastTokenizer, PromptTooLongError, TextTokenizer, build_prompt, model_vocab_size
from ki_data.prompt import (
    clean_task,
    discretize_state,
    fast_to_model_ids,
    format_text_prompt,
    model_to_fast_ids,
    postfix_pieces,
)

H, D = 10, 3


@pytest.fixture(scope="module")
def toks():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, H)[None, :, None]
    chunks = np.sin(2 * np.pi * rng.uniform(0.2, 1.5, (200, 1, D)) * t + rng.uniform(0, 6, (200, 1, D)))
    fast = FastTokenizer.fit(chunks * 0.8, vocab_size=256)
    text = TextTokenizer.train(["push the t", "pick up the cube"], vocab_size=500)
    return text, fast, chunks[0] * 0.8


def build(toks, task="Push_the_T", state=None, actions="default", max_token_len=128, max_text_len=64):
    text, fast, chunk = toks
    state = np.array([-1.2, -0.5, 0.0, 0.7, 1.0, 3.0]) if state is None else state
    actions = chunk if isinstance(actions, str) else actions
    return build_prompt(
        task, state, actions,
        text_tokenizer=text, fast_tokenizer=fast, max_token_len=max_token_len, max_text_len=max_text_len,
        vocab_size=model_vocab_size(text, fast, 0), skip_tokens=0,
    )


def test_prefix_invariant_and_inference_prefix(toks):
    train = build(toks)
    infer = build(toks, actions=None)
    n = int(train.text_prompt_mask.sum())
    np.testing.assert_array_equal(train.text_prompt[:n], train.tokenized_prompt[:n])
    # The inference path builds the very same text prompt and prefix.
    np.testing.assert_array_equal(infer.text_prompt, train.text_prompt)
    np.testing.assert_array_equal(infer.text_prompt_mask, train.text_prompt_mask)
    np.testing.assert_array_equal(infer.tokenized_prompt[:n], train.tokenized_prompt[:n])
    assert infer.tokenized_prompt_mask.sum() == n and not infer.token_ar_mask.any() and not infer.token_loss_mask.any()
    assert infer.num_fast_tokens == 0


def test_layout_of_the_prompt(toks):
    text, fast, chunk = toks
    p = build(toks)
    n = p.num_text_tokens
    total = int(p.tokenized_prompt_mask.sum())
    ids = p.tokenized_prompt[:total].tolist()
    assert ids[0] == text.bos_id
    assert text.decode(ids[1:n]) == "Task: push the t, State: 0 64 128 217 255 255;\n"
    action_prefix, end = postfix_pieces(text)
    assert end == text.encode("|") + [text.eos_id]
    assert ids[n : n + len(action_prefix)] == action_prefix and ids[total - len(end) :] == end
    fast_part = ids[n + len(action_prefix) : total - len(end)]
    assert len(fast_part) == p.num_fast_tokens
    vocab = model_vocab_size(text, fast, 0)
    assert min(fast_part) >= text.vocab_size and max(fast_part) < vocab  # FAST ids sit above the text ids
    fast_ids = model_to_fast_ids(fast_part, vocab, 0)
    assert fast_ids.tolist() == fast.encode(chunk)
    back = fast.decode(fast_ids, H, D)
    assert np.sqrt(np.mean((back - chunk) ** 2)) <= 0.5 / fast.scale


def test_padding_and_masks(toks):
    text, _, _ = toks
    p = build(toks, max_token_len=100, max_text_len=50)
    n, total = p.num_text_tokens, int(p.tokenized_prompt_mask.sum())
    assert p.tokenized_prompt.shape == (100,) and p.tokenized_prompt.dtype == np.int32
    assert p.text_prompt.shape == (50,) and p.text_prompt.dtype == np.int32
    for m in (p.tokenized_prompt_mask, p.token_ar_mask, p.token_loss_mask, p.text_prompt_mask):
        assert m.dtype == np.bool_
    pos = np.arange(100)
    np.testing.assert_array_equal(p.tokenized_prompt_mask, pos < total)
    np.testing.assert_array_equal(p.token_ar_mask, (pos >= n) & (pos < total))
    np.testing.assert_array_equal(p.token_loss_mask, (pos >= n) & (pos < total))
    np.testing.assert_array_equal(p.text_prompt_mask, np.arange(50) < n)
    assert (p.tokenized_prompt[total:] == text.pad_id).all() and (p.text_prompt[n:] == text.pad_id).all()
    assert set(p.columns()) == {
        "tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask", "text_prompt",
        "text_prompt_mask",
    }


def test_over_length_raises(toks):
    total = int(build(toks).tokenized_prompt_mask.sum())
    assert int(build(toks, max_token_len=total).tokenized_prompt_mask.sum()) == total  # exactly fits
    with pytest.raises(PromptTooLongError) as e:
        build(toks, max_token_len=total - 1)
    assert (e.value.field, e.value.length, e.value.limit) == ("tokenized_prompt", total, total - 1)
    with pytest.raises(PromptTooLongError) as e:
        build(toks, max_text_len=5)
    assert e.value.field == "text_prompt" and e.value.limit == 5 and e.value.length > 5


def test_vocab_too_small_for_fast_ids(toks):
    text, fast, chunk = toks
    with pytest.raises(ValueError, match="outside the model vocabulary"):
        build_prompt(
            "t", np.zeros(2), chunk, text_tokenizer=text, fast_tokenizer=fast, max_token_len=128,
            max_text_len=64, vocab_size=10, skip_tokens=0,
        )


def test_id_mapping():
    assert fast_to_model_ids([0, 1], 257152, 128).tolist() == [257023, 257022]  # openpi's PaliGemma ids
    ids = np.arange(50)
    np.testing.assert_array_equal(model_to_fast_ids(fast_to_model_ids(ids, 1000, 7), 1000, 7), ids)


def test_state_bins_clipped_at_and_beyond_the_ends():
    s = np.array([-100.0, -1.5, -1.0, -0.9999, 0.0, 0.99, 1.0, 1.5, 100.0])
    np.testing.assert_array_equal(discretize_state(s), [0, 0, 0, 0, 128, 254, 255, 255, 255])
    assert "-1" not in format_text_prompt("t", np.array([-2.0, -1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        discretize_state(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="1-D"):
        discretize_state(np.zeros((2, 2)))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=16))
def test_state_bins_match_openpi_inside_and_clip_outside(values):
    s = np.array(values)
    bins = discretize_state(s)
    assert bins.min() >= 0 and bins.max() <= 255
    openpi = np.digitize(s, np.linspace(-1, 1, 257)[:-1]) - 1  # openpi's formula, without our clip
    inside = (s >= -1) & (s < 1)
    np.testing.assert_array_equal(bins[inside], openpi[inside])
    np.testing.assert_array_equal(bins[s < -1], 0)
    np.testing.assert_array_equal(bins[s >= 1], 255)


def test_task_cleaning():
    assert clean_task("  Pick_Up_the CUBE\n") == "pick up the cube"
    assert clean_task("open\r\nthe drawer") == "open the drawer"
    assert clean_task("Put the CAFÉ mug") == "put the café mug"
    decomposed = unicodedata.normalize("NFD", "Put the CAFÉ mug")
    assert decomposed != "Put the CAFÉ mug" and clean_task(decomposed) == "put the café mug"
    assert clean_task("ΣΟΦΊΑ_Straße") == "σοφία straße"
