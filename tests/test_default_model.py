"""The built-in model ships inside the package, loads offline and scores as recorded."""

from pathlib import Path

import pytest

import tvq
from tvq.scoring.stream import score_stream

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default_model():
    return tvq.load()


def test_default_model_loads_with_tokenizer(default_model):
    assert default_model.tokenizer.kind == "sentencepiece"
    assert default_model.tokenizer.vocab_size == default_model.config.n_vocab
    meta = default_model.metadata
    assert meta["heldout_documents"] == ["hamlet_gut.txt", "twelfth_night_gut.txt"]
    assert "tvq train" in meta["command"]
    shipped = sum(p.stat().st_size for p in tvq.runtime.model.default_model_path().rglob("*"))
    assert shipped <= 40 * 10**6  # issue 15: at most 40 MB


def test_default_model_matches_recorded_bits_per_byte(default_model):
    check = default_model.metadata["sample_check"]
    sample = ROOT / check["file"]
    with sample.open("rb") as f:
        result, _ = score_stream(default_model, f, sample.name)
    assert result.row()["bits_per_byte"] == pytest.approx(check["bits_per_byte"], abs=1e-3)
    # and it is a language model of this text, far better than uniform over bytes (8 bits)
    assert check["bits_per_byte"] < 4.0


def test_shipped_tokenizer_is_the_models(default_model):
    shipped = tvq.text.tokenizer.SentencePieceTokenizer(
        ROOT / "tokenizers" / "shakespeare-4k.model"
    )
    assert shipped.fingerprint == default_model.tokenizer.fingerprint
