"""The prompt (docs/DESIGN.md §3): (task, normalized state, normalized action chunk) <-> the six token columns.

Two layouts, named in the manifest:

    pi05 (default), openpi's π0.5 prefix, so a pretrained π0.5 checkpoint sees its own prompt:
        text_prompt      = BOS "Task: {task}, State: {bins};\\nAction: "
        tokenized_prompt = text_prompt FAST_1 ... FAST_k "|" EOS
    fast, π0-FAST's tokenizer (task lower-cased; "Action: " opens the postfix):
        text_prompt      = BOS "Task: {task}, State: {bins};\\n"
        tokenized_prompt = text_prompt "Action: " FAST_1 ... FAST_k "|" EOS

`PromptBuilder` owns the layout, the way openpi's tokenizers own theirs: built once from the two tokenizers and the
manifest's prompt fields, it builds the columns (preprocessing with actions, the Policy without) and reads a postfix
back into actions (`read_postfix`: the one route from postfix tokens to actions, for evaluation, inspection and the
preprocessing report). Its `PostfixGrammar` is the FAST id table: FAST id <-> model id <-> coefficients, and the ids
around the FAST ids; constrained decoding (`ki_model.decoding.FastDecodeSpec.from_grammar`) takes that table as it is.
Nothing else knows the formula `model id = vocab_size - 1 - skip_tokens - FAST id`.
"""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Bool, Float, Int

from ki_data.fast_tokenizer import FastDecodeError, FastTokenizer
from ki_data.schema import PROMPT_COLUMNS
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
        """The six shard columns by their docs/DESIGN.md §4 names (`schema.PROMPT_COLUMNS`, the fields above)."""
        return {name: getattr(self, name) for name in PROMPT_COLUMNS}


@dataclasses.dataclass(frozen=True, eq=False)
class PostfixGrammar:
    """The postfix in model ids (`start_ids`, FAST ids summing to horizon x dim coefficients, `end_ids`) and the FAST
    id table: FAST id f is model id `fast_id_top - f` and expands to `fast_coefficients[f]` coefficients.

    Checked on construction: every FAST id is a model id, and no start/end id is also a FAST id (the postfix would be
    ambiguous). Raises ValueError naming the ids otherwise.
    """

    start_ids: tuple[int, ...]  # "Action: " under the fast layout; nothing under pi05
    end_ids: tuple[int, ...]  # "|" EOS
    fast_coefficients: Int[np.ndarray, " f"]  # coefficients each FAST id expands to; 0 = never offered
    fast_id_top: int  # model id of FAST id 0
    vocab_size: int

    def __post_init__(self):
        n, top = len(self.fast_coefficients), self.fast_id_top
        if n == 0 or top - (n - 1) < 0 or top >= self.vocab_size:
            raise ValueError(
                f"{n} FAST ids do not fit below model id {top}: FAST ids take model ids {top - (n - 1)}..{top}, "
                f"which must lie in [0, vocab_size {self.vocab_size})"
            )
        for name, ids in (("start_ids", self.start_ids), ("end_ids", self.end_ids)):
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{name} {list(ids)} outside the vocabulary [0, {self.vocab_size})")
        if not self.end_ids:
            raise ValueError("end_ids is empty: a postfix needs an end (e.g. '|' EOS)")
        clash = [i for i in self.start_ids + self.end_ids if self.is_fast(i)]
        if clash:
            raise ValueError(f"grammar ids {clash} are also FAST ids (model ids {top - (n - 1)}..{top}): the postfix "
                             "would be ambiguous")

    # ------------------------------------------------------------------ the FAST id table

    def fast_to_model(self, fast_ids: Sequence[int] | Int[np.ndarray, "*n"]) -> Int[np.ndarray, "*n"]:
        """FAST id f -> model id fast_id_top - f (openpi's mapping; it is its own inverse)."""
        return self.fast_id_top - np.asarray(fast_ids, dtype=np.int64)

    def model_to_fast(self, model_ids: int | Sequence[int] | Int[np.ndarray, "*n"]) -> Int[np.ndarray, "*n"] | np.integer:
        return self.fast_id_top - np.asarray(model_ids, dtype=np.int64)

    def is_fast(self, model_ids: Int[np.ndarray, "*n"] | int) -> Bool[np.ndarray, "*n"]:
        """Whether each model id falls in the FAST range (with PaliGemma it overlaps rare text ids: ask only of
        postfix positions)."""
        ids = np.asarray(model_ids)
        return np.asarray((ids <= self.fast_id_top) & (ids > self.fast_id_top - len(self.fast_coefficients)))

    @functools.cached_property
    def coefficients_per_model_id(self) -> Int[np.ndarray, " vocab"]:
        """Coefficients each model id expands to; 0 for ids that are not FAST ids (or never offered)."""
        table = np.zeros((self.vocab_size,), np.int32)
        table[self.fast_to_model(np.arange(len(self.fast_coefficients)))] = np.maximum(self.fast_coefficients, 0)
        table.flags.writeable = False
        return table

    # ------------------------------------------------------------------ parsing

    def parse(self, postfix: Sequence[int] | Int[np.ndarray, " k"]) -> tuple[list[int], str | None]:
        """(FAST ids, None) for a postfix that is exactly start ids, FAST ids, end ids (then anything: padding);
        otherwise the FAST ids read before it broke and what broke. Whether the FAST ids make horizon x dim
        coefficients is the FAST tokenizer's to say."""
        toks = [int(t) for t in postfix]
        n_start = len(self.start_ids)
        if tuple(toks[:n_start]) != self.start_ids:
            return [], f"does not start with {list(self.start_ids)}"
        i = n_start
        while i < len(toks) and self.is_fast(toks[i]):
            i += 1
        fast_ids = self.model_to_fast(toks[n_start:i]).tolist()
        after = toks[i : i + len(self.end_ids)]
        if tuple(after) != self.end_ids:
            return fast_ids, f"the {i - n_start} FAST ids are followed by {after}, not {list(self.end_ids)}"
        return fast_ids, None

    def fast_ids(self, postfix: Sequence[int] | Int[np.ndarray, " k"]) -> list[int] | None:
        """The FAST ids of a postfix that follows the grammar, else None."""
        fast_ids, broken = self.parse(postfix)
        return None if broken else fast_ids


@dataclasses.dataclass(frozen=True, eq=False)
class PostfixReading:
    """What a postfix says: its FAST ids and the normalized chunk they decode to, or why there is no chunk."""

    fast_ids: list[int]  # the FAST ids (those read before the grammar broke, if it did)
    actions: Float[np.ndarray, "h d"] | None  # normalized; None exactly when `error` says why
    error: str | None


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
        if text.vocab_size > vocab_size:
            raise ValueError(f"the text tokenizer's {text.vocab_size} ids do not fit in vocab_size {vocab_size}")
        self.start_ids = tuple(text.encode(ACTION_PREFIX)) if layout == "fast" else ()
        self.end_ids = tuple(text.encode(ACTION_END)) + (text.eos_id,)
        self._grammar = self._make_grammar()

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, directory: str | Path, *, tokenizers: tuple[TextTokenizer, FastTokenizer] | None = None
    ) -> PromptBuilder:
        """With the tokenizers a shard directory (or a checkpoint, which carries copies) holds; `tokenizers`: those
        two already loaded."""
        directory = Path(directory)
        text, fast = tokenizers or (TextTokenizer.load(directory / manifest.tokenizers["text"].path),
                                    FastTokenizer.load(directory / manifest.tokenizers["fast"].path))
        return cls(
            text,
            fast,
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

    # ------------------------------------------------------------------ ids (the grammar's table)

    def fast_to_model(self, fast_ids: Sequence[int] | Int[np.ndarray, "*n"]) -> Int[np.ndarray, "*n"]:
        return self._grammar.fast_to_model(fast_ids)

    def model_to_fast(self, model_ids: int | Sequence[int] | Int[np.ndarray, "*n"]) -> Int[np.ndarray, "*n"] | np.integer:
        return self._grammar.model_to_fast(model_ids)

    def is_fast(self, model_ids: Int[np.ndarray, "*n"] | int) -> Bool[np.ndarray, "*n"]:
        return self._grammar.is_fast(model_ids)

    # ------------------------------------------------------------------ reading a postfix

    def read_postfix(self, postfix: Sequence[int] | Int[np.ndarray, " k"], horizon: int, dim: int) -> PostfixReading:
        """The one route from postfix tokens (model ids, padding after the end allowed) to a normalized chunk: the
        grammar's FAST ids, decoded by the FAST tokenizer into exactly horizon x dim values, or the reason not."""
        fast_ids, broken = self._grammar.parse(postfix)
        if broken:
            return PostfixReading(fast_ids, None, f"the tokens break the postfix grammar {self.describe_grammar()}: "
                                                  f"{broken}")
        try:
            return PostfixReading(fast_ids, self.fast.decode(fast_ids, horizon, dim), None)
        except FastDecodeError as err:
            return PostfixReading(fast_ids, None, str(err))

    def fast_ids_of_postfix(self, postfix: Sequence[int] | Int[np.ndarray, " k"]) -> list[int] | None:
        """The FAST ids of a postfix that follows the grammar, else None."""
        return self._grammar.fast_ids(postfix)

    def postfix_actions(self, postfix: Sequence[int] | Int[np.ndarray, " k"], horizon: int, dim: int) -> Float[np.ndarray, "h d"]:
        """`read_postfix`'s chunk; FastDecodeError saying why there is none."""
        reading = self.read_postfix(postfix, horizon, dim)
        if reading.error is not None:
            raise FastDecodeError(reading.error)
        return reading.actions

    def decode_actions(
        self, tokens: Int[np.ndarray, "b t"], horizon: int, dim: int
    ) -> tuple[Float[np.ndarray, "b h d"], Bool[np.ndarray, " b"]]:
        """Rows of generated postfix tokens -> (normalized chunks, valid). A row without a chunk (`read_postfix`) is
        NaN with valid=False, never zeros."""
        tokens = np.asarray(tokens)
        out = np.full((tokens.shape[0], horizon, dim), np.nan, np.float32)
        valid = np.zeros((tokens.shape[0],), bool)
        for r, row in enumerate(tokens):
            reading = self.read_postfix(row, horizon, dim)
            if reading.error is None:
                out[r], valid[r] = reading.actions, True
        return out, valid

    def describe_grammar(self) -> str:
        start = repr(ACTION_PREFIX) + " " if self.start_ids else ""
        return f"{start}FAST… {ACTION_END!r} EOS"

    def grammar(self) -> PostfixGrammar:
        """The postfix grammar and FAST id table (ki_model.decoding.FastDecodeSpec is built from it)."""
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
        # The one place the id formula is written (docs/DESIGN.md §3).
        fast_id_top = self.vocab_size - 1 - self.skip_tokens
        return PostfixGrammar(self.start_ids, self.end_ids, counts, fast_id_top, self.vocab_size)
