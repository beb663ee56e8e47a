"""Reading text for scoring: a streamed file's ids equal tokenizing it whole, pieces stay
bounded, and the piece sizes cover any length with few compiled shapes."""

import io
from pathlib import Path

import pytest

import tvq
from tvq.runtime.context import chunk_len, piece_sizes
from tvq.text.tokenizer import ByteTokenizer, SentencePieceTokenizer, encode_stream

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
SHIPPED = ROOT / "tokenizers" / "shakespeare-4k.model"


@pytest.fixture(scope="module")
def sentencepiece():
    return SentencePieceTokenizer(SHIPPED)


def streamed(tokenizer, data: bytes, read_size: int):
    pieces = list(encode_stream(tokenizer, io.BytesIO(data), read_size))
    ids = [i for piece_ids, _, _ in pieces for i in piece_ids]
    assert sum(n for _, n, _ in pieces) == len(data)
    return ids, pieces


PLAYS = (DATA / "hamlet_head.txt").read_bytes() + (DATA / "macbeth_head.txt").read_bytes()
MULTIBYTE = "naïve  日本語 🎭x\nçà\u00a0é  \n\n ".encode() * 300  # cuts land next to each


@pytest.mark.parametrize(("data", "read_size"), [
    (PLAYS, 7), (PLAYS, 100), (PLAYS, 4096), (MULTIBYTE, 1), (MULTIBYTE, 2), (MULTIBYTE, 3),
    (MULTIBYTE, 5), (MULTIBYTE, 64),
])  # fmt: skip
def test_streamed_ids_equal_whole_text(sentencepiece, data, read_size):
    ids, pieces = streamed(sentencepiece, data, read_size)
    assert ids == sentencepiece.encode(data.decode("utf-8"))
    assert len(pieces) > 1  # it really was cut


def test_a_long_line_is_cut_exactly_and_pieces_stay_small(sentencepiece):
    """2 MB without a newline: cut before spaces, ids as the whole, no piece grows."""
    line = PLAYS.replace(b"\n", b" ")
    data = line * (2_000_000 // len(line) + 1)
    ids, pieces = streamed(sentencepiece, data, 1 << 16)
    assert b"\n" not in data and len(data) > 2_000_000
    assert ids == sentencepiece.encode(data.decode("utf-8"))
    assert max(n for _, n, _ in pieces) <= 2 * (1 << 16)


def test_invalid_utf8_is_flagged_and_replaced(sentencepiece):
    data = b"good text \xff\xfe then more\n" * 50
    ids, pieces = streamed(sentencepiece, data, 16)
    assert ids == sentencepiece.encode(data.decode("utf-8", errors="replace"))
    assert any(invalid for _, _, invalid in pieces)


def test_bytes_cut_anywhere():
    data = MULTIBYTE + b"\xff"
    ids, pieces = streamed(ByteTokenizer(), data, 3)
    assert ids == ByteTokenizer().encode_bytes(data) and len(pieces) == -(-len(data) // 3)


def test_a_tokenizer_without_safe_cuts_reads_the_whole_text(sentencepiece, tmp_path):
    """A model that adds a dummy prefix would tokenize pieces differently: never cut it."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(SHIPPED.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "prefix.model").write_bytes(proto.SerializeToString())
    prefixed = SentencePieceTokenizer(tmp_path / "prefix.model")
    assert prefixed.cut(PLAYS) == 0 and sentencepiece.cut(PLAYS) > 0
    ids, pieces = streamed(prefixed, PLAYS, 100)
    assert len(pieces) == 1 and ids == prefixed.encode(PLAYS.decode())


def test_piece_sizes_cover_any_length_with_few_shapes():
    shapes = set()
    for length in range(0, 20000, 37):
        sizes = list(piece_sizes(length, 128))
        assert sum(sizes) == length
        shapes.update(sizes)
    assert max(shapes) == chunk_len(128) == 4096
    assert len(shapes) <= 13


@pytest.mark.parametrize("block_len", [0, -3, 1.5])
def test_bad_block_lengths_are_input_errors(block_len):
    with pytest.raises(tvq.InputError, match="block_len"):
        chunk_len(block_len)
