"""Tokenizer round trips, stream-safe decoding, fingerprints and vocabulary checks."""

from pathlib import Path

import numpy as np
import pytest

import tvq
from tests.conftest import tiny_config
from tvq.text.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    load_tokenizer,
    train_sentencepiece,
)

DATA = Path(__file__).parent / "data"
SAMPLES = [
    "To be, or not to be, that is the question:\n",
    "  leading spaces,\ttabs\tand\n\n\nblank lines  ",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🎭🗡️, Ελληνικά",
    "",
]


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> SentencePieceTokenizer:
    folder = tmp_path_factory.mktemp("spm")
    return train_sentencepiece([DATA / "macbeth_head.txt"], folder / "tiny.model", 400)


def tokenizers(sp):
    return [ByteTokenizer(), sp]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(sentencepiece, text):
    for tok in tokenizers(sentencepiece):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_byte_layout():
    tok = ByteTokenizer()
    assert tok.vocab_size == 259 and (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.encode("A\n") == [ord("A") + 3, ord("\n") + 3]
    assert tok.decode([0, 1, 2, 68]) == "A"  # specials decode to nothing


@pytest.mark.parametrize("text", SAMPLES[:3])
def test_streaming_decode_is_exact(sentencepiece, text):
    for tok in tokenizers(sentencepiece):
        ids = tok.encode(text)
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_streaming_decode_of_invalid_bytes_matches_decode():
    tok = ByteTokenizer()
    ids = [0xE6 + 3, 0x97 + 3, ord("x") + 3, 0xFF + 3]  # truncated character, stray byte
    stream = StreamDecoder(tok)
    assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == tok.decode(ids)


def test_sentencepiece_matches_library_decode_and_fingerprint(sentencepiece):
    text = (DATA / "hamlet_head.txt").read_text()
    ids = sentencepiece.encode(text)
    assert len(ids) < 0.9 * len(text.encode())  # it really merges
    assert sentencepiece._sp.decode(ids) == sentencepiece.decode(ids) == text
    again = SentencePieceTokenizer(sentencepiece.path)
    assert again.fingerprint == sentencepiece.fingerprint
    assert sentencepiece.fingerprint != ByteTokenizer().fingerprint


def test_tokenizer_entry_checks_fingerprint(sentencepiece, tmp_path):
    spec = {"kind": "sentencepiece", "file": str(sentencepiece.path), "fingerprint": "sha256:00"}
    with pytest.raises(tvq.TokenizerError, match="fingerprint"):
        load_tokenizer(spec)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(tvq.TokenizerError, match="not a sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "bad.model")


def test_bundle_round_trip_and_mismatch(sentencepiece, tmp_path):
    config = tiny_config(n_vocab=sentencepiece.vocab_size)
    model = tvq.Model.init(config, seed=1, tokenizer=sentencepiece)
    model.save(tmp_path / "m")
    loaded = tvq.load(tmp_path / "m")
    assert loaded.tokenizer.fingerprint == sentencepiece.fingerprint
    text = "Fair is foul, and foul is fair."
    assert loaded.tokenizer.encode(text) == sentencepiece.encode(text)
    ids = np.array([sentencepiece.encode(text)])
    np.testing.assert_array_equal(model.log_probs(ids)[0], loaded.log_probs(ids)[0])

    with pytest.raises(tvq.TokenizerError, match="400 ids but the model's vocabulary"):
        tvq.Model(tiny_config(n_vocab=259), model.params, tokenizer=sentencepiece)
    # a bundle whose tokenizer file was swapped for another is refused
    (tmp_path / "m" / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(tvq.CheckpointError, match="not a sentencepiece model"):
        tvq.load(tmp_path / "m")
