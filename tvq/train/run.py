"""The top of training: from text files (or a prepared dataset) to a trained model
directory, the work behind `tvq train`. The text is prepared once into token shards
(tvq/corpus/) that this run and every later one, resumed or new, memory-map."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tvq.config import DTYPES, ModelConfig
from tvq.corpus import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE, prepare
from tvq.corpus.shards import INFO_FILE, TRAIN, VAL, PreparedData, is_prepared
from tvq.distributed import cluster
from tvq.errors import CorpusError, TokenizerError, TrainingError, TvqError, is_int
from tvq.files.checkpoint import RECIPE_FILE, is_model_dir
from tvq.runtime.model import Model, load
from tvq.text.tokenizer import TOKENIZER_FILE, ByteTokenizer, SentencePieceTokenizer
from tvq.train.logs import check_loggers
from tvq.train.loop import TRAIN_DIR, run_training
from tvq.train.settings import TrainSettings

DATA_DIR = "data"  # in <out>/train: the prepared dataset of a cluster's run (shared)
HELD_OUT_NAMES = 100  # held-out documents named in the metadata at most


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not is_model_dir(out):
        allowed = {TRAIN_DIR, TOKENIZER_FILE, RECIPE_FILE}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed)
        if foreign:
            raise TrainingError(
                f"--out {out} holds other files ({foreign[0]}); use an empty or new directory"
            )
    if out.is_dir() and is_model_dir(out) and not (out / TRAIN_DIR).is_dir():
        raise TrainingError(f"--out {out} holds a finished model; use --from {out} to fine-tune")


def train_from_files(
    *,
    texts: Sequence[Path],
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
    text_field: str = "text",
    skip_bad_lines: bool = False,
    workers: int | None = None,
    cache_dir: Path | None = None,
    on_prepare: Callable[[prepare.PrepareEvent], None] | None = None,
    on_memory: Callable[[dict[str, int] | None], None] | None = None,
    log_dir: Path | None = None,
    wandb_project: str | None = None,
    dry_run: bool = False,
    recipe: str | None = None,
) -> Model | dict:
    """Trains (or resumes, or fine-tunes `from_dir`) a model on text files, or on one
    prepared dataset (`tvq prepare`); writes it to `out` and returns it. architecture:
    ModelConfig fields; settings: TrainSettings. algorithm: the serial or parallel form
    (None: the faster for the device); dtype: the compute dtype (None: the
    architecture's, or the fine-tuned model's); on_memory, log_dir, wandb_project: as
    run_training's. dry_run: the run's plan instead (tvq/train/plan.py: its cost, a few
    steps timed), no checkpoint and no model written. recipe: the run's resolved
    settings as TOML (tvqcli/recipe.py), kept as <out>/recipe.toml when the run starts.

    Text is prepared into the cache folder (`cache_dir`, by default
    tvq.corpus.prepare.data_cache_dir()) or found there; in a cluster, process 0
    prepares it into <out>/train/data, which every process sees, and the others
    memory-map it."""
    out = Path(out)
    check_out_dir(out)
    settings_obj = TrainSettings(**(settings or {}))
    check_loggers(log_dir, wandb_project)  # before the data is prepared
    if not is_int(vocab_size) or vocab_size < 1:
        raise TrainingError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    base = load(from_dir) if from_dir is not None else None
    given = _prepared_input(texts)
    if given is not None and (tokenizer_path is not None or use_bytes or held_out):
        raise TrainingError(f"{given} is a prepared dataset: its tokenizer and held-out "
                            "documents were chosen by tvq prepare")  # fmt: skip

    def get_data(folder: Path | None) -> PreparedData:
        if given is not None:
            return PreparedData.open(given)
        return _prepare(texts, out, folder, tokenizer_path, use_bytes, vocab_size, base,
                        held_out or [], val_fraction, settings_obj.seed, text_field,
                        skip_bad_lines, workers, cache_dir, on_prepare)  # fmt: skip

    data, tokenizer = _open_data(out, given, get_data)
    config = _config(base, from_dir, data, tokenizer, architecture, dtype)
    metadata = _metadata(data, tokenizer, texts, corpus_name, command)
    if base is not None:
        metadata["fine_tuned_from"] = str(from_dir)
    if dry_run:
        from tvq.train.plan import plan_run

        return plan_run(config, settings_obj, data.train, devices=devices,
                        shard_params=shard_params, algorithm=algorithm, init_from=base)  # fmt: skip
    return run_training(
        out=out, config=config, settings=settings_obj, train_tokens=data.train,
        val_documents=data.held_out, tokenizer=tokenizer, metadata=metadata, init_from=base,
        on_progress=on_progress, devices=devices, shard_params=shard_params, algorithm=algorithm,
        on_memory=on_memory, log_dir=log_dir, wandb_project=wandb_project, recipe=recipe,
    )  # fmt: skip


def _open_data(out: Path, given: Path | None, get_data: Callable) -> tuple[PreparedData, Any]:
    """The prepared data and the run's tokenizer; in a cluster, process 0 prepares it into
    <out>/train/data and the others memory-map what it wrote."""
    if not cluster.active():
        data = get_data(None)
        return data, _run_tokenizer(out, data)
    shared = out / TRAIN_DIR / DATA_DIR
    if cluster.is_main():
        data = get_data(shared)
        tokenizer = _run_tokenizer(out, data)
    cluster.barrier("data")
    if not cluster.is_main():
        data = PreparedData.open(given or shared)
        tokenizer = _run_tokenizer(out, data, write=False)
    return data, tokenizer


def _config(base: Model | None, from_dir, data: PreparedData, tokenizer, architecture,
            dtype: str | None) -> ModelConfig:  # fmt: skip
    """The fine-tuned model's architecture (its tokenizer must be the data's), else a new
    one for the tokenizer's vocabulary; in the compute dtype asked for."""
    if base is not None:
        base_tokenizer = base.tokenizer or ByteTokenizer()
        if base_tokenizer.fingerprint != tokenizer.fingerprint:
            raise TokenizerError(f"{data.folder} was tokenized with {tokenizer.fingerprint[:19]}"
                                 f"…, the model --from {from_dir} uses "
                                 f"{base_tokenizer.fingerprint[:19]}…")  # fmt: skip
        config = base.config
    else:
        try:
            config = ModelConfig(n_vocab=tokenizer.vocab_size, **(architecture or {}))
        except TvqError as e:
            raise TrainingError(str(e)) from None
    if dtype is not None:
        if dtype not in DTYPES:
            raise TrainingError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        config = dataclasses.replace(config, dtype=dtype)
    return config


def _prepared_input(texts: Sequence[Path]) -> Path | None:
    """The one input when it is a prepared dataset (several inputs: none may be one)."""
    for t in texts:
        if (Path(t) / INFO_FILE).is_file() and not is_prepared(Path(t)):
            raise CorpusError(f"{t} is an unfinished prepared dataset (its preparation was "
                              "stopped, or it was changed): prepare it again")  # fmt: skip
    folders = [Path(t) for t in texts if Path(t).is_dir() and is_prepared(Path(t))]
    if folders and len(texts) > 1:
        raise TrainingError(f"{folders[0]} is a prepared dataset: train on it alone")
    return folders[0] if folders else None


def _prepare(texts, out, folder, tokenizer_path, use_bytes, vocab_size, base, held_out,
             val_fraction, seed, text_field, skip_bad_lines, workers, cache_dir,
             on_event):  # fmt: skip
    """The prepared dataset of the text (found or made) in `folder`, or in the cache."""
    if base is not None:
        tokenizer = base.tokenizer or ByteTokenizer()
    elif use_bytes:
        tokenizer = ByteTokenizer()
    elif tokenizer_path is not None:
        tokenizer = SentencePieceTokenizer(tokenizer_path)
    else:
        tokenizer = None  # trained on the text, unless this run already has one
    req = prepare.request(texts, tokenizer=tokenizer, vocab_size=vocab_size, held_out=held_out,
                          val_fraction=val_fraction, seed=seed, text_field=text_field,
                          skip_bad_lines=skip_bad_lines)  # fmt: skip
    run_copy = out / TRAIN_DIR / TOKENIZER_FILE
    if tokenizer is None and run_copy.is_file():
        # A resumed run keeps the tokenizer it started with: the dataset made with it
        # when it is still there, else the text tokenized again with that tokenizer.
        mine = SentencePieceTokenizer(run_copy)
        found = prepare.find(req, prepare.target(req, folder, cache_dir))
        if found is None or found.tokenizer.fingerprint != mine.fingerprint:
            req = dataclasses.replace(req, tokenizer=mine)
    return prepare.prepare(req, out=folder, cache_dir=cache_dir, workers=workers,
                           on_event=on_event)  # fmt: skip


def _run_tokenizer(out: Path, data: PreparedData, write: bool = True):
    """The data's tokenizer, read from the run's own copy (<out>/train/tokenizer.model,
    written on first use), so that the finished model does not depend on the cache."""
    tokenizer = data.tokenizer
    if tokenizer.kind != "sentencepiece":
        return tokenizer
    copy = out / TRAIN_DIR / TOKENIZER_FILE
    if write and not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = copy.with_name(".tokenizer.model.tmp")
        shutil.copyfile(tokenizer.path, tmp)
        tmp.replace(copy)
    if copy.is_file():
        mine = SentencePieceTokenizer(copy)
        if mine.fingerprint == tokenizer.fingerprint:
            return mine
    return tokenizer  # another run's tokenizer is there: run.json refuses the mix


def _metadata(data: PreparedData, tokenizer, texts, corpus_name: str, command: str) -> dict:
    train, val = data.info["splits"][TRAIN], data.info["splits"][VAL]
    metadata = dict(
        corpus=corpus_name or ", ".join(sorted({str(Path(t)) for t in texts})),
        train_documents=train["documents"],
        train_tokens=train["tokens"],
        train_bytes=train["bytes"],
        heldout_documents=data.held_out_names(HELD_OUT_NAMES),
        tokenizer=dict(kind=tokenizer.kind, vocab_size=tokenizer.vocab_size),
        command=command,
        prepared_data=str(data.folder),
    )
    if val["documents"] > HELD_OUT_NAMES:
        metadata["heldout_document_count"] = val["documents"]
    return metadata
