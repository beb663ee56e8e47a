"""tvq model directories: config.json, the parameters as an orbax checkpoint, and the
tokenizer (docs/DESIGN.md section 10).

    config.json      {"format": "tvq-model", "version": 1, "config": {...},
                      "block_len": int, "tokenizer": {...} | null, "metadata": {...}}
    params/          the parameter tree, an orbax checkpoint
    tokenizer.model  the sentencepiece model, when the tokenizer is one

This module reads and writes the parts; tvq/runtime/model.py assembles them into a Model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tvq.config import ModelConfig
from tvq.errors import CheckpointError, ConfigError, TokenizerError
from tvq.files import warm
from tvq.nn.params import check_params
from tvq.text.tokenizer import TOKENIZER_FILE, check_vocab, load_tokenizer

FORMAT = "tvq-model"
VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# What else may share a model directory: a training run's files.
RECIPE_FILE = "recipe.toml"  # a training run's resolved settings (tvqcli/recipe.py)
ALLOWED_EXTRAS = {"train", RECIPE_FILE}  # beside a model: its training run


def is_model_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def tokenizer_entry(tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    entry = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
             "fingerprint": tokenizer.fingerprint}  # fmt: skip
    if tokenizer.kind == "sentencepiece":
        entry["file"] = TOKENIZER_FILE
    return entry


def local_checkpointer():
    """An orbax checkpointer for this process alone: a model directory is written and read
    whole by one process, also in a cluster (where orbax would otherwise wait for all)."""
    import jax
    import orbax.checkpoint as ocp

    this = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=this, active_processes={this})
    return ocp.StandardCheckpointer(multiprocessing_options=alone)


def local_target(checkpointer, params_path: Path) -> Any:
    """The stored tree as arrays on this process's first device: the target orbax needs to
    restore a checkpoint written on another topology (another device or process count)."""
    import jax

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = checkpointer.metadata(params_path).item_metadata
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), stored
    )


def restore_params(params_path: Path) -> Any:
    checkpointer = local_checkpointer()
    return checkpointer.restore(params_path, local_target(checkpointer, params_path))


def save_model(
    path: str | os.PathLike,
    *,
    config: ModelConfig,
    params: Any,
    block_len: int,
    tokenizer: Any,
    metadata: dict[str, Any],
) -> None:
    """Writes a model directory; each part is replaced atomically, config.json last."""
    import jax

    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and not is_model_dir(path):
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ALLOWED_EXTRAS)
        if foreign:
            raise CheckpointError(
                f"{path} is not empty and is not a tvq model directory (holds {foreign[0]})"
            )
    try:
        path.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".saving.", dir=path))
    except OSError as e:
        raise CheckpointError(f"model directory {path} cannot be written: {e.strerror}") from None
    try:
        checkpointer = local_checkpointer()
        checkpointer.save(tmp / PARAMS_DIR, jax.device_get(params))  # host copies
        checkpointer.wait_until_finished()
        document = {
            "format": FORMAT,
            "version": VERSION,
            "config": config.to_dict(),
            "block_len": block_len,
            "tokenizer": tokenizer_entry(tokenizer),
            "metadata": metadata,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None and tokenizer.kind == "sentencepiece":
            shutil.copyfile(tokenizer.path, tmp / TOKENIZER_FILE)
            os.replace(tmp / TOKENIZER_FILE, path / TOKENIZER_FILE)
        if (path / PARAMS_DIR).exists():
            os.replace(path / PARAMS_DIR, tmp / "old-params")
        os.replace(tmp / PARAMS_DIR, path / PARAMS_DIR)
        os.replace(tmp / CONFIG_FILE, path / CONFIG_FILE)
    except OSError as e:
        raise CheckpointError(f"model directory {path} cannot be written: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_model_dir(path: str | os.PathLike) -> tuple[ModelConfig, Any, dict[str, Any]]:
    """Reads a model directory → (config, params, the whole config.json document)."""
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (a model is a directory)")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{path} is not a tvq model directory: no {CONFIG_FILE}")
    try:
        document = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path} cannot be read: {e}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a tvq model config")
    if document.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer tvq (format version {document['version']})"
        )
    try:
        config = ModelConfig.from_dict(document.get("config", {}))
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    params_path = path / PARAMS_DIR
    if not params_path.is_dir():
        raise CheckpointError(f"{path} has no parameters ({PARAMS_DIR}/ is missing)")
    try:
        params = warm.params(params_path, lambda: restore_params(params_path))
    except Exception as e:  # orbax raises many kinds; all mean "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"parameters in {params_path} cannot be read: {first}") from None
    params = check_params(params, config, str(path))
    return config, params, document


def read_tokenizer(path: Path, document: dict[str, Any], n_vocab: int) -> Any:
    """The tokenizer a model directory names (None if it names none), checked against the
    model's vocabulary."""
    entry = document.get("tokenizer")
    if entry is None:
        return None
    try:
        tokenizer = load_tokenizer(entry, Path(path))
    except TokenizerError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_vocab(tokenizer, n_vocab)
    return tokenizer
