"""State files: the attention state after a text, to continue it later exactly.

One .npz file: the arrays of the ModelState plus the pending last token, and a JSON
header with the model and tokenizer fingerprints, the token count and a SHA-256 of
every array, so a state from another model, or a truncated or edited file, is refused.
Its size is fixed by the architecture, whatever the length of the text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import jax
import numpy as np

from tvq.errors import StateError, is_int
from tvq.files.atomic import write_atomically
from tvq.nn.state import state_shapes
from tvq.runtime.context import Context
from tvq.runtime.model import Model

FORMAT = "tvq-state"
VERSION = 1


def _arrays(context: Context) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves(context.state)
    arrays = {f"state_{i:03d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays["last_token"] = np.asarray(context.last_token, np.int32)
    return arrays


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def save_state(path: str | os.PathLike, model: Model, context: Context) -> None:
    """Writes the context of one sequence to `path`, atomically (a temporary file in the
    same folder, then renamed); StateError if it cannot be written."""
    if context.state.batch_size != 1:
        raise StateError("only a single sequence's state can be saved")
    arrays = _arrays(context)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.fingerprint,
        "tokenizer": model.tokenizer.fingerprint if model.tokenizer else None,
        "tokens": int(context.tokens),
        "checksum": _checksum(arrays),
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    path = Path(path)
    if path.is_dir():
        raise StateError(f"state file {path} is a directory")
    try:
        write_atomically(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise StateError(f"state file {path} cannot be written: {e.strerror}") from None


def load_state(path: str | os.PathLike, model: Model) -> Context:
    """Reads a state file written by save_state for this model; StateError otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise StateError(f"state file {path} is a directory") from None
    except OSError as e:
        raise StateError(f"state file {path} cannot be read: {e.strerror}") from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
    except (ValueError, KeyError, OSError, zipfile.BadZipFile, json.JSONDecodeError, EOFError):
        raise StateError(f"{path} is not a tvq state file (or it is truncated)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise StateError(f"{path} is not a tvq state file")
    if header.get("checksum") != _checksum(arrays):
        raise StateError(f"state file {path} is corrupt: its checksum does not match")
    if header.get("model") != model.fingerprint:
        raise StateError(f"state file {path} was saved with another model")
    tokenizer = model.tokenizer.fingerprint if model.tokenizer else None
    if header.get("tokenizer") != tokenizer:
        raise StateError(f"state file {path} was saved with another tokenizer")
    template = state_shapes(model.config, 1)
    treedef = jax.tree_util.tree_structure(template)
    leaves = jax.tree_util.tree_leaves(template)
    try:
        loaded = [arrays[f"state_{i:03d}"] for i in range(len(leaves))]
        last_token = arrays["last_token"]
    except KeyError:
        raise StateError(f"state file {path} lacks arrays of this model's state") from None
    for got, want in zip(loaded, leaves, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise StateError(f"state file {path} does not fit this model's state")
    if (last_token.shape != (1,) or last_token.dtype != np.int32
            or not 0 <= int(last_token[0]) < model.config.n_vocab):  # fmt: skip
        raise StateError(f"state file {path} holds no valid next token")
    state = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in loaded])
    tokens = header.get("tokens", 0)
    if not is_int(tokens) or tokens < 0:
        raise StateError(f"state file {path} has a corrupt header (token count {tokens!r})")
    return Context(state=state, last_token=last_token, tokens=tokens)
