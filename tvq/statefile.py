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
import tempfile
import zipfile
from pathlib import Path

import jax
import numpy as np

from tvq.errors import StateError
from tvq.model import Model
from tvq.scoring import Context
from tvq.state import initial_state

FORMAT = "tvq-state"
VERSION = 1


def model_fingerprint(model: Model) -> str:
    """SHA-256 over the config and every parameter (cached on the model)."""
    cached = getattr(model, "_fingerprint", None)
    if cached is None:
        digest = hashlib.sha256(model.config.to_json().encode())
        for leaf in jax.tree_util.tree_leaves(model.params):
            digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        cached = "sha256:" + digest.hexdigest()
        model._fingerprint = cached
    return cached


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
    if context.state.batch_size != 1:
        raise StateError("only a single sequence's state can be saved")
    arrays = _arrays(context)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_fingerprint(model),
        "tokenizer": model.tokenizer.fingerprint if model.tokenizer else None,
        "tokens": int(context.tokens),
        "checksum": _checksum(arrays),
    }
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike, model: Model) -> Context:
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
    if header.get("format") != FORMAT:
        raise StateError(f"{path} is not a tvq state file")
    if header.get("checksum") != _checksum(arrays):
        raise StateError(f"state file {path} is corrupt: its checksum does not match")
    if header.get("model") != model_fingerprint(model):
        raise StateError(f"state file {path} was saved with another model")
    tokenizer = model.tokenizer.fingerprint if model.tokenizer else None
    if header.get("tokenizer") != tokenizer:
        raise StateError(f"state file {path} was saved with another tokenizer")
    template = initial_state(model.config, 1)
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
    state = jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in loaded])
    return Context(state=state, last_token=last_token, tokens=int(header.get("tokens", 0)))
