"""The whole Transformer-VQ network for one block of tokens (DESIGN.md section 5).

tokens → embeddings (+ scaled absolute sinusoids) → n_layer × [VQ-attention,
VQ-attention] residual sublayers → optional RMSNorm → tied or untied output →
· e_scale → log-softmax. The loop over blocks lives in model.py; this module
only knows one block and the state that flows through it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tvq.attention import AttentionTables, VQAttention
from tvq.config import ModelConfig
from tvq.layers import RMSNorm, kernel_init, sinusoid, zeros_init
from tvq.state import ModelState


class TransformerLayer(nn.Module):
    """Two VQ-attention sublayers, named as in the reference layout."""

    d_model: int
    d_k: int
    d_v: int
    n_head: int
    n_code: int
    mem_len: int
    agg_cache: bool
    pe_lam: float
    dtype: str
    param_dtype: str

    def setup(self) -> None:
        fields = dict(
            d_model=self.d_model,
            d_k=self.d_k,
            d_v=self.d_v,
            n_head=self.n_head,
            n_code=self.n_code,
            mem_len=self.mem_len,
            agg_cache=self.agg_cache,
            pe_lam=self.pe_lam,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.scanned_attn1 = VQAttention(**fields)
        self.scanned_attn2 = VQAttention(**fields)

    def sublayers(self) -> tuple[VQAttention, VQAttention]:
        return (self.scanned_attn1, self.scanned_attn2)

    def tables(self) -> tuple[AttentionTables, AttentionTables]:
        return (self.scanned_attn1.tables(), self.scanned_attn2.tables())

    def __call__(self, x, states, tables, train=False, mask=None):
        new_states, all_stats = [], []
        for sublayer, state, table in zip(self.sublayers(), states, tables, strict=True):
            new_state, res, stats = sublayer(x, state, table, train, mask)
            x = x + res
            new_states.append(new_state)
            all_stats.append(stats)
        return tuple(new_states), x, all_stats


class Transformer(nn.Module):
    """One block through the whole network; the only module that reads ModelConfig."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = TokenEmbedder(cfg.n_vocab, cfg.d_model, cfg.param_dtype)
        if cfg.pe_abs:
            self.position_embedder = PositionScale()
        self.transformer_layers = [
            TransformerLayer(
                d_model=cfg.d_model,
                d_k=cfg.d_k,
                d_v=cfg.d_v,
                n_head=cfg.n_head,
                n_code=cfg.n_code,
                mem_len=cfg.mem_len,
                agg_cache=cfg.agg_cache,
                pe_lam=cfg.pe_lam,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
            )
            for _ in range(cfg.n_layer)
        ]
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

    def tables(self) -> tuple[AttentionTables, ...]:
        return tuple(t for layer in self.transformer_layers for t in layer.tables())

    def embed(self, tokens: jax.Array, pos_offset: jax.Array) -> jax.Array:
        """tokens [B, L] → [B, L, D] in the compute dtype."""
        cfg = self.config
        x = self.token_embedder(tokens).astype(jnp.float32)
        if cfg.pe_abs:
            positions = pos_offset[:, None] + jnp.arange(tokens.shape[1])[None, :]
            x = x + self.position_embedder() * sinusoid(positions, cfg.d_model, cfg.pe_lam)
        return x.astype(cfg.dtype)

    def body(self, x, state: ModelState, tables, train=False, mask=None):
        """[B, L, D] features through every layer → (new state, features, per-sublayer stats)."""
        new_states, all_stats = [], []
        for i, layer in enumerate(self.transformer_layers):
            pair = slice(2 * i, 2 * i + 2)
            states, x, stats = layer(x, state.sublayers[pair], tables[pair], train, mask)
            new_states.extend(states)
            all_stats.extend(stats)
        return ModelState(sublayers=tuple(new_states)), x, all_stats

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

    def __call__(self, tokens, state: ModelState, train=False):
        """One block end to end; used to create every parameter at init."""
        tables = self.tables()
        x = self.embed(tokens, state.sublayers[0].pos_offset)
        new_state, x, _ = self.body(x, state, tables, train)
        return new_state, self.log_softmax(x)


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
