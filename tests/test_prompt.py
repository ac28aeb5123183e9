import io
import unicodedata

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from ki_data import FastDecodeError, FastTokenizer, PromptBuilder, PromptTooLongError, TextTokenizer
from ki_data.prompt import ACTION_PREFIX, clean_task, discretize_state, prefix_text, vocab_layout

H, D = 10, 3
STATE = np.array([-1.2, -0.5, 0.0, 0.7, 1.0, 3.0])


@pytest.fixture(scope="module")
def toks():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, H)[None, :, None]
    chunks = np.sin(2 * np.pi * rng.uniform(0.2, 1.5, (200, 1, D)) * t + rng.uniform(0, 6, (200, 1, D)))
    fast = FastTokenizer.fit(chunks * 0.8, vocab_size=256)
    text = TextTokenizer.train(["push the t", "pick up the cube"], vocab_size=500)
    return text, fast, chunks[0] * 0.8


def builder(toks, layout="pi05", max_token_len=128, max_text_len=64, **kw) -> PromptBuilder:
    text, fast, _ = toks
    vocab_size, skip = vocab_layout(text, fast)
    kw = {"vocab_size": vocab_size, "skip_tokens": skip} | kw
    return PromptBuilder(text, fast, layout=layout, max_token_len=max_token_len, max_text_len=max_text_len, **kw)


def build(toks, task="Push_the_T", state=STATE, actions="default", layout="pi05", **kw):
    actions = toks[2] if isinstance(actions, str) else actions
    return builder(toks, layout, **kw).build(task, state, actions)


@pytest.mark.parametrize("layout", ["pi05", "fast"])
def test_prefix_invariant_and_inference_prefix(toks, layout):
    train = build(toks, layout=layout)
    infer = build(toks, actions=None, layout=layout)
    n = int(train.text_prompt_mask.sum())
    np.testing.assert_array_equal(train.text_prompt[:n], train.tokenized_prompt[:n])
    # The inference path builds the very same text prompt and prefix.
    np.testing.assert_array_equal(infer.text_prompt, train.text_prompt)
    np.testing.assert_array_equal(infer.text_prompt_mask, train.text_prompt_mask)
    np.testing.assert_array_equal(infer.tokenized_prompt[:n], train.tokenized_prompt[:n])
    assert infer.tokenized_prompt_mask.sum() == n and not infer.token_ar_mask.any() and not infer.token_loss_mask.any()
    assert infer.num_fast_tokens == 0


@pytest.mark.parametrize("layout", ["pi05", "fast"])
def test_layout_of_the_prompt(toks, layout):
    text, fast, chunk = toks
    b = builder(toks, layout)
    p = b.build("Push_the_T", STATE, chunk)
    n = p.num_text_tokens
    total = int(p.tokenized_prompt_mask.sum())
    ids = p.tokenized_prompt[:total].tolist()
    assert ids[0] == text.bos_id
    if layout == "pi05":  # openpi's π0.5 prefix: case kept, "Action: " closes the prefix, FAST follows directly
        assert text.decode(ids[1:n]) == "Task: Push the T, State: 0 64 128 217 255 255;\nAction: "
        start = []
    else:  # π0-FAST: lower-cased, "Action: " opens the postfix
        assert text.decode(ids[1:n]) == "Task: push the t, State: 0 64 128 217 255 255;\n"
        start = text.encode(ACTION_PREFIX)
    assert list(b.start_ids) == start
    end = text.encode("|") + [text.eos_id]
    assert list(b.end_ids) == end
    assert ids[n : n + len(start)] == start and ids[total - len(end) :] == end
    fast_part = ids[n + len(start) : total - len(end)]
    assert len(fast_part) == p.num_fast_tokens
    vocab = text.vocab_size + fast.vocab_size
    assert b.vocab_size == vocab
    assert min(fast_part) >= text.vocab_size and max(fast_part) < vocab  # FAST ids sit above the text ids
    assert b.is_fast(np.array(fast_part)).all() and not b.is_fast(np.array(ids[:n] + end)).any()
    fast_ids = b.model_to_fast(fast_part)
    assert fast_ids.tolist() == fast.encode(chunk)
    back = b.postfix_actions(ids[n:], H, D)
    np.testing.assert_array_equal(back, fast.decode(fast_ids, H, D))
    assert np.sqrt(np.mean((back - chunk) ** 2)) <= 0.5 / fast.scale


@pytest.mark.parametrize("layout", ["pi05", "fast"])
def test_decoding_rows_back_into_actions(toks, layout):
    """Valid postfixes (followed by padding) decode; a broken grammar or a wrong coefficient count is NaN, never 0."""
    text, fast, chunk = toks
    b = builder(toks, layout)
    p = b.build("t", STATE, chunk)
    postfix = p.tokenized_prompt[p.token_ar_mask]
    padded = np.concatenate([postfix, [text.pad_id] * 3])
    broken = padded.copy()
    broken[len(b.start_ids) + 1] = text.eos_id  # a FAST id replaced: the grammar breaks
    short = np.concatenate([b.start_ids, postfix[len(b.start_ids) + 1 :], [text.pad_id] * 4])  # a FAST id fewer
    short = short.astype(padded.dtype)
    actions, valid = b.decode_actions(np.stack([padded, broken, short]), H, D)
    assert valid.tolist() == [True, False, False]
    np.testing.assert_array_equal(actions[0], b.postfix_actions(postfix, H, D).astype(np.float32))
    assert np.isnan(actions[1:]).all()
    with pytest.raises(FastDecodeError, match="grammar"):
        b.postfix_actions(broken, H, D)
    grammar = b.grammar()
    assert grammar.start_ids == b.start_ids and grammar.end_ids == b.end_ids
    np.testing.assert_array_equal(grammar.fast_coefficients, fast.token_num_coefficients)
    # The one route: the reading carries the FAST ids (also those before the break) and says why there is no chunk.
    good, bad, few = (b.read_postfix(r, H, D) for r in (padded, broken, short))
    assert good.error is None and good.fast_ids == fast.encode(chunk)
    np.testing.assert_array_equal(good.actions, fast.decode(good.fast_ids, H, D))
    assert bad.actions is None and "grammar" in bad.error and bad.fast_ids == good.fast_ids[:1]
    assert few.actions is None and few.fast_ids == good.fast_ids[1:] and "coefficients" in few.error


def test_the_fast_id_table(toks):
    """The grammar's table, by model id, is what FastDecodeSpec takes: each FAST id's coefficient count at model id
    vocab_size - 1 - skip_tokens - FAST id, zero elsewhere."""
    _, fast, _ = toks
    b = builder(toks, vocab_size=1000, skip_tokens=7)
    table = b.grammar().coefficients_per_model_id
    assert table.shape == (1000,) and not table.flags.writeable
    f = np.arange(fast.vocab_size)
    np.testing.assert_array_equal(table[999 - 7 - f], fast.token_num_coefficients)
    assert table.sum() == sum(fast.token_num_coefficients)
    assert (b.fast_to_model(f) == 999 - 7 - f).all() and b.is_fast(999 - 7 - f).all()
    assert not b.is_fast(np.array([999 - 6, 999 - 7 - fast.vocab_size])).any()


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
    with pytest.raises(ValueError, match=r"256 FAST ids do not fit below model id 99: .* -156\.\.99"):
        builder(toks, vocab_size=1000, skip_tokens=900)
    # A negative skip would put FAST id 0 past the vocabulary's end.
    with pytest.raises(ValueError, match=r"do not fit below model id 1000: .* \[0, vocab_size 1000\)"):
        builder(toks, vocab_size=1000, skip_tokens=-1)
    with pytest.raises(ValueError, match="text tokenizer's 500 ids do not fit in vocab_size 499"):
        builder(toks, vocab_size=499, skip_tokens=0)


def test_grammar_ids_are_checked():
    """A grammar whose end/start ids are also FAST ids, or lie outside the vocabulary, cannot be built."""
    from ki_data.prompt import PostfixGrammar

    coeffs = np.array([1, 2])
    with pytest.raises(ValueError, match=r"grammar ids \[19\] are also FAST ids"):
        PostfixGrammar((19,), (1,), coeffs, fast_id_top=19, vocab_size=20)
    with pytest.raises(ValueError, match="end_ids .* outside the vocabulary"):
        PostfixGrammar((), (1, 20), coeffs, fast_id_top=19, vocab_size=20)
    with pytest.raises(ValueError, match="end_ids is empty"):
        PostfixGrammar((), (), coeffs, fast_id_top=19, vocab_size=20)
    with pytest.raises(ValueError, match="do not fit"):
        PostfixGrammar((), (1,), np.ones(30, int), fast_id_top=19, vocab_size=20)


def test_clipped_coefficients_are_counted_not_hidden(toks):
    wild = toks[2] + 5.0  # far outside the fitted range
    p = build(toks, actions=wild)
    assert p.fast_clipped > 0 and build(toks).fast_clipped == 0
    with pytest.raises(ValueError, match="outside the fitted range"):
        builder(toks).build("t", STATE, wild, strict_fast=True)


def test_id_mapping(toks):
    text, fast, _ = toks
    paligemma = PromptBuilder(text, fast, layout="pi05", max_token_len=8, max_text_len=8, vocab_size=257152,
                              skip_tokens=128)
    assert paligemma.fast_to_model([0, 1]).tolist() == [257023, 257022]  # openpi's PaliGemma ids
    ids = np.arange(50)
    b = builder(toks, vocab_size=1000, skip_tokens=7)
    np.testing.assert_array_equal(b.model_to_fast(b.fast_to_model(ids)), ids)
    assert vocab_layout(text, fast) == (text.vocab_size + fast.vocab_size, 0)


def test_state_bins_clipped_at_and_beyond_the_ends():
    s = np.array([-100.0, -1.5, -1.0, -0.9999, 0.0, 0.99, 1.0, 1.5, 100.0])
    np.testing.assert_array_equal(discretize_state(s), [0, 0, 0, 0, 128, 254, 255, 255, 255])
    for layout in ("pi05", "fast"):
        assert "-1" not in prefix_text("t", np.array([-2.0, -1.0]), layout)
    with pytest.raises(ValueError, match="non-finite"):
        discretize_state(np.array([0.0, np.nan]))
    # A ValueError naming the shape; under the tests' run-time shape checks, the checker's TypeError naming `state`.
    with pytest.raises((ValueError, TypeError), match="1-D|parameter 'state'"):
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
    assert clean_task("  Pick_Up_the CUBE\n", "fast") == "pick up the cube"
    assert clean_task("open\r\nthe drawer", "fast") == "open the drawer"
    assert clean_task("Put the CAFÉ mug", "fast") == "put the café mug"
    decomposed = unicodedata.normalize("NFD", "Put the CAFÉ mug")
    assert decomposed != "Put the CAFÉ mug" and clean_task(decomposed, "fast") == "put the café mug"
    assert clean_task("ΣΟΦΊΑ_Straße", "fast") == "σοφία straße"
    # pi05: openpi's cleaning exactly (strip; `_` and `\n` become spaces; case and everything else kept).
    assert clean_task("  Pick_Up_the CUBE\n", "pi05") == "Pick Up the CUBE"
    assert clean_task("open\nthe_drawer\r", "pi05") == "open the drawer"
    assert clean_task(decomposed, "pi05") == decomposed


# ------------------------------------------------------------------------- openpi's π0.5 prompt, token for token


def paligemma_like_tokenizer(corpus: list[str]) -> TextTokenizer:
    """A small SentencePiece model with PaliGemma's settings as far as they can be had offline: BPE, digits split,
    identity normalization, no dummy prefix, byte fallback, pad/eos/bos/unk = 0/1/2/3."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, vocab_size=400, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return TextTokenizer(out.getvalue())


def openpi_pi05_tokenize(sp: spm.SentencePieceProcessor, prompt: str, state: np.ndarray, max_len: int):
    """openpi's `PaligemmaTokenizer.tokenize(prompt, state)` (models/tokenizer.py), written out from its steps."""
    cleaned_text = prompt.strip().replace("_", " ").replace("\n", " ")
    discretized_state = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    state_str = " ".join(map(str, discretized_state))
    tokens = sp.encode(f"Task: {cleaned_text}, State: {state_str};\nAction: ", add_bos=True)
    mask = [True] * len(tokens) + [False] * (max_len - len(tokens))
    return np.asarray(tokens + [False] * (max_len - len(tokens))), np.asarray(mask)


def test_pi05_text_prompt_equals_openpi(toks):
    tasks = ["Pick_Up the red cube", "  open the drawer\n", "Put the CAFÉ mug\nin the sink", "push_T 2 times"]
    corpus = [f"Task: {t}, State: 12 255 0 7;\nAction: " for t in tasks] * 4
    text = paligemma_like_tokenizer(corpus)
    sp = spm.SentencePieceProcessor(model_proto=text.model_bytes)
    assert sp.encode("2552", out_type=str) == ["2", "5", "5", "2"]  # digits split, as PaliGemma's
    b = PromptBuilder(text, toks[1], layout="pi05", max_token_len=96, max_text_len=64,
                      vocab_size=text.vocab_size + toks[1].vocab_size, skip_tokens=0)
    rng = np.random.default_rng(3)
    for task in tasks:
        state = rng.uniform(-0.999, 0.999, 7)  # inside [-1, 1): openpi prints the same bins (outside, see README)
        ours = b.build(task, state)
        tokens, mask = openpi_pi05_tokenize(sp, task, state, 64)
        np.testing.assert_array_equal(ours.text_prompt, tokens)
        np.testing.assert_array_equal(ours.text_prompt_mask, mask)
