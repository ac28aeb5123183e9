"""Text tokenizer: a SentencePiece model, either the user's (PaliGemma's tokenizer.model) or a small one trained here.

The trained model follows PaliGemma's conventions so the two are interchangeable: ids pad=0, eos=1, bos=2, unk=3,
identity normalization (spaces, tabs and newlines kept exactly, no dummy prefix), byte fallback (any text encodes,
nothing maps to unk). Training is deterministic: the same texts give the same model bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

logger = logging.getLogger(__name__)

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
_NUM_SPECIAL = 4
_NUM_BYTE_PIECES = 256

# Added to every training corpus so the prompt template and the state bins (0..255, docs/DESIGN.md §3) get compact pieces
# even when the caller passes bare task strings.
_TEMPLATE_TEXTS: tuple[str, ...] = (
    *("Task: , State: ;\n" for _ in range(8)),
    *("Action: |" for _ in range(8)),
    *(" " + " ".join(str(i) for i in range(256)) for _ in range(16)),
)


class TextTokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor` holding the model bytes it was built from."""

    def __init__(self, model_bytes: bytes):
        self.model_bytes = bytes(model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """Open any SentencePiece .model file (e.g. PaliGemma's tokenizer.model, or one written by `save`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer model {path} does not exist")
        try:
            return cls(path.read_bytes())
        except RuntimeError as e:  # sentencepiece reports a bad proto as RuntimeError
            raise ValueError(f"{path} is not a SentencePiece model: {e}") from e

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int = 1024, *, split_digits: bool = False) -> TextTokenizer:
        """Train a small BPE SentencePiece model on `texts` (e.g. the dataset's prompts or tasks).

        split_digits: every digit its own piece, as in PaliGemma's tokenizer, so that a state bin is written with the
        ten digit tokens (compositional) rather than as one of 256 unrelated pieces.

        `vocab_size` is a soft limit: it is raised to the minimum SentencePiece accepts (4 specials + 256 byte
        pieces + every distinct character) and the result may be smaller when the corpus has fewer merges.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("TextTokenizer.train expects a list of strings")
        corpus = [t for t in texts if t] + list(_TEMPLATE_TEXTS)
        chars = {c for t in corpus for c in t}
        minimum = _NUM_SPECIAL + _NUM_BYTE_PIECES + len(chars)
        if vocab_size < minimum:
            logger.info("text tokenizer: vocab_size %d raised to %d (specials + bytes + characters)", vocab_size, minimum)
            vocab_size = minimum
        out = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_writer=out,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type="bpe",
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            max_sentence_length=1 << 20,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,  # one thread: same input, same model bytes
            minloglevel=2,
        )
        return cls(out.getvalue())

    def save(self, path: str | os.PathLike) -> None:
        """Write the .model file (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.model_bytes)
        os.replace(tmp, path)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int | np.integer) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        # A model without a pad piece pads with 0; padded positions are masked out anyway.
        return max(self._sp.pad_id(), 0)

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"
