"""Prompt building (DESIGN §3): (task, normalized state, normalized action chunk) -> the six token columns.

    text_prompt      = BOS "Task: {task}, State: {s_1 ... s_n};\\n"
    tokenized_prompt = text_prompt "Action: " FAST_1 ... FAST_k "|" EOS

The same `build_prompt` serves preprocessing (with actions) and the inference policy (actions=None), so the prefix
the action expert reads is built by one piece of code.
"""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
from jaxtyping import Bool, Float, Int

from ki_data.fast_tokenizer import FastTokenizer
from ki_data.text_tokenizer import TextTokenizer

STATE_BINS = 256
ACTION_PREFIX = "Action: "
ACTION_END = "|"


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
    token_ar_mask: Bool[np.ndarray, " l"]  # True on the postfix ("Action: " ... EOS): the causal part
    token_loss_mask: Bool[np.ndarray, " l"]  # True on postfix tokens that are targets
    text_prompt: Int[np.ndarray, " t"]  # int32
    text_prompt_mask: Bool[np.ndarray, " t"]
    num_fast_tokens: int

    @property
    def num_text_tokens(self) -> int:
        return int(self.text_prompt_mask.sum())

    def columns(self) -> dict[str, np.ndarray]:
        """The six shard columns by their DESIGN §4 names."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "num_fast_tokens"}


def clean_task(task: str) -> str:
    """Lower-case, `_` and line breaks to spaces, strip, Unicode NFC (composed and decomposed forms agree)."""
    text = task.lower()
    for c in ("_", "\r\n", "\n", "\r"):
        text = text.replace(c, " ")
    return unicodedata.normalize("NFC", text.strip())


def discretize_state(state: Float[np.ndarray, " s"]) -> Int[np.ndarray, " s"]:
    """256 uniform bins over [-1, 1]; values at or beyond the ends fall in bin 0 or 255 (never -1 or 256)."""
    state = np.asarray(state, dtype=np.float64)
    if state.ndim != 1:
        raise ValueError(f"state must be 1-D [state_dim], got shape {state.shape}")
    if not np.isfinite(state).all():
        raise ValueError(f"state has a non-finite value at index {int(np.argmin(np.isfinite(state)))}")
    bins = np.digitize(state, np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]) - 1
    return np.clip(bins, 0, STATE_BINS - 1).astype(np.int64)


def format_text_prompt(task: str, state: Float[np.ndarray, " s"]) -> str:
    """The text of the prefix (without BOS): "Task: {task}, State: {bins};\\n"."""
    bins = " ".join(str(b) for b in discretize_state(state))
    return f"Task: {clean_task(task)}, State: {bins};\n"


def fast_to_model_ids(ids: Int[np.ndarray, " k"] | list[int], vocab_size: int, skip_tokens: int) -> Int[np.ndarray, " k"]:
    """FAST id f -> model id vocab_size - 1 - skip_tokens - f (openpi's mapping; its own inverse)."""
    return vocab_size - 1 - skip_tokens - np.asarray(ids, dtype=np.int64)


def model_to_fast_ids(ids: Int[np.ndarray, " k"] | list[int], vocab_size: int, skip_tokens: int) -> Int[np.ndarray, " k"]:
    return vocab_size - 1 - skip_tokens - np.asarray(ids, dtype=np.int64)


def model_vocab_size(text_tokenizer: TextTokenizer, fast_tokenizer: FastTokenizer, skip_tokens: int = 0) -> int:
    """Model vocabulary where FAST ids sit just above the text ids: text_vocab + skip_tokens + fast_vocab.

    (With PaliGemma's tokenizer openpi instead overlays FAST on the top of the text vocabulary: vocab_size=257152,
    skip_tokens=128; pass those to build_prompt directly.)
    """
    return text_tokenizer.vocab_size + skip_tokens + fast_tokenizer.vocab_size


def postfix_pieces(text_tokenizer: TextTokenizer) -> tuple[list[int], list[int]]:
    """(ids of "Action: ", ids of "|" followed by EOS): the fixed parts around the FAST ids."""
    return text_tokenizer.encode(ACTION_PREFIX), text_tokenizer.encode(ACTION_END) + [text_tokenizer.eos_id]


def build_prompt(
    task: str,
    state: Float[np.ndarray, " s"],
    actions: Float[np.ndarray, "h d"] | None,
    *,
    text_tokenizer: TextTokenizer,
    fast_tokenizer: FastTokenizer | None,
    max_token_len: int,
    max_text_len: int,
    vocab_size: int,
    skip_tokens: int,
    strict_fast: bool = False,
) -> PromptTokens:
    """All six token fields for one frame. actions=None (inference) leaves only the text prefix.

    Raises PromptTooLongError instead of truncating; FAST values beyond the tokenizer's range are clipped and
    counted on `fast_tokenizer.out_of_range_count` (or raise with strict_fast=True).
    """
    text = text_tokenizer.encode(format_text_prompt(task, state), add_bos=True)
    if len(text) > max_text_len:
        raise PromptTooLongError("text_prompt", len(text), max_text_len)

    postfix: list[int] = []
    num_fast = 0
    if actions is not None:
        if fast_tokenizer is None:
            raise ValueError("build_prompt: actions given but no fast_tokenizer")
        fast_ids = fast_tokenizer.encode(np.asarray(actions), strict=strict_fast)
        num_fast = len(fast_ids)
        model_ids = fast_to_model_ids(fast_ids, vocab_size, skip_tokens)
        if num_fast and (model_ids.min() < 0 or model_ids.max() >= vocab_size):
            raise ValueError(
                f"FAST ids map outside the model vocabulary [0, {vocab_size}) with skip_tokens={skip_tokens}; "
                f"vocab_size must be at least text vocab + skip_tokens + FAST vocab ({fast_tokenizer.vocab_size})"
            )
        prefix_ids, end_ids = postfix_pieces(text_tokenizer)
        postfix = prefix_ids + model_ids.tolist() + end_ids

    total = len(text) + len(postfix)
    if total > max_token_len:
        raise PromptTooLongError("tokenized_prompt", total, max_token_len)

    pad = text_tokenizer.pad_id
    tokenized = np.full(max_token_len, pad, dtype=np.int32)
    tokenized[: len(text)] = text
    tokenized[len(text) : total] = postfix
    real = np.arange(max_token_len) < total
    on_postfix = real & (np.arange(max_token_len) >= len(text))
    text_prompt = np.full(max_text_len, pad, dtype=np.int32)
    text_prompt[: len(text)] = text
    return PromptTokens(
        tokenized_prompt=tokenized,
        tokenized_prompt_mask=real,
        token_ar_mask=on_postfix.copy(),
        token_loss_mask=on_postfix,
        text_prompt=text_prompt,
        text_prompt_mask=np.arange(max_text_len) < len(text),
        num_fast_tokens=num_fast,
    )
