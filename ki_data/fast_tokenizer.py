"""FAST action tokenizer: DCT over time, scale and round, BPE over the integer stream (docs/DESIGN.md §3).

A chunk [h, d] becomes h*d integer DCT coefficients, flattened frequency-major (row-major of the [h, d]
coefficient matrix: every dimension's lowest frequency first). Each integer v is written as the character
chr(v - min_token) and a BPE model from the `tokenizers` library compresses the string.

Two flavours share one class, told apart by the `tokenizer.json` they come with:

* ours (`FastTokenizer.fit`): a plain BPE with no normalizer, pre-tokenizer or byte-level step, whose initial
  alphabet is every value of [min_token, max_token]. Every in-range value has a token, so every chunk round-trips
  to exactly h*d coefficients; values beyond the range are clipped and counted (or rejected with strict=True).
  Its decoder concatenates the pieces (`tokenizers.decoders.Fuse`), so the published processor's path
  (transformers' `PreTrainedTokenizerFast.decode`, then `ord(c) + min_token`) gives exactly our coefficients;
  without a decoder the library would join pieces with spaces. Directories saved before we wrote one get it on load.
  The published processor's encode gives our ids for chunks within the range; it clips only below min_token, so a
  value above max_token (which we clip and count) is dropped there.
* the published `physical-intelligence/fast` layout: a byte-level BPE (GPT-2 style) over the same characters.
  Loading it reproduces its ids; because its fit gave the trainer raw characters as the initial alphabet, some
  values have no token at all, and such an encoding is refused (`FastEncodeError`) instead of losing coefficients.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import scipy.fft
import tokenizers
from jaxtyping import Float, Int
from tokenizers import decoders, models, trainers

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
# Read by transformers when it opens the directory (AutoTokenizer, as the published processor's from_pretrained does).
TOKENIZER_CONFIG = "tokenizer_config.json"
PROCESSOR_CLASS = "UniversalActionProcessor"
# Written into our processor_config.json so a reader can tell our fits from the published one.
KI_FORMAT = "ki-fast-v1"


class FastDecodeError(ValueError):
    """A FAST id sequence that does not decode to exactly horizon * dim coefficients."""

    def __init__(self, message: str, *, found: int | None = None, expected: int | None = None):
        super().__init__(message)
        self.found = found
        self.expected = expected


class FastEncodeError(ValueError):
    """A chunk that cannot be encoded without losing coefficients (out of range with strict=True, or no token)."""


def dct_coefficients(chunk: Float[np.ndarray, "*b h d"], scale: float) -> Int[np.ndarray, "*b h d"]:
    """Orthonormal DCT-II over time for each dimension, times `scale`, rounded (half to even, like np.around)."""
    chunk = np.asarray(chunk, dtype=np.float64)
    return np.around(scipy.fft.dct(chunk, type=2, axis=-2, norm="ortho") * scale).astype(np.int64)


def chunk_from_coefficients(coefficients: Int[np.ndarray, "*b h d"], scale: float) -> Float[np.ndarray, "*b h d"]:
    """Inverse of `dct_coefficients` up to rounding: per-coefficient error <= 0.5/scale, so RMS error <= 0.5/scale."""
    return scipy.fft.idct(np.asarray(coefficients, dtype=np.float64) / scale, type=2, axis=-2, norm="ortho")


def _byte_level_table() -> dict[str, int]:
    """Character -> byte of the GPT-2 byte-level alphabet used by `tokenizers.pre_tokenizers.ByteLevel`.

    Printable Latin-1 bytes stand for themselves; the remaining 68 bytes, in byte order, are shifted to U+0100...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in set(printable)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(rest)})
    return table


def _is_byte_level(tokenizer: tokenizers.Tokenizer) -> bool:
    spec = json.loads(tokenizer.to_str())

    def mentions(node: object) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(mentions(v) for v in node.values())
        if isinstance(node, list):
            return any(mentions(v) for v in node)
        return False

    return mentions(spec.get("pre_tokenizer")) or mentions(spec.get("decoder"))


class FastTokenizer:
    """Encode action chunks [h, d] into FAST ids and back. Build with `fit` or `load`."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        scale: float,
        min_token: int,
        max_token: int | None,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        extra_config: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.scale = float(scale)
        self.min_token = int(min_token)
        # None for the published tokenizer: its config does not record a top of range.
        self.max_token = None if max_token is None else int(max_token)
        self.time_horizon = time_horizon
        self.action_dim = action_dim
        self.byte_level = _is_byte_level(tokenizer)
        if not self.byte_level and tokenizer.decoder is None:
            # Pieces are runs of coefficient characters: decoding must concatenate them, never insert spaces.
            tokenizer.decoder = decoders.Fuse()
        self.extra_config = dict(extra_config or {})

        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        pieces = [tokenizer.id_to_token(i) for i in range(self.vocab_size)]
        if any(p is None for p in pieces):
            raise ValueError("FAST tokenizer.json has gaps in its id range; expected ids 0..vocab_size-1")
        self._pieces: list[str] = pieces
        if self.byte_level:
            table = _byte_level_table()
            # Like the library's ByteLevel decoder: a piece with a character outside the byte-level alphabet (the
            # published fit adds raw characters as its initial alphabet) stands for its own UTF-8 bytes. Encode
            # never produces such ids; a model might.
            self._piece_bytes: list[bytes] = [
                bytes(table[c] for c in p) if all(c in table for c in p) else p.encode("utf-8") for p in pieces
            ]
            counts = [sum((x & 0xC0) != 0x80 for x in b) for b in self._piece_bytes]
        else:
            counts = [len(p) for p in pieces]
        # How many coefficients each id expands to (for constrained decoding). Byte-level: the characters that
        # start inside the piece (its non-continuation UTF-8 bytes), so a piece may complete the previous one's.
        self.token_num_coefficients: Int[np.ndarray, " v"] = np.asarray(counts, dtype=np.int32)

    # ----------------------------------------------------------------------------------------------- fit

    @classmethod
    def fit(
        cls,
        chunks: Float[np.ndarray, "n h d"],
        vocab_size: int = 1024,
        scale: float = 10.0,
        *,
        margin: float = 0.1,
        cover: float = 1.0,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> FastTokenizer:
        """Train the BPE on the coefficient streams of `chunks` (normalized action chunks [n, h, d]).

        Every value of the range [min_token, max_token] gets a token. The range is the union of the data's
        [min, max] widened on each side by `margin` times its width, and of what any chunk within [-cover, cover]
        can produce (|coefficient| <= sqrt(h) * cover * scale, orthonormal DCT), so held-out chunks rarely clip.
        If `vocab_size` cannot hold that, the widening shrinks (with a warning); a `vocab_size` smaller than the
        data's own range is an error, since a value without a token would be lost.
        """
        chunks = np.asarray(chunks, dtype=np.float64)
        if chunks.ndim != 3 or chunks.shape[0] == 0 or chunks.shape[1] == 0 or chunks.shape[2] == 0:
            raise ValueError(f"FastTokenizer.fit expects chunks shaped [n>0, horizon>0, dim>0], got {chunks.shape}")
        if not np.isfinite(chunks).all():
            bad = np.argwhere(~np.isfinite(chunks))[0]
            raise ValueError(f"FastTokenizer.fit: non-finite action value in chunk {bad[0]}, step {bad[1]}, dim {bad[2]}")
        if scale <= 0:
            raise ValueError(f"FastTokenizer.fit: scale must be > 0, got {scale}")
        _, horizon, dim = chunks.shape
        streams = dct_coefficients(chunks, scale).reshape(len(chunks), horizon * dim)
        lo, hi = int(streams.min()), int(streams.max())
        data_values = hi - lo + 1
        if data_values >= 0xD800:  # characters from U+D800 on are UTF-16 surrogates, not encodable text
            raise ValueError(f"FAST fit: {data_values} coefficient values at scale {scale} is too many; lower the scale")
        if data_values > vocab_size:
            raise ValueError(
                f"FAST vocab_size {vocab_size} cannot hold the {data_values} coefficient values in "
                f"[{lo}, {hi}] (scale {scale}); use vocab_size >= {data_values} or a smaller scale"
            )
        pad = math.ceil(max(margin, 0.0) * (hi - lo))
        bound = math.ceil(math.sqrt(horizon) * max(cover, 0.0) * scale)
        below, above = lo - min(lo - pad, -bound), max(hi + pad, bound) - hi
        room = vocab_size - data_values
        if below + above > room:
            logger.warning(
                "FAST fit: vocab_size %d leaves room for %d values beyond the data range [%d, %d], not %d; "
                "held-out chunks may need clipping",
                vocab_size, room, lo, hi, below + above,
            )
            below = min(below, room // 2)
            above = min(above, room - below)
        min_token, max_token = lo - below, hi + above

        alphabet = [chr(i) for i in range(max_token - min_token + 1)]
        tokenizer = tokenizers.Tokenizer(models.BPE(unk_token=None))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[],
            initial_alphabet=alphabet,
            limit_alphabet=len(alphabet),
            max_token_length=horizon * dim,
            show_progress=show_progress,
        )
        tokenizer.train_from_iterator((_to_chars(s - min_token) for s in streams), trainer=trainer, length=len(streams))
        missing = [i for i, c in enumerate(alphabet) if tokenizer.token_to_id(c) is None]
        if missing:  # would mean a value that silently loses its coefficient: refuse.
            raise RuntimeError(f"FAST fit: {len(missing)} alphabet values got no token (first: {missing[0] + min_token})")
        return cls(
            tokenizer, scale=scale, min_token=min_token, max_token=max_token, time_horizon=horizon, action_dim=dim
        )

    # -------------------------------------------------------------------------------------------- encode

    def coefficients(self, chunk: Float[np.ndarray, "h d"]) -> Int[np.ndarray, "h d"]:
        """The rounded, scaled DCT coefficients of one chunk (before any range clipping)."""
        chunk = np.asarray(chunk)
        if chunk.ndim != 2 or chunk.shape[0] == 0 or chunk.shape[1] == 0:
            raise ValueError(f"FAST encode expects one chunk shaped [horizon, dim], got {chunk.shape}")
        if not np.isfinite(chunk).all():
            step, d = np.argwhere(~np.isfinite(chunk))[0]
            raise ValueError(f"FAST encode: non-finite action value at step {step}, dim {d}")
        if self.action_dim is not None and chunk.shape[1] != self.action_dim:
            raise ValueError(f"FAST encode: chunk has dim {chunk.shape[1]}, tokenizer was fit on dim {self.action_dim}")
        return dct_coefficients(chunk, self.scale)

    def encode(self, chunk: Float[np.ndarray, "h d"], *, strict: bool = False) -> list[int]:
        """FAST ids of one chunk. Out-of-range coefficients are clipped (see `encode_counted`), or raise with strict."""
        return self.encode_counted(chunk, strict=strict)[0]

    def encode_counted(self, chunk: Float[np.ndarray, "h d"], *, strict: bool = False) -> tuple[list[int], int]:
        """(FAST ids of one chunk, how many of its coefficients were clipped into [min_token, max_token])."""
        stream, clipped = self._clip(self.coefficients(chunk).reshape(-1), strict=strict)
        text = _to_chars(stream - self.min_token)
        ids = self.tokenizer.encode(text).ids
        self._check_lossless(ids, text)
        return ids, clipped

    def encode_batch(self, chunks: Float[np.ndarray, "n h d"], *, strict: bool = False) -> list[list[int]]:
        """`encode` over many chunks, with the tokenizer's parallel batch path."""
        texts = [_to_chars(self._clip(self.coefficients(c).reshape(-1), strict=strict)[0] - self.min_token)
                 for c in chunks]
        out = [e.ids for e in self.tokenizer.encode_batch(texts)]
        for ids, text in zip(out, texts, strict=True):
            self._check_lossless(ids, text)
        return out

    def _clip(self, stream: Int[np.ndarray, " n"], *, strict: bool) -> tuple[Int[np.ndarray, " n"], int]:
        hi = np.iinfo(np.int64).max if self.max_token is None else self.max_token
        outside = int(np.count_nonzero((stream < self.min_token) | (stream > hi)))
        if outside:
            if strict:
                raise FastEncodeError(
                    f"FAST encode: {outside} of {stream.size} coefficients outside the fitted range "
                    f"[{self.min_token}, {self.max_token}] (values {stream.min()}..{stream.max()})"
                )
            stream = np.clip(stream, self.min_token, hi)
        return stream, outside

    def _check_lossless(self, ids: list[int], text: str) -> None:
        decoded = self._ids_to_text(ids)
        if decoded != text:
            raise FastEncodeError(
                f"FAST encode: the tokenizer dropped or changed coefficients ({len(text)} in, {len(decoded)} out); "
                f"this tokenizer has no token for some values (published byte-level fits do this)"
            )

    # -------------------------------------------------------------------------------------------- decode

    def _ids_to_text(self, ids: list[int] | Int[np.ndarray, " k"]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise FastDecodeError(f"FAST decode: id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        if not self.byte_level:
            return "".join(self._pieces[i] for i in ids)
        raw = b"".join(self._piece_bytes[i] for i in ids)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FastDecodeError(f"FAST decode: ids do not form valid UTF-8 coefficient characters ({e.reason})") from e

    def decode_coefficients(
        self, ids: list[int] | Int[np.ndarray, " k"], horizon: int | None = None, dim: int | None = None
    ) -> Int[np.ndarray, "h d"]:
        """The integer coefficient matrix the ids stand for; FastDecodeError unless there are exactly h*d."""
        horizon = horizon or self.time_horizon
        dim = dim or self.action_dim
        if horizon is None or dim is None:
            raise ValueError("FAST decode needs horizon and dim (this tokenizer's config does not record them)")
        text = self._ids_to_text(ids)
        expected = horizon * dim
        if len(text) != expected:
            raise FastDecodeError(
                f"FAST decode: {len(ids)} ids give {len(text)} coefficients, expected {expected} "
                f"(horizon {horizon} x dim {dim})",
                found=len(text),
                expected=expected,
            )
        values = np.fromiter((ord(c) for c in text), dtype=np.int64, count=expected) + self.min_token
        return values.reshape(horizon, dim)

    def decode(
        self, ids: list[int] | Int[np.ndarray, " k"], horizon: int | None = None, dim: int | None = None
    ) -> Float[np.ndarray, "h d"]:
        """The action chunk [horizon, dim] (float64); FastDecodeError unless the ids give exactly h*d coefficients."""
        return chunk_from_coefficients(self.decode_coefficients(ids, horizon, dim), self.scale)

    # --------------------------------------------------------------------------------------- save / load

    def config(self) -> dict:
        """The processor_config.json contents (published keys plus ours)."""
        cfg = dict(self.extra_config)
        cfg.update(
            processor_class=PROCESSOR_CLASS,
            scale=self.scale,
            vocab_size=self.vocab_size,
            min_token=self.min_token,
            max_token=self.max_token,
            time_horizon=self.time_horizon,
            action_dim=self.action_dim,
        )
        if not self.byte_level:
            cfg["format"] = KI_FORMAT
        return cfg

    def save(self, directory: str | os.PathLike) -> None:
        """Write processor_config.json, tokenizer.json and tokenizer_config.json (the published FAST layout, less
        its code) into `directory`.

        tokenizer_config.json turns transformers' `clean_up_tokenization_spaces` off, as the published fit does: the
        clean-up deletes the space before ".", ",", "!", "?" and some apostrophes, and here a space is a coefficient.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / TOKENIZER_FILE, self.tokenizer.to_str(pretty=True))
        tokenizer_config = {"clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}
        _atomic_write(directory / TOKENIZER_CONFIG, json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
        _atomic_write(directory / PROCESSOR_CONFIG, json.dumps(self.config(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FastTokenizer:
        """Open a directory written by `save`, or a local copy of the published physical-intelligence/fast."""
        directory = Path(directory)
        for name in (PROCESSOR_CONFIG, TOKENIZER_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"FAST tokenizer directory {directory} has no {name}")
        cfg = json.loads((directory / PROCESSOR_CONFIG).read_text())
        missing = [k for k in ("scale", "min_token") if cfg.get(k) is None]
        if missing:
            raise ValueError(f"{directory / PROCESSOR_CONFIG} lacks {', '.join(missing)}")
        tokenizer = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        known = {"processor_class", "scale", "vocab_size", "min_token", "max_token", "time_horizon", "action_dim", "format"}
        return cls(
            tokenizer,
            scale=cfg["scale"],
            min_token=cfg["min_token"],
            max_token=cfg.get("max_token"),
            time_horizon=cfg.get("time_horizon"),
            action_dim=cfg.get("action_dim"),
            extra_config={k: v for k, v in cfg.items() if k not in known},
        )

    def __repr__(self) -> str:
        kind = "byte-level (published)" if self.byte_level else "ki"
        return (
            f"FastTokenizer({kind}, vocab_size={self.vocab_size}, scale={self.scale}, "
            f"range=[{self.min_token}, {self.max_token}], horizon={self.time_horizon}, dim={self.action_dim})"
        )


def _to_chars(values: Int[np.ndarray, " n"]) -> str:
    return "".join(map(chr, values.tolist()))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
