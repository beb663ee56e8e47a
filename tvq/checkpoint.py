"""Model directories (config.json + orbax parameters) and reference-checkpoint import.

A tvq model directory:
    config.json   {"format": "tvq-model", "version": 1, "config": {...},
                   "block_len": int, "metadata": {...}}
    params/       the parameter tree, an orbax checkpoint
The reference implementation writes flax msgpack TrainStates under
<dir>/checkpoint_<step>/checkpoint (DESIGN.md section 7).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tvq.config import ModelConfig
from tvq.errors import CheckpointError, ConfigError, TokenizerError, TvqError

FORMAT = "tvq-model"
VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

# Reference launch flags that decide the architecture and have no default there.
REQUIRED_FLAGS = (
    "d_model", "d_k", "d_v", "n_head", "n_code", "n_layer", "n_vocab",
    "mem_len", "agg_cache", "pe_abs", "e_tie", "e_preln", "e_scale",
)  # fmt: skip


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict → {"a/b/c": leaf}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key in sorted(tree):
            out.update(flatten(tree[key], f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): tree}


def check_params(params: Any, config: ModelConfig, source: str) -> Any:
    """Checks names and shapes against `config`; returns params cast to its param_dtype."""
    from tvq.model import param_layout

    want = param_layout(config)
    got = flatten(params)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            raise CheckpointError(
                f"{source}: parameter {name} is missing (the config needs shape {want[name]})"
            )
        if name not in want:
            shape = tuple(np.shape(got[name]))
            raise CheckpointError(
                f"{source}: parameter {name} {shape} is not used by this config "
                "(check e_tie, e_preln, pe_abs, n_layer)"
            )
        if tuple(np.shape(got[name])) != want[name]:
            raise CheckpointError(
                f"{source}: parameter {name} has shape {tuple(np.shape(got[name]))}, "
                f"the config needs {want[name]}"
            )
    dtype = config.param_dtype
    return jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, dtype), _nest(got))


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


# -- tvq model directories ------------------------------------------------------------------


TOKENIZER_FILE = "tokenizer.model"
# What else may share a model directory: a training run's files.
ALLOWED_EXTRAS = {"train"}


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


def save_model(model: Any, path: str | os.PathLike) -> None:
    """Writes `model` to a directory; each part is replaced atomically, config.json last."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if path.is_dir() and not is_model_dir(path):
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ALLOWED_EXTRAS)
        if foreign:
            raise CheckpointError(
                f"{path} is not empty and is not a tvq model directory (holds {foreign[0]})"
            )
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving.", dir=path))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, model.params)
        checkpointer.wait_until_finished()
        document = {
            "format": FORMAT,
            "version": VERSION,
            "config": model.config.to_dict(),
            "block_len": model.block_len,
            "tokenizer": tokenizer_entry(model.tokenizer),
            "metadata": model.metadata,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        if model.tokenizer is not None and model.tokenizer.kind == "sentencepiece":
            shutil.copyfile(model.tokenizer.path, tmp / TOKENIZER_FILE)
            os.replace(tmp / TOKENIZER_FILE, path / TOKENIZER_FILE)
        if (path / PARAMS_DIR).exists():
            os.replace(path / PARAMS_DIR, tmp / "old-params")
        os.replace(tmp / PARAMS_DIR, path / PARAMS_DIR)
        os.replace(tmp / CONFIG_FILE, path / CONFIG_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_model_dir(path: str | os.PathLike) -> tuple[ModelConfig, Any, dict[str, Any]]:
    """Reads a model directory → (config, params, the whole config.json document)."""
    import orbax.checkpoint as ocp

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
        params = ocp.StandardCheckpointer().restore(params_path)
    except Exception as e:  # orbax raises many kinds; all mean "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"parameters in {params_path} cannot be read: {first}") from None
    params = check_params(params, config, str(path))
    return config, params, document


def read_tokenizer(path: Path, document: dict[str, Any], n_vocab: int) -> Any:
    """The tokenizer a model directory names, checked against the model's vocabulary."""
    from tvq.tokenizer import load_tokenizer

    entry = document.get("tokenizer")
    if entry is None:
        return None
    try:
        tokenizer = load_tokenizer(entry, Path(path))
    except TokenizerError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_vocab(tokenizer, n_vocab)
    return tokenizer


def check_vocab(tokenizer: Any, n_vocab: int) -> None:
    if tokenizer is not None and tokenizer.vocab_size != n_vocab:
        raise TokenizerError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
            f"(n_vocab) is {n_vocab}"
        )


# -- the reference implementation's checkpoints ---------------------------------------------


def find_reference_file(path: str | os.PathLike) -> Path:
    """Resolves a reference checkpoint: a file, checkpoint_<step>/, or the directory above."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"reference checkpoint {path} does not exist")
    if path.is_file():
        return path
    if (path / "checkpoint").is_file():
        return path / "checkpoint"
    steps = []
    for child in path.iterdir():
        match = re.fullmatch(r"checkpoint_(\d+)", child.name)
        if match:
            steps.append((int(match.group(1)), child))
    if not steps:
        raise CheckpointError(f"no checkpoint_<step> found in {path}")
    _, latest = max(steps)
    return latest if latest.is_file() else find_reference_file(latest)


def read_flags(flags: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(flags, dict):
        return dict(flags)
    try:
        data = json.loads(Path(flags).read_text())
    except OSError as e:
        raise CheckpointError(f"flags file {flags} cannot be read: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"flags file {flags} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"flags file {flags} must hold a JSON object")
    return data


def load_reference(
    checkpoint_path: str | os.PathLike, flags: dict[str, Any] | str | os.PathLike
) -> tuple[ModelConfig, Any, int | None]:
    """Reads a reference TrainState → (config, params, block length of the flags)."""
    from flax import serialization

    flags = read_flags(flags)
    missing = [name for name in REQUIRED_FLAGS if name not in flags]
    if missing:
        raise CheckpointError(f"flags lack architecture setting(s): {', '.join(missing)}")
    try:
        config = ModelConfig.from_dict(flags, ignore_extra=True)
    except TvqError as e:
        raise CheckpointError(f"flags: {e}") from None
    file = find_reference_file(checkpoint_path)
    try:
        state = serialization.msgpack_restore(file.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{file} cannot be read: {e.strerror}") from None
    except Exception as e:  # msgpack raises several kinds for corrupt input
        raise CheckpointError(f"{file} is not a flax msgpack checkpoint ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise CheckpointError(f"{file} holds no 'params' tree")
    params = state["params"]
    if set(params) == {"params"} and isinstance(params["params"], dict):
        params = params["params"]  # a variables dict saved whole
    params = check_params(params, config, str(file))
    block_len = flags.get("block_len")
    block_len = int(block_len) if isinstance(block_len, int) and block_len > 0 else None
    return config, params, block_len
