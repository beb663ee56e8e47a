"""Importing checkpoints of the reference implementation (docs/DESIGN.md section 10).

The reference saves a flax TrainState (step, params, opt_state, …) as msgpack under
<dir>/checkpoint_<step>/checkpoint; its architecture lives in the launch flags, not in
the checkpoint, so both are needed.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tvq.config import ModelConfig
from tvq.errors import CheckpointError, TvqError
from tvq.nn.params import check_params

# Reference launch flags that decide the architecture and have no default there.
REQUIRED_FLAGS = (
    "d_model", "d_k", "d_v", "n_head", "n_code", "n_layer", "n_vocab",
    "mem_len", "agg_cache", "pe_abs", "e_tie", "e_preln", "e_scale",
)  # fmt: skip


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
