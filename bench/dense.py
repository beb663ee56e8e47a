"""A quadratic-time baseline: the same network with dense causal softmax attention.

Same width, depth, heads, key/value widths, gating and vocabulary as the tvq model it is
built from (it reuses that model's projections), but every query attends to every
earlier key, unquantized: no codebook, no window, no aggregate. Positions enter as
absolute sinusoids. It exists only to be timed against tvq (bench/vs_dense.py); its
outputs are not meant to be good.

Scoring is blockwise with an online softmax (flash-attention style) and skips the key
blocks above the diagonal, so it does the T²/2 work causal attention needs and no more.
Decoding keeps a KV cache of every past key and value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tvq.nn.layers import rms_normalize, sinusoid
from tvq.nn.layout import QUANTIZER, sublayer_params

QUERY_BLOCK = 256


def param_count(params) -> int:
    """Parameters the dense model uses: tvq's less codebooks, r_proj, u and v."""
    unused = (QUANTIZER, "r_proj", "u", "v")
    total = sum(x.size for k, x in params["token_embedder"].items())
    for sub in sublayer_params(params):
        total += sum(x.size for k, x in jax.tree_util.tree_flatten_with_path(sub)[0]
                     if not any(getattr(p, "key", None) in unused for p in k))  # fmt: skip
    return int(total)


def flops_per_token(config, length: int) -> float:
    """FLOPs per token when scoring `length` tokens, counted as bench/mfu.py counts tvq's
    (two per multiply-add): projections and output layer as tvq, and causal attention,
    where token t scores and mixes t + 1 keys: on average (T + 1)/2 keys of K + V."""
    d, h, k, v, n = config.d_model, config.n_head, config.d_k, config.d_v, config.n_vocab
    keys = (length + 1) / 2
    sublayer = 2 * d * (2 * h * k + 2 * h * v) + 2 * h * v * d + 2 * h * keys * (k + v)
    return 2 * config.n_layer * sublayer + 2 * d * n


def _norm(x, ln):
    return rms_normalize(x) * ln["g"] + ln["b"]


def _project(sub, x, config):
    """x [B, T, D] → q, k [B, H, T, K], v [B, H, T, V], gate [B, T, H·V]."""
    b, t, _ = x.shape
    h, k, v = config.n_head, config.d_k, config.d_v
    x = _norm(x, sub["input_ln"])
    q = rms_normalize((x @ sub["q_proj"]["kernel"]).reshape(b, t, h, k)) * k**-0.25
    kvg = x @ sub["kvg_proj"]["kernel"]
    keys, values, gate = jnp.split(kvg, [h * k, h * k + h * v], axis=-1)
    keys = rms_normalize(keys.reshape(b, t, h, k)) * k**-0.25
    values = jax.nn.silu(values).reshape(b, t, h, v)
    return (q.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3),
            jax.nn.silu(gate))  # fmt: skip


def _output(sub, out, gate):
    b, h, t, v = out.shape
    return (out.transpose(0, 2, 1, 3).reshape(b, t, h * v) * gate) @ sub["res_proj"]["kernel"]


def _embed(params, config, tokens, start):
    positions = start + jnp.arange(tokens.shape[1])
    return params["token_embedder"]["embs"][tokens] + sinusoid(positions, config.d_model,
                                                               config.pe_lam)  # fmt: skip


def _log_probs_of(params, config, x, targets):
    logits = x @ params["token_embedder"]["embs"].T + params["token_embedder"]["bias_out"]
    log_probs = jax.nn.log_softmax(logits * config.e_scale, axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def causal_attention(q, k, v):
    """Blockwise causal softmax attention, q, k [B, H, T, K], v [B, H, T, V]; T a multiple
    of QUERY_BLOCK. Query block i visits key blocks 0 … i only."""
    b, h, t, _ = q.shape
    n = t // QUERY_BLOCK
    blocks = lambda x: x.reshape(b, h, n, QUERY_BLOCK, x.shape[-1])  # noqa: E731
    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    inside = jnp.tril(jnp.ones([QUERY_BLOCK, QUERY_BLOCK], bool))

    def one_query_block(i):
        query = qb[:, :, i]

        def visit(j, carry):
            top, total, acc = carry
            scores = jnp.einsum("bhqk,bhsk->bhqs", query, kb[:, :, j])
            scores = jnp.where((j < i) | inside, scores, -1e30)
            new_top = jnp.maximum(top, jnp.max(scores, axis=-1, keepdims=True))
            weights = jnp.exp(scores - new_top)
            scale = jnp.exp(top - new_top)
            return (new_top, total * scale + jnp.sum(weights, -1, keepdims=True),
                    acc * scale + jnp.einsum("bhqs,bhsv->bhqv", weights, vb[:, :, j]))  # fmt: skip

        init = (jnp.full([b, h, QUERY_BLOCK, 1], -1e30), jnp.zeros([b, h, QUERY_BLOCK, 1]),
                jnp.zeros([b, h, QUERY_BLOCK, v.shape[-1]]))  # fmt: skip
        _, total, acc = jax.lax.fori_loop(0, i + 1, visit, init)
        return acc / total

    out = jax.lax.map(one_query_block, jnp.arange(n))  # [n, B, H, QB, V]
    return jnp.moveaxis(out, 0, 2).reshape(b, h, t, v.shape[-1])


@functools.partial(jax.jit, static_argnames="config")
def score(config, params, inputs, targets):
    """Log-probs [B, T] of targets after inputs, full attention over the whole sequence."""
    x = _embed(params, config, inputs, 0)
    for sub in sublayer_params(params):
        q, k, v, gate = _project(sub, x, config)
        x = x + _output(sub, causal_attention(q, k, v), gate)
    return _log_probs_of(params, config, x, targets)


def empty_cache(config, batch: int, length: int, key) -> list[dict]:
    """A KV cache of `length` positions per sublayer (random contents: the cost of a step
    does not depend on them)."""
    shape = (batch * config.n_head, length)  # rows and heads on one axis: in-place updates
    cache = []
    for _ in range(2 * config.n_layer):
        key, k1, k2 = jax.random.split(key, 3)
        cache.append({"k": jax.random.normal(k1, (*shape, config.d_k)) * 0.1,
                      "v": jax.random.normal(k2, (*shape, config.d_v))})  # fmt: skip
    return cache


@functools.partial(jax.jit, static_argnames=("config", "steps"), donate_argnames="cache")
def decode(config, params, cache, token, start, steps: int):
    """Greedy decoding of `steps` tokens after position `start` (cache filled below it):
    each token is written into the cache in place and attends to every cached position
    up to its own."""
    slots = jnp.arange(cache[0]["k"].shape[1])
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731  [B, H, 1, ·] → [G, 1, ·]

    def step(i, carry):
        cache, token = carry
        pos = start + i
        x = _embed(params, config, token[:, None], pos)
        new_cache = []
        for layer, sub in zip(cache, sublayer_params(params), strict=True):
            q, k, v, gate = _project(sub, x, config)
            keys = jax.lax.dynamic_update_slice_in_dim(layer["k"], flat(k), pos, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(layer["v"], flat(v), pos, axis=1)
            new_cache.append({"k": keys, "v": values})
            scores = jnp.einsum("gqk,gsk->gqs", flat(q), keys)
            weights = jax.nn.softmax(jnp.where(slots <= pos, scores, -1e30), axis=-1)
            out = jnp.einsum("gqs,gsv->gqv", weights, values).reshape(v.shape)
            x = x + _output(sub, out, gate)
        logits = x[:, 0] @ params["token_embedder"]["embs"].T
        return new_cache, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, step, (cache, token))


@functools.partial(jax.jit, static_argnames=("config", "implementation"))
def score_fused(config, params, inputs, targets, implementation=None):
    """score() with every product in the config's dtype and the attention by
    jax.nn.dot_product_attention (cuDNN's flash attention on a GPU with
    implementation="cudnn"), the usual way to run a quadratic-time transformer fast.
    Fused kernels want one head width, so a value wider than the key (d_v = r·d_k) is
    split into r heads that share the query and key: the scores are computed r times,
    work that flops_per_token does not count."""
    dtype = jnp.dtype(config.dtype)
    cast = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)  # noqa: E731
    params = cast(params)
    x = _embed(params, config, inputs, 0).astype(dtype)
    b, t = inputs.shape
    h, k, v = config.n_head, config.d_k, config.d_v
    r = max(1, v // k)
    for sub in sublayer_params(params):
        q, keys, values, gate = _project(sub, x, config)
        q, keys = q.astype(dtype), keys.astype(dtype)
        values = values.astype(dtype)
        # [B, H, T, ·] → [B, T, H·r, K]: each head's value split into r slices of K
        split = lambda a: jnp.repeat(a.transpose(0, 2, 1, 3), r, axis=2)  # noqa: E731
        vals = values.transpose(0, 2, 1, 3).reshape(b, t, h * r, v // r)
        out = jax.nn.dot_product_attention(
            split(q), split(keys), vals, is_causal=True, scale=1.0,
            implementation=implementation,
        )  # fmt: skip
        out = out.reshape(b, t, h, v).transpose(0, 2, 1, 3)
        x = x + _output(sub, out, gate.astype(dtype)).astype(dtype)
    return _log_probs_of(params, config, x.astype(jnp.float32), targets)
