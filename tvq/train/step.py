"""One optimisation step (docs/DESIGN.md section 11): next-token loss + commitment over a
window of tokens, folded over blocks with the attention state carried; AdamW on the
parameters and an exact EMA on the codebooks.

The step sees one layout, the run's (make_train_step); the files' layout is
tvq/train/checkpoints.py's business.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tvq.config import ModelConfig
from tvq.files import warm
from tvq.nn.layout import (
    is_codebook,
    is_stacked,
    map_codebooks,
    parameter_ndim,
    scanned,
    unstack_tree,
)
from tvq.nn.state import AttentionState, ModelState, stack_state, unstack_state
from tvq.nn.sublayer import SublayerStats
from tvq.nn.transformer import Dropout, Transformer, network
from tvq.runtime.forward import default_chunk_len, fold_blocks
from tvq.train.schedules import learning_rate
from tvq.train.settings import TrainSettings


@flax.struct.dataclass
class StepMetrics:
    loss: jax.Array  # [] mean next-token NLL, nats
    commit: jax.Array  # [] mean commitment ‖k − sg(C_z)‖² per token
    grad_norm: jax.Array  # [] global norm of the gradient, before clipping


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """AdamW (β 0.9/0.98, ε 1e-9) after global-norm clipping with the `learning_rate`
    schedule; weight decay on matrices only; the codebooks are left to the EMA."""
    schedule = learning_rate(settings)

    def decay_mask(params):  # decoupled weight decay on matrices only (either tree form)
        return jax.tree_util.tree_map_with_path(lambda path, x: parameter_ndim(path, x) > 1,
                                                params)  # fmt: skip

    main = optax.chain(
        optax.clip_by_global_norm(settings.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=settings.weight_decay,
                    mask=decay_mask),
    )  # fmt: skip

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "codebook" if is_codebook(path) else "main", params
        )

    return optax.multi_transform({"main": main, "codebook": optax.set_to_zero()}, labels)


def dropout_key(seed: int, step: int) -> jax.Array:
    """The random key of update `step`'s dropout (a raw uint32 [2] key)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def layer_keep(settings: TrainSettings, key: jax.Array, n_sublayers: int, batch: int):
    """Layer drop: float [n_sublayers, B], 0 or 1/(1 − p_droplyr): whether each sublayer
    runs for each sequence of the update window (drawn once per window)."""
    keep = 1.0 - settings.p_droplyr
    draw = jax.random.bernoulli(jax.random.fold_in(key, 0), keep, (n_sublayers, batch))
    return draw / keep


def dropout_multipliers(
    settings: TrainSettings, key: jax.Array, layers: jax.Array, first_block: jax.Array,
    n_blocks: int, block_len: int, batch: int, d_model: int,
) -> Dropout:  # fmt: skip
    """The Dropout of a piece of n_blocks blocks of block_len tokens starting at block
    `first_block` of the window. Each block's draws come from its own key, so the serial
    and the parallel form (one block or several per piece) drop the same values."""
    n_sub = layers.shape[0]

    def block_masks(block):
        block_key = jax.random.fold_in(jax.random.fold_in(key, 1), block)

        def mask(index, p):
            if p == 0:  # nothing to draw for a rate that is off
                return jnp.ones((batch, block_len, d_model))
            keep = jax.random.bernoulli(jax.random.fold_in(block_key, index), 1.0 - p,
                                        (batch, block_len, d_model))  # fmt: skip
            return keep / (1.0 - p)

        return mask(0, settings.p_dropemb), jnp.stack(
            [mask(1 + s, settings.p_dropres) for s in range(n_sub)]
        )

    emb, res = jax.vmap(block_masks)(first_block + jnp.arange(n_blocks))
    emb = jnp.moveaxis(emb, 0, 1).reshape(batch, n_blocks * block_len, d_model)
    res = jnp.moveaxis(res, 0, 2).reshape(n_sub, batch, n_blocks * block_len, d_model)
    return Dropout(embedding=emb, residuals=res * layers[:, :, None, None])


def train_forward(
    config: ModelConfig, params: Any, inputs: jax.Array, targets: jax.Array,
    state: ModelState | AttentionState, block_len: int, algorithm: str = "serial",
    settings: TrainSettings | None = None, key: jax.Array | None = None,
    rows: jax.Array | None = None, stacked_stats: bool = False,
) -> tuple[tuple[jax.Array, Any], Any]:  # fmt: skip
    """→ ((Σ NLL, per-sublayer statistics summed over blocks), new state). Either
    algorithm (docs/DESIGN.md section 12) gives the same loss and gradient, with dropout
    too. Dropout when settings asks for it, drawn from `key` (dropout_key); rows (a
    micro-batch of grad_accum) names the window's rows these are, so they drop what
    they drop in the whole batch. With settings.remat the backward pass recomputes each
    sublayer. params in either form (tvq/nn/layout.py). A ModelState gives a tuple of
    SublayerStats, one per sublayer (stacked_stats: stacked [2·n_layer, ...]), and a
    ModelState; a stacked state (the train step's) stacked statistics and state."""
    net, variables, tables = network(config, params)
    public = isinstance(state, ModelState)
    stack = public and net.scanned  # a scan carries the state stacked
    carried = stack_state(state) if stack else state
    n_sub = 2 * config.n_layer
    zeros = _stats_zeros(config)
    dropping = settings is not None and settings.dropout
    if dropping and key is None:
        raise ValueError("dropout needs a key")
    remat = settings is not None and settings.remat
    batch = inputs.shape[0]
    full_batch = batch if rows is None else settings.batch_size
    layers = layer_keep(settings, key, n_sub, full_batch) if dropping else None

    def step(carry, piece, piece_block_len):
        state, nll, stats, block = carry
        tokens, block_targets = piece
        length = tokens.shape[1]
        dropout = None
        if dropping:
            size = length if piece_block_len is None else piece_block_len
            dropout = dropout_multipliers(settings, key, layers, block, length // size, size,
                                          full_batch, config.d_model)  # fmt: skip
            if rows is not None:  # this micro-batch's rows of the whole batch's draws
                dropout = Dropout(embedding=dropout.embedding[rows],
                                  residuals=dropout.residuals[:, rows])  # fmt: skip
        state, log_probs, block_stats = net.apply(
            variables, tokens, state, tables, True, None, piece_block_len,
            dropout=dropout, remat=remat, method=Transformer.block,
        )  # fmt: skip
        picked = jnp.take_along_axis(log_probs, block_targets[..., None], axis=-1)
        blocks = 1 if piece_block_len is None else length // piece_block_len
        return (state, nll - jnp.sum(picked), stats + block_stats, block + blocks), None

    carry = (carried, jnp.zeros([]), zeros, jnp.zeros([], jnp.int32))
    chunk_len = None
    if algorithm == "parallel":
        chunk_len = default_chunk_len(config, batch, block_len)
    (carried, nll, stats, _), _ = fold_blocks(
        step, carry, (inputs, targets), block_len, algorithm, chunk_len
    )
    if public:
        stats = stats if stacked_stats else unstack_tree(stats)
        return (nll, stats), unstack_state(carried) if stack else carried
    return (nll, stats), carried


def apply_ema(params: Any, stats: SublayerStats, gamma: float) -> Any:
    """c_sum ← γ·c_sum + (1 − γ)·Σ k assigned; c_count ← γ·c_count + (1 − γ)·count, per
    sublayer, from statistics stacked [2·n_layer, ...] in the network's order; params
    in either form (tvq.nn.layout.map_codebooks)."""

    def ema(total, count, stat: SublayerStats):
        return (gamma * total + (1 - gamma) * stat.code_sum,
                gamma * count + (1 - gamma) * stat.code_count)  # fmt: skip

    return map_codebooks(ema, params, stats)


@functools.lru_cache(maxsize=8)
def compiled_step(config: ModelConfig, settings: TrainSettings, algorithm: str = "serial"):
    """(optimizer, compiled step) for a run; one compilation per (config, settings,
    algorithm) in a process, however many runs use it (a fresh closure under jax.jit
    would recompile)."""
    optimizer = make_optimizer(settings)
    return optimizer, make_train_step(config, settings, optimizer, algorithm)


def micro_batches(x: jax.Array, n: int, axis: int = 0) -> jax.Array:
    """[..., B, ...] (B on `axis`) → [n, ..., B / n, ...]: micro-batch k holds rows k,
    k + n, k + 2n, …, so each device's rows split evenly when B is a multiple of n times
    the device count (the rows of a device are contiguous)."""
    shape = x.shape
    x = x.reshape(*shape[:axis], shape[axis] // n, n, *shape[axis + 1 :])
    return jnp.moveaxis(x, axis + 1, 0)


def whole_batch(x: jax.Array, axis: int = 0) -> jax.Array:
    """The inverse of micro_batches."""
    n = x.shape[0]
    x = jnp.moveaxis(x, 0, axis + 1)
    shape = x.shape
    return x.reshape(*shape[:axis], shape[axis] * n, *shape[axis + 2 :])


def rows_axis(state: ModelState | AttentionState) -> int:
    """The batch rows' axis of an attention state's arrays: 1 when stacked by sublayer."""
    return 0 if isinstance(state, ModelState) else 1


def make_train_step(
    config: ModelConfig, settings: TrainSettings, optimizer, algorithm: str = "serial"
) -> warm.Entry:
    """The compiled step: (params, opt_state, attention state, inputs [B, U], targets
    [B, U], step) → (params, opt_state, attention state after the window, StepMetrics).
    step (the update's number, from 0) is needed only when the settings ask for dropout:
    its draws come from dropout_key(seed, step), so a resumed run draws the same.

    The step sees one layout, the run's (docs/DESIGN.md section 11): where the network
    scans its sublayers (tvq.nn.layout.scanned), the scanned tree, its optimiser state
    and a stacked AttentionState; else the reference tree, its optimiser state and a
    ModelState. Files hold the reference layout; tvq/train/checkpoints.py converts where
    they are written and read. The first three arguments are donated: the outputs take
    their place. With grad_accum N the B rows run as N micro-batches of B / N rows (a
    scan inside the step: rows k, k + N, …), whose gradients, losses and codebook
    statistics are summed: one batch's update, float rounding aside, with 1/N of the
    activations in memory."""
    scan = scanned(2 * config.n_layer)

    def loss_fn(params, inputs, targets, state, key, rows, count):
        (nll, stats), new_state = train_forward(
            config, params, inputs, targets, state, settings.block_len, algorithm, settings,
            key, rows, stacked_stats=True,
        )  # fmt: skip
        commit = jnp.sum(stats.commit)
        loss = nll / count + settings.c_beta * (commit / count)
        return loss, (nll, commit, stats, new_state)

    gradient = jax.grad(loss_fn, has_aux=True)

    def train_step(params, opt_state, state, inputs, targets, step=None):
        _check_layout(scan, params, state)
        key = dropout_key(settings.seed, step) if settings.dropout else None
        if settings.grad_accum == 1:
            grads, (nll, commit, stats, state) = gradient(
                params, inputs, targets, state, key, None, inputs.size
            )
        else:
            grads, (nll, commit, stats, state) = _accumulated(
                config, gradient, settings.grad_accum, params, inputs, targets, state, key
            )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = apply_ema(optax.apply_updates(params, updates), stats, settings.c_gamma)
        metrics = StepMetrics(loss=nll / inputs.size, commit=commit / inputs.size,
                              grad_norm=optax.tree.norm(grads))  # fmt: skip
        return params, opt_state, jax.lax.stop_gradient(state), metrics

    # A closure over the settings and optimizer, run across processes: not kept on disk.
    return warm.Entry(train_step, donate_argnums=(0, 1, 2), store=False)


def _accumulated(config, gradient, accum, params, inputs, targets, state, key):
    """gradient's (grads, (nll, commit, stats, new state)) for the whole batch, run as
    `accum` micro-batches under a scan: the first four summed, the states rejoined."""
    rows = micro_batches(jnp.arange(inputs.shape[0]), accum)
    axis = rows_axis(state)
    pieces = (micro_batches(inputs, accum), micro_batches(targets, accum),
              jax.tree_util.tree_map(lambda x: micro_batches(x, accum, axis), state),
              rows)  # fmt: skip

    def micro(total, piece):
        tokens, piece_targets, piece_state, piece_rows = piece
        grads, (nll, commit, stats, new_state) = gradient(
            params, tokens, piece_targets, piece_state, key, piece_rows, inputs.size
        )
        total = jax.tree_util.tree_map(jnp.add, total, (grads, nll, commit, stats))
        return total, new_state

    scalar = jnp.zeros([], jnp.float32)
    zero = (jax.tree_util.tree_map(jnp.zeros_like, params), scalar, scalar,
            _stats_zeros(config))  # fmt: skip
    (grads, nll, commit, stats), new_state = jax.lax.scan(micro, zero, pieces)
    new_state = jax.tree_util.tree_map(lambda x: whole_batch(x, axis), new_state)
    return grads, (nll, commit, stats, new_state)


def _check_layout(scan: bool, params: Any, state: Any) -> None:
    """ValueError (when the step is traced) unless params and state are in the run's
    layout."""
    if is_stacked(params) != scan or isinstance(state, ModelState) == scan:
        form = ("the scanned tree and a stacked AttentionState" if scan
                else "the reference tree and a ModelState")  # fmt: skip
        raise ValueError(f"this network's step runs on {form}: the run's layout "
                         "(tvq.train.checkpoints.to_run_layout)")  # fmt: skip


def _stats_zeros(config: ModelConfig) -> SublayerStats:
    """Stacked zero statistics [2·n_layer, ...]."""
    zeros = SublayerStats.zeros(config.n_head, config.n_code, config.d_k)
    return jax.tree_util.tree_map(lambda x: jnp.zeros((2 * config.n_layer, *x.shape)), zeros)


def step_memory(train_step, params, opt_state, state, inputs, targets, step=None) -> dict | None:
    """The compiled step's memory in bytes, for the arguments of a call (arrays or
    jax.ShapeDtypeStructs): {"arguments", "outputs", "temporaries", "aliased", "total"}
    from XLA's memory analysis (`compiled.memory_analysis()`), or None where the backend
    gives none. It compiles the step for these shapes (with JAX's persistent cache on,
    as the CLI has it, the call then loads that program instead of compiling again)."""
    try:
        lowered = train_step.lower(params, opt_state, state, inputs, targets, step)
        analysis = lowered.compile().memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if analysis is None:
        return None
    sizes = {
        "arguments": int(analysis.argument_size_in_bytes),
        "outputs": int(analysis.output_size_in_bytes),
        "temporaries": int(analysis.temp_size_in_bytes),
        "aliased": int(analysis.alias_size_in_bytes),
    }
    sizes["total"] = sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"]
    return sizes
