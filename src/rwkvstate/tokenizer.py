"""Tokenizers for RWKV-7 models.

Two vocabularies are supported:

* ``"world"``: the RWKV world vocabulary (``rwkv_vocab_v20230424.txt``),
  65536 ids of which 1..65529 are tokens and 0 is end-of-text.  Encoding
  goes through the Rust ``pyrwkv_tokenizer`` package (greedy longest match
  over UTF-8 bytes, verified id-for-id against the reference trie tokenizer
  of the official ``rwkv`` package).  Decoding uses our own id->bytes table
  because the Rust decoder panics on invalid UTF-8 and on unused ids.
* ``"bytes"``: one token per byte, id = byte value.

``StreamDecoder`` turns a stream of ids into text for streaming generation,
holding back an incomplete UTF-8 character until its last byte arrives.
``check_token_ids`` is the one range check of token ids (model input, sessions, the server,
state files). This module imports nothing else of rwkvstate, so every layer may use it.
"""

from __future__ import annotations

import ast
import codecs
import functools
import os
from operator import itemgetter
from typing import Iterable

WORLD_KIND = "world"
BYTES_KIND = "bytes"
WORLD_VOCAB_SIZE = 65536
BYTES_VOCAB_SIZE = 256
END_OF_TEXT_ID = 0
WORLD_VOCAB_FILENAME = "rwkv_vocab_v20230424.txt"

_KIND_BY_VOCAB_SIZE = {WORLD_VOCAB_SIZE: WORLD_KIND, BYTES_VOCAB_SIZE: BYTES_KIND}


def check_token_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """ids as a list, if every id lies in [0, vocab_size); else a ValueError naming the first
    that does not."""
    out = list(ids)
    for token in out:
        if not 0 <= token < vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {vocab_size})")
    return out


class VocabFileError(ValueError):
    """The world vocabulary file is malformed."""


def _as_id_list(ids) -> list[int]:
    # Accept tensors / numpy arrays as well as plain sequences: generation
    # code often holds ids in a tensor.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
        return [ids] if isinstance(ids, int) else ids
    return ids if isinstance(ids, list) else list(ids)


class Tokenizer:
    """Common interface: text <-> ids, plus the raw bytes behind each id."""

    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes(i) for i in _as_id_list(ids))

    def decode(self, ids) -> str:
        # A model can emit any id sequence, so invalid UTF-8 must not raise.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(
                f"token id {token_id} is out of range for the {self.kind!r} "
                f"tokenizer (vocab size {self.vocab_size})"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """id = byte value of the UTF-8 encoding."""

    kind = BYTES_KIND
    vocab_size = BYTES_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return bytes((token_id,))

    def decode_bytes(self, ids) -> bytes:
        ids = _as_id_list(ids)
        try:
            return bytes(ids)
        except (ValueError, TypeError):
            # bytes() gives a terse message; find the offending id for a clear one.
            for token_id in ids:
                self._check_id(token_id)
            raise


# ---------------------------------------------------------------------------
# World vocabulary file


def default_world_vocab_path() -> str:
    """The vocab file shipped inside the pyrwkv_tokenizer package."""
    import pyrwkv_tokenizer

    return os.path.join(os.path.dirname(pyrwkv_tokenizer.__file__), WORLD_VOCAB_FILENAME)


def _parse_token_literal(literal: str) -> str | bytes:
    # ~93% of lines are a quoted string with no escapes and no inner quote;
    # such a literal is exactly its inner text, so skip the (slow) parser.
    quote = literal[:1]
    if (
        len(literal) >= 2
        and quote in ("'", '"')
        and literal[-1] == quote
        and "\\" not in literal
        and quote not in literal[1:-1]
    ):
        return literal[1:-1]
    return ast.literal_eval(literal)


def _parse_vocab_line(line: str) -> tuple[int, bytes]:
    """Parse ``<id> <repr of str or bytes> <byte length>``."""
    first_space = line.find(" ")
    last_space = line.rfind(" ")
    if first_space <= 0 or last_space <= first_space:
        raise ValueError("expected '<id> <literal> <length>'")
    token_id = int(line[:first_space])
    num_bytes = int(line[last_space + 1 :])
    try:
        value = _parse_token_literal(line[first_space + 1 : last_space])
    except (ValueError, SyntaxError) as exc:
        raise ValueError(f"token literal does not parse: {exc}") from None
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes):
        raise ValueError(f"token literal is a {type(value).__name__}, not str or bytes")
    if len(value) != num_bytes:
        raise ValueError(f"token is {len(value)} bytes but the length field says {num_bytes}")
    return token_id, value


def _read_vocab_lines(path: str) -> Iterable[tuple[int, str]]:
    # Universal newlines: the copy in the `rwkv` package uses CRLF. Token
    # literals are reprs, so they never contain a raw line break.
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            line = line.rstrip("\n")
            if line:
                yield line_number, line


@functools.lru_cache(maxsize=4)
def load_world_vocab(path: str, vocab_size: int = WORLD_VOCAB_SIZE) -> tuple[bytes, ...]:
    """Return the id -> bytes table (length ``vocab_size``); cached per path.

    Ids absent from the file (0 = end-of-text, and the unused tail
    65530..65535) map to ``b""``.
    """
    table: list[bytes | None] = [None] * vocab_size
    for line_number, line in _read_vocab_lines(path):
        try:
            token_id, value = _parse_vocab_line(line)
            if not 0 < token_id < vocab_size:
                raise ValueError(f"id {token_id} outside 1..{vocab_size - 1}")
            if table[token_id] is not None:
                raise ValueError(f"id {token_id} appears twice")
        except ValueError as exc:
            raise VocabFileError(
                f"{path}:{line_number}: malformed vocab line ({exc}): {line[:80]!r}"
            ) from None
        table[token_id] = value
    return _finish_table(path, table)


def _finish_table(path: str, table: list[bytes | None]) -> tuple[bytes, ...]:
    num_tokens = sum(value is not None for value in table)
    if num_tokens == 0:
        raise VocabFileError(f"{path}: vocab file has no tokens")
    # Greedy encoding needs every single byte to be a token, and duplicate
    # byte strings would make id -> text -> id ambiguous.
    present = {value for value in table if value is not None}
    if len(present) != num_tokens:
        raise VocabFileError(f"{path}: vocab file has duplicate token byte strings")
    missing = [b for b in range(256) if bytes((b,)) not in present]
    if missing:
        raise VocabFileError(f"{path}: vocab file lacks single-byte tokens, e.g. {missing[:5]}")
    return tuple(b"" if value is None else value for value in table)


@functools.lru_cache(maxsize=4)
def _load_rust_encoder(path: str):
    import pyrwkv_tokenizer

    return pyrwkv_tokenizer.WorldTokenizer(path)


class WorldTokenizer(Tokenizer):
    """RWKV world vocabulary; both tables load on first use and are shared."""

    kind = WORLD_KIND
    vocab_size = WORLD_VOCAB_SIZE

    def __init__(self, vocab_path: str | None = None):
        self.vocab_path = vocab_path or default_world_vocab_path()

    @property
    def id_to_bytes(self) -> tuple[bytes, ...]:
        return load_world_vocab(self.vocab_path)

    def encode(self, text: str) -> list[int]:
        # Lone surrogates raise UnicodeEncodeError, as in the reference.
        return _load_rust_encoder(self.vocab_path).encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return _load_rust_encoder(self.vocab_path).encode_batch(texts)

    def token_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self.id_to_bytes[token_id]

    def decode_bytes(self, ids) -> bytes:
        ids = _as_id_list(ids)
        table = self.id_to_bytes
        # A tuple index accepts negatives, so check them before the fast join.
        if ids and min(ids) < 0:
            self._check_all(ids)
        try:
            if len(ids) < 2:  # itemgetter needs >= 1 id and returns a bare item for 1
                return b"".join(table[i] for i in ids)
            # itemgetter does the whole lookup loop in C (~25% faster than map).
            return b"".join(itemgetter(*ids)(table))
        except (IndexError, TypeError):
            self._check_all(ids)
            raise

    def _check_all(self, ids: list[int]) -> None:
        for token_id in ids:
            self._check_id(token_id)


# ---------------------------------------------------------------------------
# Streaming


class StreamDecoder:
    """Incremental ids -> text for streaming generation.

    ``push`` returns only complete characters; an incomplete UTF-8 tail
    (at most 3 bytes) is held until the next token completes it.  Bytes that
    can never form a valid character are emitted as U+FFFD as soon as that is
    known, so nothing is held forever and nothing is silently dropped.  The
    concatenation of all ``push`` results plus ``flush()`` equals
    ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(int(token_id)))

    def push_many(self, ids) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes(ids))

    @property
    def num_pending_bytes(self) -> int:
        return len(self._decoder.getstate()[0])

    def flush(self) -> str:
        """Return the held tail (as U+FFFD if incomplete) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


# ---------------------------------------------------------------------------
# Selection


def get_tokenizer(kind: str) -> Tokenizer:
    if kind == WORLD_KIND:
        return WorldTokenizer()
    if kind == BYTES_KIND:
        return ByteTokenizer()
    raise ValueError(
        f"unknown tokenizer kind {kind!r}; expected {WORLD_KIND!r} or {BYTES_KIND!r}"
    )


def infer_tokenizer_kind(vocab_size: int) -> str:
    """Tokenizer kind from the model's vocab size (used when no sidecar says).

    65536 -> "world", 256 -> "bytes"; any other size is ambiguous.
    """
    kind = _KIND_BY_VOCAB_SIZE.get(vocab_size)
    if kind is None:
        raise ValueError(
            f"cannot infer the tokenizer from vocab size {vocab_size} (known: "
            f"{WORLD_VOCAB_SIZE} -> {WORLD_KIND!r}, {BYTES_VOCAB_SIZE} -> {BYTES_KIND!r}); "
            f'provide a <model>.json sidecar with {{"tokenizer": "world"|"bytes"}} '
            f"or pass the CLI override --tokenizer world|bytes"
        )
    return kind
