"""The whole Transformer-VQ network (docs/DESIGN.md section 5), and the only place that
loops over its sublayers.

tokens → embeddings (+ scaled absolute sinusoids) → n_layer × [VQ-attention,
VQ-attention] residual sublayers → optional RMSNorm → tied or untied output →
· e_scale → log-softmax. Two entry points share that pass: `block` (a block of tokens
against the window state: scoring and training, folded over blocks by tvq/runtime/forward.py)
and `step` (one token against the decoding rings: tvq/decoding.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from tvq.config import ModelConfig
from tvq.nn.attention import AttentionTables
from tvq.nn.layers import RMSNorm, kernel_init, sinusoid, zeros_init
from tvq.nn.layout import LAYERS, SUBLAYERS
from tvq.nn.ring import RingState
from tvq.nn.state import ModelState
from tvq.nn.sublayer import AttentionModule, SublayerStats, VQAttention, attention_fields


@flax.struct.dataclass
class Dropout:
    """Training-time dropout of one piece of tokens (docs/DESIGN.md section 11), as
    multipliers already scaled by 1/(1 − p): `embedding` [B, L, D] for the token
    embeddings, `residuals` one [B, L, D] per sublayer for its residual branch (residual
    dropout times layer drop). Made by tvq.train.step.dropout_multipliers."""

    embedding: jax.Array
    residuals: tuple[jax.Array, ...]


class TransformerLayer(AttentionModule):
    """Two VQ-attention sublayers, named as in the reference layout."""

    def setup(self) -> None:
        fields = attention_fields(self)
        for name in SUBLAYERS:  # flax names a submodule after the attribute it is set to
            setattr(self, name, VQAttention(**fields))


class Transformer(nn.Module):
    """The network; the only module that reads ModelConfig."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = TokenEmbedder(cfg.n_vocab, cfg.d_model, cfg.param_dtype)
        if cfg.pe_abs:
            self.position_embedder = PositionScale()
        setattr(
            self, LAYERS, [TransformerLayer(**attention_fields(cfg)) for _ in range(cfg.n_layer)]
        )
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

    def sublayers(self) -> list[VQAttention]:
        """The 2·n_layer sublayers in order; states and tables follow this order."""
        return [getattr(layer, name) for layer in getattr(self, LAYERS) for name in SUBLAYERS]

    def tables(self) -> tuple[AttentionTables, ...]:
        """Per-sublayer values of the parameters alone; computed once per compiled call and
        passed to every block or step."""
        return tuple(sublayer.tables() for sublayer in self.sublayers())

    def block(
        self,
        tokens: jax.Array,
        state: ModelState,
        tables: tuple[AttentionTables, ...],
        train: bool = False,
        offsets: jax.Array | None = None,
        block_len: int | None = None,
        seq_axis: str | None = None,
        n_devices: int = 1,
        dropout: Dropout | None = None,
    ) -> tuple[ModelState, jax.Array, tuple[SublayerStats, ...] | None]:
        """A block of tokens [B, L] → (new state, float32 log-probs [B, L, N], per-sublayer
        training statistics or None). offsets [B, L, D], added to the embeddings, let
        tests take Jacobians with respect to the inputs. With block_len, the tokens are
        L / block_len blocks run in the parallel form (docs/DESIGN.md section 8); with
        seq_axis too, this device's run of blocks of one sequence spread over
        n_devices devices in order (inside shard_map). dropout (training only) multiplies
        the embeddings and each sublayer's residual."""
        pos_offset = state.sublayers[0].pos_offset
        if seq_axis is not None:
            pos_offset = pos_offset + jax.lax.axis_index(seq_axis) * tokens.shape[1]
        x = self.embed(tokens, pos_offset)
        if offsets is not None:
            x = x + offsets.astype(x.dtype)
        if dropout is not None:
            x = x * dropout.embedding.astype(x.dtype)

        def through(index, sublayer, x, sub_state, table):
            sub_state, res, stats = sublayer(x, sub_state, table, train, block_len, seq_axis,
                                             n_devices)  # fmt: skip
            if dropout is not None:
                res = res * dropout.residuals[index].astype(res.dtype)
            return sub_state, res, stats

        x, states, stats = self._sublayers(through, x, state.sublayers, tables)
        return ModelState(sublayers=states), self.log_softmax(x), stats if train else None

    def step(
        self, tokens: jax.Array, rings: tuple[RingState, ...], tables: tuple[AttentionTables, ...]
    ) -> tuple[tuple[RingState, ...], jax.Array]:
        """One token per row, tokens [B] → (new rings, float32 log-probs [B, N]); equal to a
        block of length 1 (docs/DESIGN.md invariant 3)."""
        x = self.embed(tokens[:, None], rings[0].pos_offset)

        def through(index, sublayer, x, ring, table):
            return (*sublayer.step(x, ring, table), None)

        x, rings, _ = self._sublayers(through, x, rings, tables)
        return rings, self.log_softmax(x)[:, 0]

    def _sublayers(self, through: Callable, x: jax.Array, states: Any, tables: Any):
        """x through every sublayer with its residual: through(index, sublayer, x, state,
        table) → (state, residual, extra). Returns (x, states, extras)."""
        new_states, extras = [], []
        pairs = enumerate(zip(self.sublayers(), states, tables, strict=True))
        for index, (sublayer, state, table) in pairs:
            state, res, extra = through(index, sublayer, x, state, table)
            x = x + res
            new_states.append(state)
            extras.append(extra)
        return x, tuple(new_states), tuple(extras)

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

    def __call__(self, tokens: jax.Array, state: ModelState, train: bool = False):
        """One block end to end; used to create every parameter at init."""
        state, log_probs, _ = self.block(tokens, state, self.tables(), train)
        return state, log_probs


def network(
    config: ModelConfig, params: Any
) -> tuple[Transformer, dict, tuple[AttentionTables, ...]]:
    """(the network, its variables, the per-sublayer tables of its parameters): what every
    compiled entry point sets up before it runs `Transformer.block` or `Transformer.step`
    with `net.apply(variables, ..., tables, method=...)`; the tables are computed once
    per compiled call."""
    net = Transformer(config)
    variables = {"params": params}
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
