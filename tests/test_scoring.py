"""Reading and cutting text for scoring: pieces join back exactly and never split a character."""

import io

import pytest

from tvq.scoring import chunk_len, piece_sizes, text_pieces


@pytest.mark.parametrize("read_size", [5, 64, 1 << 16])
def test_text_pieces_are_whole_characters(read_size):
    no_newline = ("é日本🎭" * 3000).encode()
    lines = b"ab\ncd\n" * 500 + b"tail \xff\xfe without newline"
    for data in (no_newline, lines):
        pieces = list(text_pieces(io.BytesIO(data), read_size))
        assert b"".join(pieces) == data
        if data is no_newline:
            for piece in pieces:
                piece.decode("utf-8")  # raises if a character was split


def test_piece_sizes_cover_any_length_with_few_shapes():
    shapes = set()
    for length in range(0, 20000, 37):
        sizes = list(piece_sizes(length, 128))
        assert sum(sizes) == length
        shapes.update(sizes)
    assert max(shapes) == chunk_len(128) == 4096
    assert len(shapes) <= 13
