"""The prompt (docs/DESIGN.md §3): (task, normalized state, normalized action chunk) <-> the six token columns.

Two layouts, named in the manifest:

    pi05 (default), openpi's π0.5 prefix, so a pretrained π0.5 checkpoint sees its own prompt:
        text_prompt      = BOS "Task: {task}, State: {bins};\\nAction: "
        tokenized_prompt = text_prompt FAST_1 ... FAST_k "|" EOS
    fast, π0-FAST's tokenizer (task lower-cased; "Action: " opens the postfix):
        text_prompt      = BOS "Task: {task}, State: {bins};\\n"
        tokenized_prompt = text_prompt "Action: " FAST_1 ... FAST_k "|" EOS

`PromptBuilder` owns the layout, the way openpi's tokenizers own theirs: built once from the two tokenizers and the
manifest's prompt fields, it builds the columns (preprocessing with actions, the Policy without), maps FAST ids to
model ids and back, turns a postfix back into actions, and gives the postfix grammar constrained decoding follows.
Nothing else knows the formula `model id = vocab_size - 1 - skip_tokens - FAST id`.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Bool, Float, Int

from ki_data.fast_tokenizer import FastDecodeError, FastTokenizer
from ki_data.text_tokenizer import TextTokenizer

if TYPE_CHECKING:
    from ki_data.manifest import Manifest

LAYOUTS = ("pi05", "fast")
DEFAULT_LAYOUT = "pi05"
STATE_BINS = 256
ACTION_PREFIX = "Action: "
ACTION_END = "|"
# PaliGemma's tokenizer: FAST ids overlay the top of its vocabulary, skipping its 128 special tokens (openpi).
PALIGEMMA_VOCAB_SIZE = 257152
PALIGEMMA_SKIP_TOKENS = 128


class PromptTooLongError(ValueError):
    """A prompt longer than its fixed length. The caller adds the dataset/episode/frame it came from."""

    def __init__(self, field: str, length: int, limit: int):
        super().__init__(f"{field} needs {length} tokens but its length is {limit}; raise the limit (never truncated)")
        self.field = field
        self.length = length
        self.limit = limit


@dataclasses.dataclass(frozen=True, eq=False)
class PromptTokens:
    tokenized_prompt: Int[np.ndarray, " l"]  # int32
    tokenized_prompt_mask: Bool[np.ndarray, " l"]  # real token
    token_ar_mask: Bool[np.ndarray, " l"]  # True on the postfix (everything after text_prompt): the causal part
    token_loss_mask: Bool[np.ndarray, " l"]  # True on postfix tokens that are targets
    text_prompt: Int[np.ndarray, " t"]  # int32
    text_prompt_mask: Bool[np.ndarray, " t"]
    num_fast_tokens: int
    fast_clipped: int = 0  # FAST coefficients clipped into the tokenizer's range

    @property
    def num_text_tokens(self) -> int:
        return int(self.text_prompt_mask.sum())

    def columns(self) -> dict[str, np.ndarray]:
        """The six shard columns by their docs/DESIGN.md §4 names."""
        return {name: getattr(self, name) for name in COLUMNS}


COLUMNS = ("tokenized_prompt", "tokenized_prompt_mask", "token_ar_mask", "token_loss_mask", "text_prompt",
           "text_prompt_mask")


@dataclasses.dataclass(frozen=True, eq=False)
class PostfixGrammar:
    """The postfix in model ids: `start_ids`, FAST ids summing to horizon x dim coefficients, `end_ids`."""

    start_ids: tuple[int, ...]  # "Action: " under the fast layout; nothing under pi05
    end_ids: tuple[int, ...]  # "|" EOS
    fast_coefficients: Int[np.ndarray, " f"]  # coefficients each FAST id expands to; 0 = never offered
    fast_id_top: int  # model id of FAST id 0: FAST id f is model id fast_id_top - f
    vocab_size: int

    def is_fast(self, model_ids: Int[np.ndarray, "..."] | int) -> Bool[np.ndarray, "..."]:
        ids = np.asarray(model_ids)
        return (ids <= self.fast_id_top) & (ids > self.fast_id_top - len(self.fast_coefficients))

    def fast_ids(self, postfix: Sequence[int] | Int[np.ndarray, " k"]) -> list[int] | None:
        """The FAST ids (FAST vocabulary) of a postfix that is exactly start ids, FAST ids, end ids (then anything:
        padding), else None. Whether they make horizon x dim coefficients is the FAST tokenizer's to say."""
        toks = [int(t) for t in postfix]
        n_start = len(self.start_ids)
        if tuple(toks[:n_start]) != self.start_ids:
            return None
        i = n_start
        while i < len(toks) and self.is_fast(toks[i]):
            i += 1
        if tuple(toks[i : i + len(self.end_ids)]) != self.end_ids:
            return None
        return [self.fast_id_top - t for t in toks[n_start:i]]


def discretize_state(state: Float[np.ndarray, " s"]) -> Int[np.ndarray, " s"]:
    """256 uniform bins over [-1, 1]; values at or beyond the ends fall in bin 0 or 255 (never -1 or 256)."""
    state = np.asarray(state, dtype=np.float64)
    if state.ndim != 1:
        raise ValueError(f"state must be 1-D [state_dim], got shape {state.shape}")
    if not np.isfinite(state).all():
        raise ValueError(f"state has a non-finite value at index {int(np.argmin(np.isfinite(state)))}")
    bins = np.digitize(state, np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]) - 1
    return np.clip(bins, 0, STATE_BINS - 1).astype(np.int64)


def clean_task(task: str, layout: str) -> str:
    """pi05: openpi's π0.5 cleaning (strip, `_` and newlines to spaces, case kept). fast: π0-FAST's (lower-cased),
    plus `\\r` as a line break and Unicode NFC, so composed and decomposed forms agree."""
    if layout == "pi05":
        return task.strip().replace("_", " ").replace("\n", " ")
    text = task.lower()
    for c in ("_", "\r\n", "\n", "\r"):
        text = text.replace(c, " ")
    return unicodedata.normalize("NFC", text.strip())


def prefix_text(task: str, state: Float[np.ndarray, " s"], layout: str) -> str:
    """The text of `text_prompt` without BOS."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown prompt layout {layout!r}; expected one of {LAYOUTS}")
    bins = " ".join(str(b) for b in discretize_state(state))
    text = f"Task: {clean_task(task, layout)}, State: {bins};\n"
    return text + ACTION_PREFIX if layout == "pi05" else text


def vocab_layout(text: TextTokenizer, fast: FastTokenizer) -> tuple[int, int]:
    """(vocab_size, skip_tokens): openpi's overlay on the top of PaliGemma's vocabulary for its tokenizer, else FAST
    ids just above the text ids (vocab_size = text + FAST)."""
    if text.vocab_size == PALIGEMMA_VOCAB_SIZE:
        return PALIGEMMA_VOCAB_SIZE, PALIGEMMA_SKIP_TOKENS
    return text.vocab_size + fast.vocab_size, 0


class PromptBuilder:
    """Builds and reads the token columns of one layout (see the module docstring)."""

    def __init__(
        self,
        text: TextTokenizer,
        fast: FastTokenizer,
        *,
        layout: str,
        max_token_len: int,
        max_text_len: int,
        vocab_size: int,
        skip_tokens: int,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown prompt layout {layout!r}; expected one of {LAYOUTS}")
        self.text, self.fast, self.layout = text, fast, layout
        self.max_token_len, self.max_text_len = max_token_len, max_text_len
        self.vocab_size, self.skip_tokens = vocab_size, skip_tokens
        self.fast_id_top = vocab_size - 1 - skip_tokens
        lowest = self.fast_id_top - (fast.vocab_size - 1)
        if lowest < 0 or self.fast_id_top >= vocab_size:
            raise ValueError(
                f"{fast.vocab_size} FAST ids do not fit below model id {self.fast_id_top} (vocab_size {vocab_size}, "
                f"skip_tokens {skip_tokens}); vocab_size must be at least text vocab + skip_tokens + FAST vocab"
            )
        self.start_ids = tuple(text.encode(ACTION_PREFIX)) if layout == "fast" else ()
        self.end_ids = tuple(text.encode(ACTION_END)) + (text.eos_id,)
        self._grammar = self._make_grammar()

    @classmethod
    def from_manifest(cls, manifest: Manifest, directory: str | Path) -> PromptBuilder:
        """With the tokenizers a shard directory (or a checkpoint, which carries copies) holds."""
        directory = Path(directory)
        return cls(
            TextTokenizer.load(directory / manifest.tokenizers["text"].path),
            FastTokenizer.load(directory / manifest.tokenizers["fast"].path),
            layout=manifest.prompt_layout,
            max_token_len=manifest.max_token_len,
            max_text_len=manifest.max_text_len,
            vocab_size=manifest.vocab_size,
            skip_tokens=manifest.skip_tokens,
        )

    # ------------------------------------------------------------------ building

    def prefix_text(self, task: str, state: Float[np.ndarray, " s"]) -> str:
        return prefix_text(task, state, self.layout)

    def build(
        self,
        task: str,
        state: Float[np.ndarray, " s"],
        actions: Float[np.ndarray, "h d"] | None = None,
        *,
        strict_fast: bool = False,
    ) -> PromptTokens:
        """All six token fields for one frame. actions=None (inference) leaves only the text prefix.

        Raises PromptTooLongError instead of truncating; FAST coefficients beyond the tokenizer's range are clipped
        and counted in `fast_clipped` (or raise with strict_fast=True).
        """
        text = self.text.encode(self.prefix_text(task, state), add_bos=True)
        if len(text) > self.max_text_len:
            raise PromptTooLongError("text_prompt", len(text), self.max_text_len)
        postfix: list[int] = []
        num_fast = clipped = 0
        if actions is not None:
            fast_ids, clipped = self.fast.encode_counted(np.asarray(actions), strict=strict_fast)
            num_fast = len(fast_ids)
            postfix = [*self.start_ids, *self.fast_to_model(fast_ids).tolist(), *self.end_ids]
        total = len(text) + len(postfix)
        if total > self.max_token_len:
            raise PromptTooLongError("tokenized_prompt", total, self.max_token_len)

        pad = self.text.pad_id
        tokenized = np.full(self.max_token_len, pad, dtype=np.int32)
        tokenized[: len(text)] = text
        tokenized[len(text) : total] = postfix
        positions = np.arange(self.max_token_len)
        on_postfix = (positions < total) & (positions >= len(text))
        text_prompt = np.full(self.max_text_len, pad, dtype=np.int32)
        text_prompt[: len(text)] = text
        return PromptTokens(
            tokenized_prompt=tokenized,
            tokenized_prompt_mask=positions < total,
            token_ar_mask=on_postfix.copy(),
            token_loss_mask=on_postfix,
            text_prompt=text_prompt,
            text_prompt_mask=np.arange(self.max_text_len) < len(text),
            num_fast_tokens=num_fast,
            fast_clipped=clipped,
        )

    # ------------------------------------------------------------------ ids

    def fast_to_model(self, fast_ids: Sequence[int] | Int[np.ndarray, "..."]) -> Int[np.ndarray, "..."]:
        """FAST id f -> model id vocab_size - 1 - skip_tokens - f (openpi's mapping; it is its own inverse)."""
        return self.fast_id_top - np.asarray(fast_ids, dtype=np.int64)

    def model_to_fast(self, model_ids: Sequence[int] | Int[np.ndarray, "..."]) -> Int[np.ndarray, "..."]:
        return self.fast_id_top - np.asarray(model_ids, dtype=np.int64)

    def is_fast(self, model_ids: Int[np.ndarray, "..."] | int) -> Bool[np.ndarray, "..."]:
        """Whether each model id falls in the FAST range (with PaliGemma it overlaps rare text ids: ask only of
        postfix positions)."""
        return self._grammar.is_fast(model_ids)

    # ------------------------------------------------------------------ reading a postfix

    def fast_ids_of_postfix(self, postfix: Sequence[int] | Int[np.ndarray, " k"]) -> list[int] | None:
        """The FAST ids of a postfix that follows the grammar (see `PostfixGrammar.fast_ids`), else None."""
        return self._grammar.fast_ids(postfix)

    def postfix_actions(self, postfix: Sequence[int] | Int[np.ndarray, " k"], horizon: int, dim: int) -> Float[np.ndarray, "h d"]:
        """The normalized chunk a postfix encodes; FastDecodeError unless it follows the grammar and decodes to
        exactly horizon x dim coefficients."""
        fast_ids = self.fast_ids_of_postfix(postfix)
        if fast_ids is None:
            raise FastDecodeError(f"the tokens do not follow the postfix grammar {self.describe_grammar()}")
        return self.fast.decode(fast_ids, horizon, dim)

    def decode_actions(
        self, tokens: Int[np.ndarray, "b t"], horizon: int, dim: int
    ) -> tuple[Float[np.ndarray, "b h d"], Bool[np.ndarray, " b"]]:
        """Rows of generated postfix tokens -> (normalized chunks, valid). A row that breaks the grammar or does not
        decode to horizon x dim coefficients is NaN with valid=False, never zeros."""
        tokens = np.asarray(tokens)
        out = np.full((tokens.shape[0], horizon, dim), np.nan, np.float32)
        valid = np.zeros((tokens.shape[0],), bool)
        for r, row in enumerate(tokens):
            try:
                out[r] = self.postfix_actions(row, horizon, dim)
                valid[r] = True
            except FastDecodeError:
                pass
        return out, valid

    def describe_grammar(self) -> str:
        start = repr(ACTION_PREFIX) + " " if self.start_ids else ""
        return f"{start}FAST… {ACTION_END!r} EOS"

    def grammar(self) -> PostfixGrammar:
        """What constrained decoding needs (ki_model.decoding.FastDecodeSpec is built from it)."""
        return self._grammar

    def _make_grammar(self) -> PostfixGrammar:
        counts = np.array(self.fast.token_num_coefficients, np.int32)
        if self.fast.byte_level:
            # A byte-level piece may hold part of a character; only pieces that decode on their own can be
            # concatenated freely, so the others are never offered by constrained decoding.
            for i, c in enumerate(counts):
                try:
                    self.fast.decode_coefficients([i], int(c), 1)
                except FastDecodeError:
                    counts[i] = 0
        return PostfixGrammar(self.start_ids, self.end_ids, counts, self.fast_id_top, self.vocab_size)
