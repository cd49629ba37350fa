"""Tokenizers: world ids equal the official reference; decoding and streaming."""

from __future__ import annotations

import glob
import os
import random
import sysconfig

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkvstate.tokenizer import (
    ByteTokenizer,
    StreamDecoder,
    VocabFileError,
    WorldTokenizer,
    get_tokenizer,
    infer_tokenizer_kind,
    load_world_vocab,
)

UTF8_TEXT = st.text(alphabet=st.characters(codec="utf-8"))  # no lone surrogates

# Hand-written samples; each exercises a script or a whitespace pattern.
SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14 o'clock -- isn't it?\n",
    "code": "def f(x: int) -> list[int]:\n    return [i ** 2 for i in range(x) if i % 3 != 0]  # squares\n",
    "chinese": "循环神经网络把历史压缩进一个固定大小的状态里，因此推理时内存不随上下文增长。",
    "japanese": "状態を保存しておけば、長い文脈でも続きからすぐに生成を再開できます。カタカナ、ひらがな。",
    "korean": "상태를 저장하면 긴 문맥에서도 바로 이어서 생성할 수 있습니다. 한국어 문장입니다.",
    "russian": "Рекуррентная модель хранит всё прошлое в состоянии фиксированного размера. Ёжик, щука!",
    "arabic": "يحتفظ النموذج بحالة ثابتة الحجم، لذلك لا تزداد الذاكرة مع طول النص. ١٢٣٤٥",
    "hindi": "यह मॉडल पूरे इतिहास को एक निश्चित आकार की अवस्था में रखता है।",
    "thai": "แบบจำลองนี้เก็บประวัติทั้งหมดไว้ในสถานะขนาดคงที่",
    "greek_hebrew": "Καλημέρα κόσμε! שלום עולם! Ελληνικά και עברית μαζί.",
    "emoji": "😀😃 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇩🇪 ❤️ 🏳️‍🌈 🤖✨ 1️⃣ ",
    "whitespace": "a  b   c\t\td\n\n\ne" + " " * 300 + "f" + "\t" * 70 + "g\u3000\u00a0\u2028h\r\n\r\n  \r\n",
    "controls": "\x00\x01\x1b[31mred\x1b[0m\x7f\ufeffBOM\ufffd\U0010ffff",
}


def _make_variations(rng: random.Random, num_texts: int) -> list[str]:
    """Shuffle words of the samples and glue them with varied whitespace,
    so token boundaries fall in many different places."""
    words = " ".join(SAMPLES.values()).split(" ")
    glue = [" ", "", "\n", "\r\n", "  ", "\t", "    ", "\n\n", "\u3000"]
    texts = []
    for _ in range(num_texts):
        picked = rng.choices(words, k=rng.randint(5, 120))
        texts.append("".join(w + rng.choice(glue) for w in picked))
    return texts


def _read(path: str, max_chars: int) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read(max_chars)


def _stdlib_texts() -> list[str]:
    from pydoc_data import topics

    stdlib = sysconfig.get_paths()["stdlib"]
    texts = [topics.topics[key] for key in sorted(topics.topics)[:40]]
    texts += [_read(os.path.join(stdlib, name), 60_000) for name in ("argparse.py", "typing.py")]
    cjk = sorted(glob.glob(os.path.join(stdlib, "test", "cjkencodings", "*-utf8.txt")))
    texts += [_read(path, 10_000) for path in cjk]
    return texts


def _vocab_text(world: WorldTokenizer, num_tokens: int) -> list[str]:
    """Shuffled valid-UTF-8 vocab tokens: every kind of token boundary."""
    tokens = []
    for value in world.id_to_bytes[1:]:
        try:
            tokens.append(value.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    random.Random(7).shuffle(tokens)
    tokens = tokens[:num_tokens]
    return ["".join(tokens[i:i + 500]) for i in range(0, len(tokens), 500)]


@pytest.fixture(scope="module")
def reference():
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return WorldTokenizer()


@pytest.fixture(scope="module")
def mixed_texts(world) -> list[str]:
    texts = list(SAMPLES.values())
    texts += [text.replace("\n", "\r\n") for text in SAMPLES.values()]
    texts += _make_variations(random.Random(0), 1500)
    texts += _stdlib_texts()
    texts += _vocab_text(world, 30_000)
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    assert num_bytes > 300_000, num_bytes  # "a few hundred KB"
    return texts


# ---------------------------------------------------------------------------
# World tokenizer vs the reference


def test_world_ids_equal_reference(reference, world, mixed_texts):
    mismatched = [text[:60] for text in mixed_texts if world.encode(text) != reference.encode(text)]
    assert mismatched == []


def test_world_round_trip(world, mixed_texts):
    assert [world.decode(world.encode(text)) for text in mixed_texts] == mixed_texts


def test_encode_batch_equals_encode(world, mixed_texts):
    texts = mixed_texts[:200]
    assert world.encode_batch(texts) == [world.encode(text) for text in texts]


def test_decode_table_equals_reference(reference, world):
    table = world.id_to_bytes
    assert len(table) == world.vocab_size == 65536
    assert table[0] == b""  # end-of-text
    assert all(table[i] == b"" for i in range(65530, 65536))  # unused ids
    assert all(table[i] == reference.idx2token[i] for i in range(1, 65530))


@settings(max_examples=300, deadline=None)
@given(UTF8_TEXT)
def test_world_round_trip_and_ids_any_text(reference, world, text):
    ids = world.encode(text)
    assert ids == reference.encode(text)
    assert world.decode(ids) == text


def test_world_rejects_lone_surrogate(world):
    with pytest.raises(UnicodeEncodeError):
        world.encode("a\ud800b")


def test_world_decode_edge_ids(world):
    assert world.decode([]) == ""
    assert world.decode([0]) == ""
    assert world.decode_bytes(np.array([0, 66, 0])) == b"A"
    assert world.token_bytes(66) == b"A"


@pytest.mark.parametrize("bad_id", [-1, 65536, 10**9])
def test_world_decode_out_of_range(world, bad_id):
    with pytest.raises(ValueError, match=f"token id {bad_id} is out of range"):
        world.decode([66, bad_id])


def test_world_decode_invalid_utf8_is_replaced(reference, world):
    ids = reference.encodeBytes(b"ok \xff\xfe then \xe4\xbd")  # \xe4\xbd: cut character
    assert world.decode(ids) == "ok \ufffd\ufffd then \ufffd"


# ---------------------------------------------------------------------------
# Vocab file validation


def _write_vocab(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ("1 'ab' 3", "token is 2 bytes but the length field says 3"),
        ("1 'ab 2", "does not parse"),
        ("1 [1] 1", "not str or bytes"),
        ("70000 'a' 1", "outside 1..65535"),
        ("x 'a' 1", "invalid literal for int"),
        ("1'a'1", "expected '<id> <literal> <length>'"),
    ],
)
def test_malformed_vocab_line(tmp_path, line, message):
    path = _write_vocab(tmp_path, ["2 b'\\x01' 1", line])
    with pytest.raises(VocabFileError, match=f"vocab.txt:2: malformed vocab line.*{message}"):
        load_world_vocab(path)


def test_vocab_must_cover_all_bytes(tmp_path):
    path = _write_vocab(tmp_path, ["1 'a' 1", "2 '\u00e9' 2"])
    with pytest.raises(VocabFileError, match="lacks single-byte tokens"):
        load_world_vocab(path)


def test_vocab_duplicate_id(tmp_path):
    path = _write_vocab(tmp_path, ["1 'a' 1", "1 'b' 1"])
    with pytest.raises(VocabFileError, match="id 1 appears twice"):
        load_world_vocab(path)


# ---------------------------------------------------------------------------
# Byte tokenizer


@given(UTF8_TEXT)
def test_byte_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_basics():
    tokenizer = ByteTokenizer()
    assert (tokenizer.kind, tokenizer.vocab_size) == ("bytes", 256)
    assert tokenizer.token_bytes(255) == b"\xff"
    assert tokenizer.decode([104, 0xFF, 105]) == "h\ufffdi"
    with pytest.raises(ValueError, match="token id 256 is out of range"):
        tokenizer.decode([1, 256])


# ---------------------------------------------------------------------------
# Streaming


def _stream_chunks(data: bytes, cuts: list[int]) -> tuple[str, StreamDecoder]:
    stream = StreamDecoder(ByteTokenizer())
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    pieces = [stream.push_many(list(data[a:b])) for a, b in zip(bounds, bounds[1:])]
    return "".join(pieces) + stream.flush(), stream


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=20))
def test_stream_equals_whole_decode_for_any_split(data, cuts):
    text, _ = _stream_chunks(data, cuts)
    assert text == data.decode("utf-8", errors="replace")


@given(st.binary(max_size=200))
def test_stream_byte_at_a_time_holds_at_most_3_bytes(data):
    stream = StreamDecoder(ByteTokenizer())
    pieces = []
    for byte in data:
        pieces.append(stream.push(byte))
        assert stream.num_pending_bytes <= 3
    assert "".join(pieces) + stream.flush() == data.decode("utf-8", errors="replace")


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_stream_world_tokens_equal_whole_decode(reference, world, data):
    ids = reference.encodeBytes(data) if data else []
    stream = StreamDecoder(world)
    text = "".join(stream.push(i) for i in ids) + stream.flush()
    assert text == world.decode(ids)


def test_stream_world_character_split_across_tokens(world):
    text = "你好 😀 👨‍👩‍👧‍👦 ok"
    ids = world.encode(text)
    # The test only means something if some token ends mid-character.
    assert any(_is_incomplete_utf8(world.token_bytes(i)) for i in ids)
    stream = StreamDecoder(world)
    pieces = [stream.push(i) for i in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.flush() == text


def _is_incomplete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_stream_invalid_bytes():
    stream = StreamDecoder(ByteTokenizer())
    assert stream.push(0xFF) == "\ufffd"  # never valid: emitted at once
    assert [stream.push(b) for b in b"\xf0\x9f\x98"] == ["", "", ""]  # valid prefix: held
    assert stream.num_pending_bytes == 3
    assert stream.push(ord("A")) == "\ufffdA"  # prefix broken: replaced, not held
    assert stream.push(0xE0) == ""
    assert stream.push(0x80) == "\ufffd\ufffd"  # E0 80 is never valid (overlong)
    assert stream.push(0xC3) == ""
    assert stream.flush() == "\ufffd"  # incomplete tail at the end
    assert stream.push(0xA9) == "\ufffd"  # flush reset the state: lone continuation


# ---------------------------------------------------------------------------
# Selection


def test_get_tokenizer():
    assert isinstance(get_tokenizer("world"), WorldTokenizer)
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'gpt2'; expected 'world' or 'bytes'"):
        get_tokenizer("gpt2")


def test_infer_tokenizer_kind():
    assert infer_tokenizer_kind(65536) == "world"
    assert infer_tokenizer_kind(256) == "bytes"
    with pytest.raises(ValueError) as excinfo:
        infer_tokenizer_kind(50277)
    message = str(excinfo.value)
    assert "vocab size 50277" in message
    assert "<model>.json" in message and '{"tokenizer": "world"|"bytes"}' in message
    assert "--tokenizer" in message
