"""One optimisation step (docs/DESIGN.md section 11): next-token loss + commitment over a
window of tokens, folded over blocks with the attention state carried; AdamW on the
parameters and an exact EMA on the codebooks.
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
from tvq.nn.layout import QUANTIZER, sublayer_params
from tvq.nn.state import ModelState
from tvq.nn.sublayer import SublayerStats
from tvq.nn.transformer import Dropout, Transformer, network
from tvq.runtime.forward import default_chunk_len, fold_blocks
from tvq.train.settings import TrainSettings


@flax.struct.dataclass
class StepMetrics:
    loss: jax.Array  # [] mean next-token NLL, nats
    commit: jax.Array  # [] mean commitment ‖k − sg(C_z)‖² per token
    grad_norm: jax.Array  # [] global norm of the gradient, before clipping


def is_codebook(path: tuple) -> bool:
    return any(getattr(p, "key", None) in ("c_sum", "c_count") for p in path)


def learning_rate(settings: TrainSettings) -> optax.Schedule:
    """Linear warm-up from 0 to lr, then cosine decay to final_lr_ratio · lr; the rate of
    update n (counting from 0) is schedule(n)."""
    decay_steps = max(1, settings.steps - settings.warmup)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, settings.lr, max(1, settings.warmup)),
            optax.cosine_decay_schedule(settings.lr, decay_steps, alpha=settings.final_lr_ratio),
        ],
        [settings.warmup],
    )


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """AdamW (β 0.9/0.98, ε 1e-9) after global-norm clipping with the `learning_rate`
    schedule; weight decay on matrices only; the codebooks are left to the EMA."""
    schedule = learning_rate(settings)

    def decay_mask(params):  # decoupled weight decay on matrices only
        return jax.tree_util.tree_map(lambda x: x.ndim > 1, params)

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
    res = res * layers[:, :, None, None]
    return Dropout(embedding=emb, residuals=tuple(res))


def train_forward(
    config: ModelConfig, params: Any, inputs: jax.Array, targets: jax.Array, state: ModelState,
    block_len: int, algorithm: str = "serial", settings: TrainSettings | None = None,
    key: jax.Array | None = None,
) -> tuple[tuple[jax.Array, tuple[SublayerStats, ...]], ModelState]:  # fmt: skip
    """→ ((Σ NLL, per-sublayer statistics summed over blocks), new state). Either
    algorithm (docs/DESIGN.md section 12) gives the same loss and gradient, with dropout
    too. Dropout when settings asks for it, drawn from `key` (dropout_key)."""
    net, variables, tables = network(config, params)
    zeros = SublayerStats.zeros(config.n_head, config.n_code, config.d_k)
    dropping = settings is not None and settings.dropout
    if dropping and key is None:
        raise ValueError("dropout needs a key")
    batch = inputs.shape[0]
    layers = layer_keep(settings, key, 2 * config.n_layer, batch) if dropping else None

    def step(carry, piece, piece_block_len):
        state, nll, stats, block = carry
        tokens, block_targets = piece
        length = tokens.shape[1]
        dropout = None
        if dropping:
            size = length if piece_block_len is None else piece_block_len
            dropout = dropout_multipliers(settings, key, layers, block, length // size, size,
                                          batch, config.d_model)  # fmt: skip
        state, log_probs, block_stats = net.apply(
            variables, tokens, state, tables, True, None, piece_block_len,
            dropout=dropout, method=Transformer.block,
        )  # fmt: skip
        picked = jnp.take_along_axis(log_probs, block_targets[..., None], axis=-1)
        stats = tuple(a + b for a, b in zip(stats, block_stats, strict=True))
        blocks = 1 if piece_block_len is None else length // piece_block_len
        return (state, nll - jnp.sum(picked), stats, block + blocks), None

    carry = (state, jnp.zeros([]), (zeros,) * (2 * config.n_layer), jnp.zeros([], jnp.int32))
    chunk_len = None
    if algorithm == "parallel":
        chunk_len = default_chunk_len(config, inputs.shape[0], block_len)
    (state, nll, stats, _), _ = fold_blocks(
        step, carry, (inputs, targets), block_len, algorithm, chunk_len
    )
    return (nll, stats), state


def apply_ema(params: Any, stats: tuple[SublayerStats, ...], gamma: float) -> Any:
    """c_sum ← γ·c_sum + (1 − γ)·Σ k assigned; c_count ← γ·c_count + (1 − γ)·count, per
    sublayer in Transformer.sublayers order."""
    params = jax.tree_util.tree_map(lambda x: x, params)  # shallow copy of every dict
    quantizers = [sublayer[QUANTIZER] for sublayer in sublayer_params(params)]
    for quantizer, stat in zip(quantizers, stats, strict=True):
        quantizer["c_sum"] = gamma * quantizer["c_sum"] + (1 - gamma) * stat.code_sum
        quantizer["c_count"] = gamma * quantizer["c_count"] + (1 - gamma) * stat.code_count
    return params


@functools.lru_cache(maxsize=8)
def compiled_step(config: ModelConfig, settings: TrainSettings, algorithm: str = "serial"):
    """(optimizer, compiled step) for a run; one compilation per (config, settings,
    algorithm) in a process, however many runs use it (a fresh closure under jax.jit
    would recompile)."""
    optimizer = make_optimizer(settings)
    return optimizer, make_train_step(config, settings, optimizer, algorithm)


def make_train_step(
    config: ModelConfig, settings: TrainSettings, optimizer, algorithm: str = "serial"
):
    """The compiled step: (params, opt_state, attention state, inputs [B, U], targets
    [B, U], step) → (params, opt_state, attention state after the window, StepMetrics).
    step (the update's number, from 0) is needed only when the settings ask for dropout:
    its draws come from dropout_key(seed, step), so a resumed run draws the same."""

    def loss_fn(params, inputs, targets, state, key):
        (nll, stats), new_state = train_forward(
            config, params, inputs, targets, state, settings.block_len, algorithm, settings, key
        )
        count = inputs.size
        commit = sum(s.commit for s in stats) / count
        loss = nll / count + settings.c_beta * commit
        return loss, (nll / count, commit, stats, new_state)

    def train_step(params, opt_state, state, inputs, targets, step=None):
        key = dropout_key(settings.seed, step) if settings.dropout else None
        grads, (nll, commit, stats, new_state) = jax.grad(loss_fn, has_aux=True)(
            params, inputs, targets, state, key
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        params = apply_ema(params, stats, settings.c_gamma)
        metrics = StepMetrics(loss=nll, commit=commit, grad_norm=optax.tree.norm(grads))
        return params, opt_state, jax.lax.stop_gradient(new_state), metrics

    # A closure over the settings and optimizer, run across processes: not kept on disk.
    return warm.Entry(train_step, donate_argnums=(0, 1, 2), store=False)
