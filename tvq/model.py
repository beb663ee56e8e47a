"""The public model: parameters plus compiled loops over blocks.

A sequence of any length is cut into blocks of `block_len` tokens (and one
shorter tail); a `jax.lax.scan` carries the fixed-size attention state from
block to block, so time is linear in length and memory is flat. Results do
not depend on the block length (DESIGN.md section 5, invariant 3): it is a
speed setting only.
"""

from __future__ import annotations

import collections
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tvq.config import ModelConfig
from tvq.errors import InputError, StateError
from tvq.state import ModelState, initial_state
from tvq.transformer import Transformer

# How often each compiled function was traced; tests use it to prove reuse.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

DEFAULT_BLOCK_LEN = 128


def to_blocks(x: jax.Array, block_len: int) -> jax.Array:
    """[B, n·L, ...] → [n, B, L, ...]."""
    b, t = x.shape[:2]
    x = x.reshape(b, t // block_len, block_len, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)


def from_blocks(x: jax.Array) -> jax.Array:
    """[n, B, L, ...] → [B, n·L, ...]."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def scan_blocks(step: Callable, carry: Any, seqs: Any, block_len: int) -> tuple[Any, Any]:
    """Folds `step(carry, block) -> (carry, out)` over blocks of a [B, T, ...] pytree.

    Full blocks run under one lax.scan; a tail shorter than block_len runs as one
    more, shorter block. Outputs are joined back to [B, T, ...].
    """
    length = jax.tree_util.tree_leaves(seqs)[0].shape[1]
    n_full, tail = divmod(length, block_len)
    outs = []
    if n_full:
        head = jax.tree_util.tree_map(
            lambda a: to_blocks(a[:, : n_full * block_len], block_len), seqs
        )
        carry, ys = jax.lax.scan(step, carry, head)
        outs.append(jax.tree_util.tree_map(from_blocks, ys))
    if tail:
        rest = jax.tree_util.tree_map(lambda a: a[:, n_full * block_len :], seqs)
        carry, y = step(carry, rest)
        outs.append(y)
    if len(outs) == 1:
        return carry, outs[0]
    return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=1), *outs)


def run_block(net, variables, tables, state: ModelState, tokens, offsets=None):
    """One block of tokens [B, L] through the network → (new state, log-probs [B, L, N])."""
    x = net.apply(variables, tokens, state.sublayers[0].pos_offset, method=Transformer.embed)
    if offsets is not None:
        x = x + offsets.astype(x.dtype)
    state, x, _ = net.apply(variables, x, state, tables, method=Transformer.body)
    return state, net.apply(variables, x, method=Transformer.log_softmax)


def forward(
    config: ModelConfig,
    params: Any,
    tokens: jax.Array,
    state: ModelState,
    block_len: int,
    targets: jax.Array | None = None,
    input_offsets: jax.Array | None = None,
) -> tuple[jax.Array, ModelState]:
    """Runs tokens [B, T] from `state`.

    Returns (log-probs [B, T, N], new state), or with targets [B, T] the
    log-probs of the targets [B, T] — then only one block of logits ever exists.
    input_offsets [B, T, D], added to the embeddings, lets tests take Jacobians.
    """
    TRACE_COUNTS["forward"] += 1
    net = Transformer(config)
    variables = {"params": params}
    tables = net.apply(variables, method=Transformer.tables)

    def step(carry: ModelState, block):
        block_tokens, block_targets, block_offsets = block
        carry, log_probs = run_block(net, variables, tables, carry, block_tokens, block_offsets)
        if block_targets is None:
            return carry, log_probs
        return carry, jnp.take_along_axis(log_probs, block_targets[..., None], axis=-1)[..., 0]

    new_state, out = scan_blocks(step, state, (tokens, targets, input_offsets), block_len)
    return out, new_state


_forward_jit = jax.jit(forward, static_argnames=("config", "block_len"))


def on_device(tree: Any) -> Any:
    """Commits arrays to the default device. jit keys its compiled code on whether
    arguments are committed: a jit's outputs are, host arrays and fresh constants are not,
    so feeding a call's output state back in would compile the same function twice.
    Compiled entry points take their arguments through here."""
    return jax.device_put(tree, jax.devices()[0])


class Model:
    """A Transformer-VQ model: configuration, parameters and a default block length."""

    def __init__(
        self,
        config: ModelConfig,
        params: Any,
        *,
        block_len: int | None = None,
        metadata: dict[str, Any] | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.config = config
        self.params = on_device(params)
        self.block_len = check_block_len(
            default_block_len(config) if block_len is None else block_len
        )
        self.metadata = dict(metadata or {})
        if tokenizer is not None:
            from tvq.checkpoint import check_vocab

            check_vocab(tokenizer, config.n_vocab)
        self.tokenizer = tokenizer

    # -- construction -------------------------------------------------------------------

    @classmethod
    def init(cls, config: ModelConfig, seed: int = 0, *, block_len: int | None = None) -> Model:
        """A model with freshly initialised parameters (DESIGN.md section 4 initialisers)."""
        return cls(config, init_params(config, seed), block_len=block_len)

    @classmethod
    def from_reference(
        cls, checkpoint_path: str | os.PathLike, flags: dict[str, Any] | str | os.PathLike
    ) -> Model:
        """Imports a checkpoint of the reference implementation (DESIGN.md section 7)."""
        from tvq.checkpoint import load_reference

        config, params, block_len = load_reference(checkpoint_path, flags)
        return cls(config, params, block_len=block_len)

    def save(self, path: str | os.PathLike) -> None:
        """Writes a model directory: config.json and the parameters as an orbax checkpoint."""
        from tvq.checkpoint import save_model

        save_model(self, path)

    # -- inference ----------------------------------------------------------------------

    def initial_state(self, batch_size: int) -> ModelState:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        return initial_state(self.config, batch_size)

    def log_probs(
        self,
        tokens: Any,
        *,
        state: ModelState | None = None,
        block_len: int | None = None,
    ) -> tuple[jax.Array, ModelState]:
        """tokens int [B, T] → (float32 log-probs [B, T, n_vocab], state after the tokens)."""
        tokens = self._check_tokens(tokens, "tokens")
        state = self._check_state(state, tokens.shape[0])
        block_len = check_block_len(self.block_len if block_len is None else block_len)
        tokens, state = on_device((tokens, state))
        return _forward_jit(self.config, self.params, tokens, state, block_len)

    def score(
        self,
        inputs: Any,
        targets: Any,
        *,
        state: ModelState | None = None,
        block_len: int | None = None,
    ) -> tuple[jax.Array, ModelState]:
        """Log-probs [B, T] of targets[:, t] following inputs[:, t], and the new state."""
        inputs = self._check_tokens(inputs, "inputs")
        targets = self._check_tokens(targets, "targets")
        if targets.shape != inputs.shape:
            raise InputError(
                f"targets have shape {tuple(targets.shape)} but inputs {tuple(inputs.shape)}"
            )
        state = self._check_state(state, inputs.shape[0])
        block_len = check_block_len(self.block_len if block_len is None else block_len)
        inputs, targets, state = on_device((inputs, targets, state))
        return _forward_jit(self.config, self.params, inputs, state, block_len, targets)

    @property
    def param_count(self) -> int:
        return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(self.params)))

    @property
    def state_bytes_per_sequence(self) -> int:
        return initial_state_nbytes(self.config)

    # -- argument checks ----------------------------------------------------------------

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


def check_state(config: ModelConfig, state: Any, batch_size: int) -> ModelState:
    """Raises StateError unless `state` fits this config and batch size."""
    if not isinstance(state, ModelState):
        raise StateError(f"state must be a tvq ModelState, got {type(state).__name__}")
    expected = state_shapes(config, batch_size)
    if len(state.sublayers) != len(expected.sublayers):
        raise StateError(
            f"state has {len(state.sublayers)} sublayers, this model has "
            f"{len(expected.sublayers)}: it belongs to another model"
        )
    if state.batch_size != batch_size:
        raise StateError(
            f"state is for batch size {state.batch_size}, the tokens have batch size {batch_size}"
        )
    got_leaves = jax.tree_util.tree_leaves(state)
    want_leaves = jax.tree_util.tree_leaves(expected)
    for got, want in zip(got_leaves, want_leaves, strict=True):
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise StateError(
                f"state array of shape {tuple(got.shape)} {got.dtype} does not fit this model "
                f"(expected {tuple(want.shape)} {want.dtype}): it belongs to another model"
            )
    return state


def check_block_len(block_len: Any) -> int:
    if not isinstance(block_len, int | np.integer) or isinstance(block_len, bool) or block_len < 1:
        raise InputError(f"block_len must be a positive integer, got {block_len!r}")
    return int(block_len)


def default_block_len(config: ModelConfig) -> int:
    return max(1, min(DEFAULT_BLOCK_LEN, config.mem_len or DEFAULT_BLOCK_LEN))


@functools.lru_cache(maxsize=64)
def state_shapes(config: ModelConfig, batch_size: int) -> ModelState:
    """The state's shapes and dtypes, traced once per (config, batch size)."""
    return jax.eval_shape(lambda: initial_state(config, batch_size))


def initial_state_nbytes(config: ModelConfig) -> int:
    shapes = state_shapes(config, 1)
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)))


def init_params(config: ModelConfig, seed: int = 0) -> Any:
    """Fresh parameters for `config`, as a nested dict in the reference layout."""
    net = Transformer(config)
    tokens = jnp.zeros([1, 1], jnp.int32)
    variables = jax.jit(net.init)(jax.random.PRNGKey(seed), tokens, initial_state(config, 1))
    return variables["params"]


def param_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape (DESIGN.md section 4's layout), worked out from
    the config alone: checking a checkpoint costs no tracing of the model at start-up.
    tests/test_checkpoint_and_errors.py holds it equal to what `Transformer.init` makes."""
    d, n = config.d_model, config.n_vocab
    hk, hv = config.n_head * config.d_k, config.n_head * config.d_v
    layout = {"token_embedder/embs": (n, d), "token_embedder/bias_out": (n,)}
    if config.pe_abs:
        layout["position_embedder/scale"] = ()
    for i in range(config.n_layer):
        for sub in ("scanned_attn1", "scanned_attn2"):
            prefix = f"transformer_layers_{i}/{sub}/"
            layout.update({
                prefix + "input_ln/g": (d,), prefix + "input_ln/b": (d,),
                prefix + "q_proj/kernel": (d, hk),
                prefix + "kvg_proj/kernel": (d, hk + 2 * hv),
                prefix + "r_proj/kernel": (d, hk),
                prefix + "res_proj/kernel": (hv, d),
                prefix + "u": (hk,), prefix + "v": (hk,),
                prefix + "quantizer/c_sum": (config.n_head, config.n_code, config.d_k),
                prefix + "quantizer/c_count": (config.n_head, config.n_code),
            })  # fmt: skip
    if config.e_preln:
        layout.update({"out_ln/g": (d,), "out_ln/b": (d,)})
    if not config.e_tie:
        layout.update({"out_proj/kernel": (d, n), "out_proj/bias": (n,)})
    return layout


def param_shapes(config: ModelConfig) -> Any:
    """The parameter tree of `config` as ShapeDtypeStructs, without computing anything."""
    net = Transformer(config)
    tokens = jax.ShapeDtypeStruct([1, 1], jnp.int32)
    state = state_shapes(config, 1)
    return jax.eval_shape(net.init, jax.random.PRNGKey(0), tokens, state)["params"]


def default_model_path() -> Path:
    """The built-in model, shipped inside the package."""
    return Path(__file__).parent / "models" / "default"


def load(path: str | os.PathLike | None = None) -> Model:
    """Loads a model directory written by `Model.save`; no path: the built-in model."""
    from tvq.checkpoint import read_model_dir, read_tokenizer

    path = default_model_path() if path is None else Path(path)
    config, params, document = read_model_dir(path)
    block_len = document.get("block_len")
    if not isinstance(block_len, int) or block_len < 1:
        block_len = None
    tokenizer = read_tokenizer(path, document, config.n_vocab)
    return Model(
        config, params, block_len=block_len, metadata=document.get("metadata"), tokenizer=tokenizer
    )
