import io

import numpy as np
import pytest
import sentencepiece as spm

from ki_data import TextTokenizer
from ki_data.prompt import prefix_text

TASKS = ["push the T block onto the target", "pick up the red cube", "open the drawer", "Put_the_CUP\nin the sink"]


@pytest.fixture(scope="module")
def trained():
    return TextTokenizer.train(TASKS, vocab_size=600)


def test_paligemma_id_convention(trained):
    assert (trained.pad_id, trained.eos_id, trained.bos_id, trained.unk_id) == (0, 1, 2, 3)
    assert trained.id_to_piece(0) == "<pad>" and trained.id_to_piece(1) == "</s>" and trained.id_to_piece(2) == "<s>"
    ids = trained.encode("open", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1


@pytest.mark.parametrize(
    "text",
    [
        "Task: open the drawer, State: 0 12 255;\n",
        "  two  spaces and trailing  ",
        "tabs\tand\nnew\n\nlines\r\n",
        "Ünïcödé 漢字 🤖 never seen in training",
        " leading space",
    ],
)
def test_round_trip_keeps_text_exactly(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.unk_id not in ids  # byte fallback, never unk


def test_concatenation_is_stable(trained):
    # No dummy prefix: encoding pieces separately gives the same text as encoding them together.
    a, b = trained.encode("Action: "), trained.encode("|")
    assert trained.decode(a + b) == "Action: |"


def test_state_numbers_are_compact(trained):
    text = prefix_text("open the drawer", np.linspace(-1, 1, 8), "pi05")
    pieces = [trained.id_to_piece(i) for i in trained.encode(text)]
    bins = text.split("State: ")[1].split(";")[0].split(" ")
    for b in bins[1:]:  # every number after the first follows a space: one piece "▁N"
        assert "▁" + b in pieces


def test_training_is_deterministic(trained):
    again = TextTokenizer.train(TASKS, vocab_size=600)
    assert again.model_bytes == trained.model_bytes


def test_small_corpus_and_small_vocab_train():
    tok = TextTokenizer.train(["a"], vocab_size=10)  # raised to what sentencepiece accepts
    assert tok.vocab_size >= 260
    assert tok.decode(tok.encode("Task: a, State: 3;\n")) == "Task: a, State: 3;\n"


def test_save_load(trained, tmp_path):
    trained.save(tmp_path / "text.model")
    loaded = TextTokenizer.load(tmp_path / "text.model")
    assert loaded.model_bytes == trained.model_bytes
    assert loaded.encode(TASKS[0]) == trained.encode(TASKS[0])
    assert loaded.vocab_size == trained.vocab_size and loaded.sha256 == trained.sha256


def test_load_any_sentencepiece_model(tmp_path):
    # A model made with sentencepiece's defaults (unigram, nmt normalization, its own ids) loads as well.
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TASKS * 20), model_writer=out, vocab_size=30, minloglevel=2, num_threads=1
    )
    (tmp_path / "other.model").write_bytes(out.getvalue())
    tok = TextTokenizer.load(tmp_path / "other.model")
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "other.model"))
    assert tok.encode("open the drawer") == ref.encode("open the drawer")
    assert tok.vocab_size == 30 and tok.eos_id == ref.eos_id()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        TextTokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        TextTokenizer.load(tmp_path / "junk.model")
    with pytest.raises(TypeError):
        TextTokenizer.train("just one string", vocab_size=300)


def test_split_digits_writes_numbers_digit_by_digit():
    tok = TextTokenizer.train(TASKS, vocab_size=600, split_digits=True)
    text = "Task: open the drawer, State: 217 124;\n"
    pieces = [tok.id_to_piece(i) for i in tok.encode(text)]
    assert [p for p in pieces if p.strip("▁").isdigit()] == ["2", "1", "7", "1", "2", "4"]
    assert tok.decode(tok.encode(text)) == text
