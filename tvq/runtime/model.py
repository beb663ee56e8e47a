"""The public model: configuration, parameters, a default block length and a tokenizer,
immutable; its calls run the compiled fold over blocks of tvq/runtime/forward.py.

A different block length or tokenizer is a new Model (`with_block_len`,
`with_tokenizer`, or `dataclasses.replace`), never an assigned attribute: compiled
functions are keyed on these values (docs/DESIGN.md section 9).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tvq.config import DTYPES, ModelConfig
from tvq.distributed.devices import replicated
from tvq.errors import InputError, is_int
from tvq.files import checkpoint, reference, warm
from tvq.nn.layout import unstack_params
from tvq.nn.params import init_stacked
from tvq.nn.state import ModelState, check_state, initial_state, state_nbytes
from tvq.runtime.forward import (
    check_algorithm,
    forward_jit,
    on_device,
    sequence_parallel_jit,
)
from tvq.text.tokenizer import Tokenizer, check_vocab

DEFAULT_BLOCK_LEN = 128


def check_sequence_devices(count: Any) -> int:
    """How many local devices one sequence may be spread over, or InputError."""
    available = len(jax.local_devices())
    if not is_int(count) or not 1 <= count <= available:
        raise InputError(
            f"a sequence can be spread over 1 to {available} devices (the devices JAX "
            f"sees), got {count!r}"
        )
    return count


def check_top_k(value: Any, n_vocab: int, name: str) -> int:
    """How many most likely tokens to report, 0 to n_vocab, or InputError."""
    if not is_int(value) or not 0 <= value <= n_vocab:
        raise InputError(f"{name} must be between 0 and the vocabulary size {n_vocab}, "
                         f"got {value!r}")  # fmt: skip
    return value


def check_block_len(block_len: Any) -> int:
    """A positive integer block length, or InputError."""
    if not is_int(block_len, numpy=True) or block_len < 1:
        raise InputError(f"block_len must be a positive integer, got {block_len!r}")
    return int(block_len)


def default_block_len(config: ModelConfig) -> int:
    return max(1, min(DEFAULT_BLOCK_LEN, config.mem_len or DEFAULT_BLOCK_LEN))


def init_params(config: ModelConfig, seed: int = 0) -> Any:
    """Fresh parameters for `config`, as a nested dict in the reference layout."""
    return unstack_params(_init_params(config, jax.random.PRNGKey(seed)))


@warm.entry(static_argnames=("config",))
def _init_params(config: ModelConfig, key: jax.Array) -> Any:
    """The scanned tree, compiled once per config (a jit of a fresh bound `net.init`
    would compile anew at every call); one sublayer traced whatever the depth
    (tvq.nn.params.init_stacked)."""
    return init_stacked(config, key)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A Transformer-VQ model. `block_len` (None: a default from the config),
    `algorithm` (serial or parallel form; None: the faster for the device) and
    `sequence_devices` (one sequence spread over this many local devices) change speed,
    never results (docs/DESIGN.md section 8); `tokenizer` (optional) must cover exactly
    the model's vocabulary. The compute dtype is the config's (`with_dtype`)."""

    config: ModelConfig
    params: Any
    _: dataclasses.KW_ONLY
    block_len: int | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokenizer: Tokenizer | None = None
    algorithm: str | None = None
    sequence_devices: int = 1

    def __post_init__(self) -> None:
        block_len = default_block_len(self.config) if self.block_len is None else self.block_len
        object.__setattr__(self, "block_len", check_block_len(block_len))
        object.__setattr__(self, "algorithm", check_algorithm(self.algorithm))
        object.__setattr__(self, "sequence_devices", check_sequence_devices(self.sequence_devices))
        object.__setattr__(self, "params", on_device(self.params))
        object.__setattr__(self, "metadata", dict(self.metadata or {}))
        check_vocab(self.tokenizer, self.config.n_vocab)

    # -- construction -------------------------------------------------------------------

    @classmethod
    def init(
        cls, config: ModelConfig, seed: int = 0, *, block_len: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> Model:  # fmt: skip
        """A model with freshly initialised parameters (docs/DESIGN.md section 4)."""
        return cls(config, init_params(config, seed), block_len=block_len, tokenizer=tokenizer)

    @classmethod
    def from_reference(
        cls, checkpoint_path: str | os.PathLike, flags: dict[str, Any] | str | os.PathLike
    ) -> Model:
        """Imports a checkpoint of the reference implementation (docs/DESIGN.md section 10)."""
        config, params, block_len = reference.load_reference(checkpoint_path, flags)
        return cls(config, params, block_len=block_len)

    def with_block_len(self, block_len: int) -> Model:
        return dataclasses.replace(self, block_len=block_len)

    def with_tokenizer(self, tokenizer: Tokenizer | None) -> Model:
        return dataclasses.replace(self, tokenizer=tokenizer)

    def with_dtype(self, dtype: str) -> Model:
        """The same parameters computing in `dtype`: "bfloat16" runs the matrix products
        in bfloat16 with float32 sums, and keeps softmax, normalisation, log-probs and
        the state in float32 (bench/RESULTS.md section 9 measures the difference)."""
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return dataclasses.replace(self, config=dataclasses.replace(self.config, dtype=dtype))

    def with_agg_cache(self, agg_cache: bool) -> Model:
        """The same parameters with the aggregate cache on or off (off: each query sees
        its window alone, docs/DESIGN.md section 4); for ablations and baselines."""
        return dataclasses.replace(
            self, config=dataclasses.replace(self.config, agg_cache=bool(agg_cache))
        )

    def save(self, path: str | os.PathLike) -> None:
        """Writes a model directory: config.json, the parameters (orbax) and the tokenizer."""
        checkpoint.save_model(
            path, config=self.config, params=self.params, block_len=self.block_len,
            tokenizer=self.tokenizer, metadata=self.metadata,
        )  # fmt: skip

    # -- inference ----------------------------------------------------------------------

    def initial_state(self, batch_size: int) -> ModelState:
        if not is_int(batch_size) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return initial_state(self.config, batch_size)

    def log_probs(
        self,
        tokens: Any,
        *,
        state: ModelState | None = None,
        block_len: int | None = None,
        algorithm: str | None = None,
    ) -> tuple[jax.Array, ModelState]:
        """tokens int [B, T] → (float32 log-probs [B, T, n_vocab], state after the tokens).
        algorithm "serial" or "parallel" (None: the model's) computes the same numbers
        (docs/DESIGN.md section 12)."""
        tokens = self._check_tokens(tokens, "tokens")
        state = self._check_state(state, tokens.shape[0])
        return self._forward(tokens, state, block_len, None, algorithm)

    def score(
        self,
        inputs: Any,
        targets: Any,
        *,
        state: ModelState | None = None,
        block_len: int | None = None,
        algorithm: str | None = None,
        top_k: int = 0,
    ) -> tuple[Any, ModelState]:
        """Log-probs [B, T] of targets[:, t] following inputs[:, t], and the new state
        (algorithm: as log_probs). top_k > 0: the log-probs are a tuple (of the targets
        [B, T], the top_k largest [B, T, k], their token ids [B, T, k])."""
        inputs = self._check_tokens(inputs, "inputs")
        targets = self._check_tokens(targets, "targets")
        if targets.shape != inputs.shape:
            raise InputError(
                f"targets have shape {tuple(targets.shape)} but inputs {tuple(inputs.shape)}"
            )
        state = self._check_state(state, inputs.shape[0])
        check_top_k(top_k, self.config.n_vocab, "top_k")
        return self._forward(inputs, state, block_len, targets, algorithm, top_k)

    def _forward(self, tokens, state, block_len, targets, algorithm, top_k=0):
        block_len = self._block_len(block_len)
        algorithm = self.algorithm if algorithm is None else check_algorithm(algorithm)
        if self.sequence_devices > 1:  # the parallel form, spread over devices
            mesh = self._sequence_mesh
            tokens, state, targets = replicated(mesh, (tokens, state, targets))
            out = sequence_parallel_jit(
                self.config, self._sequence_params, tokens, state, block_len, targets, mesh,
                top_k=top_k,
            )  # fmt: skip
            # Back on the default device, where every other call leaves its results: what
            # a caller adds them to, or feeds them into next, lives there.
            return on_device(out)
        tokens, state, targets = on_device((tokens, state, targets))
        return forward_jit(
            self.config, self.params, tokens, state, block_len, targets, algorithm=algorithm,
            top_k=top_k,
        )  # fmt: skip

    @functools.cached_property
    def _sequence_mesh(self) -> Mesh:
        return Mesh(np.array(jax.local_devices()[: self.sequence_devices]), ("sequence",))

    @functools.cached_property
    def _sequence_params(self) -> Any:
        return replicated(self._sequence_mesh, self.params)

    @property
    def param_count(self) -> int:
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.params)))

    @property
    def state_bytes_per_sequence(self) -> int:
        return state_nbytes(self.config)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 over the config and every parameter: names this model in state files."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for leaf in jax.tree_util.tree_leaves(self.params):
            digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        return "sha256:" + digest.hexdigest()

    # -- argument checks ----------------------------------------------------------------

    def _block_len(self, block_len: int | None) -> int:
        return self.block_len if block_len is None else check_block_len(block_len)

    def _check_tokens(self, tokens: Any, name: str) -> jax.Array:
        if isinstance(tokens, list | tuple):
            tokens = np.asarray(tokens)
        if not hasattr(tokens, "dtype") or not hasattr(tokens, "shape"):
            raise InputError(f"{name} must be an integer array [batch, time], got {type(tokens)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"{name} must have an integer dtype, got {tokens.dtype}")
        if tokens.ndim != 2:
            raise InputError(
                f"{name} must have rank 2 [batch, time], got shape {tuple(tokens.shape)}"
            )
        if tokens.shape[0] < 1 or tokens.shape[1] < 1:
            raise InputError(f"{name} must hold at least one token, got {tuple(tokens.shape)}")
        values = tokens if isinstance(tokens, np.ndarray) else jnp.asarray(tokens)
        low, high = int(values.min()), int(values.max())  # host arrays stay on the host
        if low < 0 or high >= self.config.n_vocab:
            bad = low if low < 0 else high
            raise InputError(
                f"{name} hold id {bad}, outside the vocabulary [0, {self.config.n_vocab})"
            )
        return jnp.asarray(tokens, jnp.int32)

    def _check_state(self, state: ModelState | None, batch_size: int) -> ModelState:
        if state is None:
            return initial_state(self.config, batch_size)
        return check_state(self.config, state, batch_size)


def default_model_path() -> Path:
    """The built-in model, shipped inside the package."""
    return Path(__file__).parents[1] / "models" / "default"


def load(path: str | os.PathLike | None = None) -> Model:
    """Loads a model directory written by `Model.save`; no path: the built-in model."""
    path = default_model_path() if path is None else Path(path)
    config, params, document = checkpoint.read_model_dir(path)
    block_len = document.get("block_len")
    if not is_int(block_len) or block_len < 1:
        block_len = None
    metadata = document.get("metadata")
    return Model(
        config, params, block_len=block_len,
        metadata=metadata if isinstance(metadata, dict) else {},
        tokenizer=checkpoint.read_tokenizer(path, document, config.n_vocab),
    )  # fmt: skip
