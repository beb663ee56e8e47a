"""From text files to a trained model directory: the work behind `tvq train`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tvq.config import DTYPES, ModelConfig
from tvq.distributed import cluster
from tvq.errors import CorpusError, TrainingError, TvqError, is_int
from tvq.files.atomic import write_atomically
from tvq.files.checkpoint import TOKENIZER_FILE, is_model_dir
from tvq.runtime.model import Model, load
from tvq.text.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from tvq.train.data import find_files, read_documents, split_documents, token_stream
from tvq.train.loop import TRAIN_DIR, run_training
from tvq.train.settings import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, TrainSettings


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not is_model_dir(out):
        allowed = {TRAIN_DIR, TOKENIZER_FILE}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed)
        if foreign:
            raise TrainingError(
                f"--out {out} holds other files ({foreign[0]}); use an empty or new directory"
            )
    if out.is_dir() and is_model_dir(out) and not (out / TRAIN_DIR).is_dir():
        raise TrainingError(f"--out {out} holds a finished model; use --from {out} to fine-tune")


def train_from_files(
    *,
    texts: list[Path],
    out: Path,
    tokenizer_path: Path | None = None,
    use_bytes: bool = False,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    from_dir: Path | None = None,
    held_out: list[Path] | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    architecture: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    corpus_name: str = "",
    command: str = "",
    on_progress: Callable | None = None,
    devices: int | None = None,
    shard_params: bool = False,
    algorithm: str | None = None,
    dtype: str | None = None,
) -> Model:
    """Trains (or resumes, or fine-tunes `from_dir`) a model on text files; writes it to
    `out` and returns it. architecture: ModelConfig fields; settings: TrainSettings.
    algorithm: the serial or parallel form (None: the faster for the device); dtype: the
    compute dtype (None: the architecture's, or the fine-tuned model's)."""
    out = Path(out)
    check_out_dir(out)
    settings_obj = TrainSettings(**(settings or {}))
    if not is_int(vocab_size) or vocab_size < 1:
        raise TrainingError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    base = load(from_dir) if from_dir is not None else None
    if cluster.active():  # process 0 reads the text; the others read its token file
        if cluster.is_main():
            prepared = _prepare(texts, out, tokenizer_path, use_bytes, vocab_size, base,
                                held_out, val_fraction, architecture, settings_obj,
                                corpus_name, command)  # fmt: skip
            _share(out, *prepared)
        cluster.barrier("data")
        prepared = _shared(out) if not cluster.is_main() else prepared
    else:
        prepared = _prepare(texts, out, tokenizer_path, use_bytes, vocab_size, base, held_out,
                            val_fraction, architecture, settings_obj, corpus_name,
                            command)  # fmt: skip
    config, tokenizer, train_tokens, val_documents, metadata = prepared
    if dtype is not None:
        if dtype not in DTYPES:
            raise TrainingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        config = dataclasses.replace(config, dtype=dtype)
    if base is not None:
        metadata["fine_tuned_from"] = str(from_dir)
    return run_training(
        out=out, config=config, settings=settings_obj, train_tokens=train_tokens,
        val_documents=val_documents, tokenizer=tokenizer, metadata=metadata, init_from=base,
        on_progress=on_progress, devices=devices, shard_params=shard_params, algorithm=algorithm,
    )  # fmt: skip


def _prepare(texts, out, tokenizer_path, use_bytes, vocab_size, base, held_out, val_fraction,
             architecture, settings_obj, corpus_name, command):  # fmt: skip
    """Reads, splits and tokenizes the text → (config, tokenizer, training token stream,
    held-out documents as (ids, bytes), metadata)."""
    files = find_files(texts)
    for path in held_out or []:
        if not Path(path).is_file():
            raise CorpusError(f"held-out file {path} does not exist")
    files += [Path(p) for p in held_out or [] if Path(p).resolve() not in
              {f.resolve() for f in files}]  # fmt: skip
    docs = read_documents(files)
    train_docs, val_docs = split_documents(
        docs, val_fraction, list(held_out or []), settings_obj.seed
    )
    if not train_docs:
        raise CorpusError("no training text left after holding out validation documents")

    if base is not None:
        tokenizer = base.tokenizer or ByteTokenizer()
        config = base.config
    else:
        if use_bytes:
            tokenizer = ByteTokenizer()
        elif tokenizer_path is not None:
            tokenizer = SentencePieceTokenizer(tokenizer_path)
        else:
            tokenizer = _own_tokenizer(out, train_docs, vocab_size)
        try:
            config = ModelConfig(n_vocab=tokenizer.vocab_size, **(architecture or {}))
        except TvqError as e:
            raise TrainingError(str(e)) from None

    train_tokens = token_stream(train_docs, tokenizer)
    val_documents = [(tokenizer.encode(d.text), d.n_bytes) for d in val_docs]
    metadata = dict(
        corpus=corpus_name or ", ".join(sorted({str(Path(t)) for t in texts})),
        train_documents=len(train_docs),
        train_tokens=int(len(train_tokens)),
        train_bytes=sum(d.n_bytes for d in train_docs),
        heldout_documents=[d.path.name for d in val_docs],
        tokenizer=dict(kind=tokenizer.kind, vocab_size=tokenizer.vocab_size),
        command=command,
    )
    return config, tokenizer, train_tokens, val_documents, metadata


DATA_DIR = "data"  # in <out>/train: process 0's tokens for the other processes of a cluster


def _share(out: Path, config, tokenizer, train_tokens, val_documents, metadata) -> None:
    """Writes what the other processes need, each file replaced atomically: they then
    read only their own rows of the token stream (a memory map), never the text."""
    folder = out / TRAIN_DIR / DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(
        folder / "tokens.npy", lambda f: np.save(f, np.asarray(train_tokens, np.int32))
    )
    if tokenizer.kind == "sentencepiece":
        data = Path(tokenizer.path).read_bytes()
        write_atomically(folder / TOKENIZER_FILE, lambda f: f.write(data))
    document = {"config": config.to_dict(), "tokenizer": tokenizer.kind, "metadata": metadata,
                "val": [[list(map(int, ids)), size] for ids, size in val_documents]}  # fmt: skip
    text = json.dumps(document).encode()
    write_atomically(folder / "prepared.json", lambda f: f.write(text))


def _shared(out: Path):
    """What process 0 wrote with _share, as _prepare returns it."""
    folder = out / TRAIN_DIR / DATA_DIR
    document = json.loads((folder / "prepared.json").read_text())
    if document["tokenizer"] == "sentencepiece":
        tokenizer = SentencePieceTokenizer(folder / TOKENIZER_FILE)
    else:
        tokenizer = ByteTokenizer()
    tokens = np.load(folder / "tokens.npy", mmap_mode="r")  # pages are read as rows need them
    val = [(ids, size) for ids, size in document["val"]]
    return (ModelConfig.from_dict(document["config"]), tokenizer, tokens, val,
            document["metadata"])  # fmt: skip


def _own_tokenizer(out: Path, docs, vocab_size: int) -> SentencePieceTokenizer:
    """Trains (once) a sentencepiece model on the training documents; reused on resume
    (in a cluster, by process 0 alone: the others read the copy it shares)."""
    folder = out / TRAIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / TOKENIZER_FILE
    if not model_path.exists():
        text_file = folder / "tokenizer-corpus.txt"
        text_file.write_text("\n".join(d.text for d in docs), encoding="utf-8")
        try:
            trained = train_sentencepiece([text_file], folder / "tokenizer.tmp.model", vocab_size)
        finally:
            text_file.unlink(missing_ok=True)
        trained.path.replace(model_path)
    return SentencePieceTokenizer(model_path)
