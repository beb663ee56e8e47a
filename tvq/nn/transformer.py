"""The whole Transformer-VQ network (docs/DESIGN.md section 5), and the only place that
runs its sublayers.

tokens → embeddings (+ scaled absolute sinusoids) → n_layer × [VQ-attention,
VQ-attention] residual sublayers → optional RMSNorm → tied or untied output →
· e_scale → log-softmax. Two entry points share that pass: `block` (a block of tokens
against the window state: scoring and training, folded over blocks by tvq/runtime/forward.py)
and `step` (one token against the decoding rings: tvq/decoding.py).

Depth is a scan: the 2·n_layer sublayers' parameters are stacked on a leading axis (the
scanned tree, tvq/nn/layout.py) and one `lax.scan` runs them in order, so a compiled
program holds one copy of the sublayer whatever the depth (MaxText's `scan_layers`).
Their states, rings, tables, training statistics and dropout masks travel stacked the
same way. The public per-sublayer forms (ModelState, the reference tree) are stacked at
the entry points and unstacked outside the compiled programs (tvq/runtime/forward.py); a
training run keeps them stacked and converts at its checkpoints
(tvq/train/checkpoints.py). A network of at most layout.UNROLLED_MAX sublayers (the built-in
model) runs them one after another instead, each reading its own arrays: the same
numbers, and no per-step copies of slices (layout.py says why that matters on a CPU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tvq.config import ModelConfig
from tvq.nn.attention import AttentionTables
from tvq.nn.layers import RMSNorm, kernel_init, sinusoid, zeros_init
from tvq.nn.layout import (
    STACK,
    is_stacked,
    layer_name,
    scanned,
    stack_params,
    stack_trees,
    sublayer_params,
    unstack_tree,
)
from tvq.nn.ring import RingState, sublayer_axis_first, sublayer_axis_second
from tvq.nn.state import (
    AttentionState,
    ModelState,
    initial_attention_state,
    stack_state,
    unstack_state,
)
from tvq.nn.sublayer import SublayerStats, VQAttention, attention_fields


@flax.struct.dataclass
class Dropout:
    """Training-time dropout of one piece of tokens (docs/DESIGN.md section 11), as
    multipliers already scaled by 1/(1 − p): `embedding` [B, L, D] for the token
    embeddings, `residuals` [2·n_layer, B, L, D], one per sublayer, for its residual branch
    (residual dropout times layer drop). Made by tvq.train.step.dropout_multipliers."""

    embedding: jax.Array
    residuals: jax.Array


def as_stacked(tree: Any) -> Any:
    """Per-sublayer values (a ModelState, a tuple) stacked; stacked ones as they are."""
    if isinstance(tree, ModelState):
        return stack_state(tree)
    return stack_trees(tree) if isinstance(tree, tuple) else tree


def as_tuple(tree: Any) -> tuple[Any, ...]:
    """Per-sublayer values as a tuple, one per sublayer (the inverse of as_stacked)."""
    if isinstance(tree, ModelState):
        return tree.sublayers
    return tree if isinstance(tree, tuple) else unstack_tree(tree)


def sublayer_module(config: ModelConfig) -> VQAttention:
    """The VQ-attention sublayer of `config`, unbound: the scan applies it to each
    sublayer's slice of the stacked parameters."""
    return VQAttention(**attention_fields(config), parent=None)


def init_sublayers(key: jax.Array, config: ModelConfig) -> Any:
    """Fresh parameters of the 2·n_layer sublayers, stacked: sublayer i draws from
    split(key, 2·n_layer)[i]; one sublayer is traced, under a scan."""
    sublayer = sublayer_module(config)
    x = jnp.zeros([1, 1, config.d_model], config.dtype)
    state = initial_attention_state(config, 1)

    def run_once(module: VQAttention):  # creates every parameter of the sublayer
        return module(x, state, module.tables())

    def one(sub_key):
        return sublayer.init(sub_key, method=run_once)["params"]

    return jax.lax.map(one, jax.random.split(key, 2 * config.n_layer))


class Transformer(nn.Module):
    """The network; the only module that reads ModelConfig."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = TokenEmbedder(cfg.n_vocab, cfg.d_model, cfg.param_dtype)
        if cfg.pe_abs:
            self.position_embedder = PositionScale()
        # one sublayer's tree, every leaf [2·n_layer, ...] (tvq/nn/layout.py)
        self.stacked = self.param(STACK, init_sublayers, cfg)
        if cfg.e_preln:
            self.out_ln = RMSNorm(cfg.d_model, cfg.param_dtype)
        if not cfg.e_tie:
            self.out_proj = nn.Dense(
                cfg.n_vocab,
                use_bias=True,
                kernel_init=kernel_init,
                bias_init=zeros_init,
                dtype=jnp.float32,  # logits always in full precision
                param_dtype=cfg.param_dtype,
            )

    def sublayer_trees(self) -> list[Any]:
        """Each sublayer's parameters: the reference tree's own dicts when the variables
        hold them (network() keeps them beside the stacked ones: read where they lie),
        else slices of the stacked arrays."""
        params = self.variables["params"]
        if layer_name(0) in params:
            return sublayer_params(params)
        return list(unstack_tree(self.stacked))

    @property
    def scanned(self) -> bool:
        """Whether the sublayers run as a scan, else one after another (layout.scanned)."""
        return scanned(2 * self.config.n_layer)

    def tables(self) -> AttentionTables | tuple[AttentionTables, ...]:
        """Per-sublayer values of the parameters alone, computed once per compiled call and
        passed to every block or step: stacked [2·n_layer, ...] for the scan, one per
        sublayer for the unrolled network (each read where it lies)."""
        sublayer = sublayer_module(self.config)

        def tables_of(params):
            return sublayer.apply({"params": params}, method=VQAttention.tables)

        if self.scanned:
            return jax.vmap(tables_of)(self.stacked)
        return tuple(tables_of(params) for params in self.sublayer_trees())

    def block(
        self,
        tokens: jax.Array,
        state: ModelState | AttentionState,
        tables: AttentionTables,
        train: bool = False,
        offsets: jax.Array | None = None,
        block_len: int | None = None,
        seq_axis: str | None = None,
        n_devices: int = 1,
        dropout: Dropout | None = None,
        remat: bool = False,
    ) -> tuple[Any, jax.Array, SublayerStats | None]:
        """A block of tokens [B, L] → (new state, float32 log-probs [B, L, N], training
        statistics [2·n_layer, ...] or None). The state is a ModelState, or stacked
        (state.stack_state: what a fold over blocks carries when the network scans its
        sublayers), and comes back in the same form; tables as `tables` gives them.
        offsets [B, L, D], added to the embeddings, let tests take Jacobians with
        respect to the inputs. With block_len, the tokens are L / block_len blocks run in
        the parallel form (docs/DESIGN.md section 8); with seq_axis too, this device's
        run of blocks of one sequence spread over n_devices devices in order (inside
        shard_map). dropout (training only) multiplies the embeddings and each
        sublayer's residual. remat: the backward pass recomputes each sublayer's
        intermediates instead of keeping them (gradient checkpointing, same gradient)."""
        if isinstance(state, ModelState):
            pos_offset = state.sublayers[0].pos_offset
        else:  # stacked: [2·n_layer, B]
            pos_offset = state.pos_offset[0]
        if seq_axis is not None:
            pos_offset = pos_offset + jax.lax.axis_index(seq_axis) * tokens.shape[1]
        x = self.embed(tokens, pos_offset)
        if offsets is not None:
            x = x + offsets.astype(x.dtype)
        if dropout is not None:
            x = x * dropout.embedding.astype(x.dtype)
        sublayer = sublayer_module(self.config)

        def through(x, params, sub_state, table, keep):
            sub_state, res, stats = sublayer.apply(
                {"params": params}, x, sub_state, table, train, block_len, seq_axis, n_devices
            )
            if keep is not None:
                res = res * keep.astype(res.dtype)
            return x + res, (sub_state, stats)

        if remat:
            through = jax.checkpoint(through, prevent_cse=False)
        residuals = None if dropout is None else dropout.residuals
        if self.scanned:
            x, (states, stats) = jax.lax.scan(
                lambda x, xs: through(x, *xs), x,
                (self.stacked, as_stacked(state), as_stacked(tables), residuals),
            )  # fmt: skip
            states = unstack_state(states) if isinstance(state, ModelState) else states
        else:
            states, stats = [], []
            pieces = zip(self.sublayer_trees(), as_tuple(state), as_tuple(tables), strict=True)
            for index, (params, sub_state, table) in enumerate(pieces):
                keep = None if residuals is None else residuals[index]
                x, (sub_state, sub_stats) = through(x, params, sub_state, table, keep)
                states.append(sub_state)
                stats.append(sub_stats)
            states = ModelState(sublayers=tuple(states)) if isinstance(state, ModelState) \
                else stack_trees(states)  # fmt: skip
            stats = stack_trees(stats) if train else None
        return states, self.log_softmax(x), stats if train else None

    def step(
        self, tokens: jax.Array, rings: tuple[RingState, ...] | RingState, tables: AttentionTables
    ) -> tuple[Any, jax.Array]:
        """One token per row, tokens [B] → (new rings, float32 log-probs [B, N]); equal to a
        block of length 1 (docs/DESIGN.md invariant 3). The rings come in the form
        tvq.nn.ring.model_to_ring made and go back in it: stacked (rows first), the
        sublayers run as a scan; a tuple, one per sublayer, they run one after another,
        each reading its weights where they lie."""
        sublayer = sublayer_module(self.config)

        def through(x, params, ring, table):
            ring, res = sublayer.apply({"params": params}, x, ring, table, method=VQAttention.step)
            return x + res, ring

        if isinstance(rings, RingState):
            layer_first = sublayer_axis_first(rings)
            x = self.embed(tokens[:, None], layer_first.pos_offset[0])
            x, layer_first = jax.lax.scan(
                lambda x, xs: through(x, *xs), x, (self.stacked, layer_first, as_stacked(tables))
            )
            rings = sublayer_axis_second(layer_first)
        else:
            x = self.embed(tokens[:, None], rings[0].pos_offset)
            new = []
            pieces = zip(rings, self.sublayer_trees(), as_tuple(tables), strict=True)
            for ring, params, table in pieces:
                x, ring = through(x, params, ring, table)
                new.append(ring)
            rings = tuple(new)
        return rings, self.log_softmax(x)[:, 0]

    def embed(self, tokens: jax.Array, pos_offset: jax.Array) -> jax.Array:
        """tokens [B, L] → [B, L, D] in the compute dtype."""
        cfg = self.config
        x = self.token_embedder(tokens).astype(jnp.float32)
        if cfg.pe_abs:
            positions = pos_offset[:, None] + jnp.arange(tokens.shape[1])[None, :]
            x = x + self.position_embedder() * sinusoid(positions, cfg.d_model, cfg.pe_lam)
        return x.astype(cfg.dtype)

    def log_softmax(self, x: jax.Array) -> jax.Array:
        """Features [B, L, D] → float32 next-token log-probs [B, L, N]."""
        cfg = self.config
        if cfg.e_preln:
            x = self.out_ln(x)
        x = x.astype(jnp.float32)
        if cfg.e_tie:
            logits = self.token_embedder.logits(x)
        else:
            logits = self.out_proj(x)
        return jax.nn.log_softmax(logits * cfg.e_scale, axis=-1)

    def create(self) -> None:
        """Touches every parameter without running the network: `Transformer.init(key,
        method=Transformer.create)` makes the scanned tree (tvq.runtime.model.init_params)."""
        x = self.embed(jnp.zeros([1, 1], jnp.int32), jnp.zeros([1], jnp.int32))
        self.log_softmax(x)
        jax.tree_util.tree_leaves(self.stacked)


def network(config: ModelConfig, params: Any) -> tuple[Transformer, dict, Any]:
    """(the network, its variables, the per-sublayer tables of its parameters): what
    every compiled entry point sets up, once per compiled call, before it runs
    `Transformer.block` or `Transformer.step` with `net.apply(variables, ..., tables,
    method=...)`. params in either form (tvq/nn/layout.py): a reference tree is stacked
    here, and its own arrays stay beside the stacked ones for an unrolled decoding step
    (what a program does not use, XLA drops)."""
    net = Transformer(config)
    if is_stacked(params):
        variables = {"params": params}
    else:
        variables = {"params": {**params, STACK: stack_params(params)[STACK]}}
    return net, variables, net.apply(variables, method=Transformer.tables)


class TokenEmbedder(nn.Module):
    """Input embeddings (normal(1) init) and the tied output's bias."""

    n_vocab: int
    d_model: int
    param_dtype: str = "float32"

    def setup(self) -> None:
        init = nn.initializers.normal(1.0)
        self.embs = self.param("embs", init, (self.n_vocab, self.d_model), self.param_dtype)
        self.bias_out = self.param("bias_out", zeros_init, (self.n_vocab,), self.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embs, tokens, axis=0)

    def logits(self, x: jax.Array) -> jax.Array:
        embs = self.embs.astype(jnp.float32)
        return x.astype(jnp.float32) @ embs.T + self.bias_out.astype(jnp.float32)


class PositionScale(nn.Module):
    """The learned scalar in front of absolute sinusoids (init 0)."""

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("scale", zeros_init, (), jnp.float32)
