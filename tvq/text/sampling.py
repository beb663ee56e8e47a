"""Sampling rules: logit bias, presence, frequency and repetition penalties, then
temperature, top-k, min-p and top-p (nucleus), applied to log-probs.

A `Sampler` (tvq/text/settings.py) is a small frozen dataclass, a request's settings;
it knows nothing about the model. The rules for one sampler (`filter_logits`, `sample`,
`pick`) are the reference that each row's rules are tested against. The compiled
decoding loop takes settings as values, not as its program's shape: `SamplerRows` holds
each row's settings as arrays, so one compiled program serves every setting and rows
with different settings share a batch (docs/DESIGN.md section 7). The penalties' counts
(`Penalties`: each token's count among the sampled ones, and the last REPEAT_WINDOW
tokens) live in the loop's carry.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tvq.text.settings import BANNED, REPEAT_WINDOW, Sampler


def filter_logits(sampler: Sampler, log_probs: jax.Array) -> jax.Array:
    """The reference rules (Sampler.filter), one sampler for every row: log-probs
    [B, N] → logits [B, N] of the distribution to sample from."""
    logits = log_probs / sampler.temperature
    if sampler.top_k:
        k = min(sampler.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampler.min_p > 0:
        probs = jax.nn.softmax(logits, axis=-1)
        floor = sampler.min_p * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < floor, -jnp.inf, logits)
    if sampler.top_p < 1:
        probs = jax.nn.softmax(logits, axis=-1)
        logits = jnp.where(probs < top_p_cutoff(probs, sampler.top_p), -jnp.inf, logits)
    return logits


def sample(sampler: Sampler, key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token id per row, int32 [B]: the first token whose cumulative probability
    reaches u·total, u uniform in (0, 1] (one random number per row, all from key)."""
    return _pick(sampler, 1.0 - jax.random.uniform(key, (log_probs.shape[0], 1)), log_probs)


def pick(sampler: Sampler, u: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token id per row [B] as sample does, with each row's random number u [B]
    in (0, 1] given: row_uniforms(keys) draws one per row's own key, so a row's token
    does not depend on the other rows (drawn ahead for a chunk of decoding steps)."""
    return _pick(sampler, u[:, None], log_probs)


def _pick(sampler: Sampler, u: jax.Array, log_probs: jax.Array) -> jax.Array:
    if sampler.greedy:
        return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(filter_logits(sampler, log_probs), axis=-1)
    # The barrier keeps XLA from fusing the softmax into the prefix sum, where it
    # recomputes exp over and over (measured: 0.1-0.3 ms a token at batch 1).
    cumulative = jnp.cumsum(jax.lax.optimization_barrier(probs), axis=-1)
    index = jnp.sum(cumulative < u * cumulative[:, -1:], axis=-1)
    return jnp.minimum(index, probs.shape[-1] - 1).astype(jnp.int32)


@flax.struct.dataclass
class SamplerRows:
    """Each row's Sampler as arrays [B] (bias [B, N]): values of the compiled loop."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    repeat_last_n: jax.Array
    bias: jax.Array  # [B, N] added to the log-probs
    penalizing: jax.Array  # [B] bool: a penalty or a bias is on (else they are skipped)
    # [B, N] bool: what a row's draw may be without being drawn again (guarded_tokens):
    # under a constraint, what it allows at the chunk's start; else every token
    allowed: jax.Array

    @classmethod
    def of(cls, samplers: list[Sampler], n_vocab: int) -> SamplerRows:
        """The rows of these samplers (one per row), on the host."""
        bias = np.zeros([len(samplers), n_vocab], np.float32)
        for row, s in enumerate(samplers):
            for token, value in s.check_vocabulary(n_vocab).logit_bias:
                bias[row, token] += value

        def column(name: str, dtype) -> np.ndarray:
            return np.asarray([getattr(s, name) for s in samplers], dtype)

        return cls(
            temperature=column("temperature", np.float32), top_k=column("top_k", np.int32),
            top_p=column("top_p", np.float32), min_p=column("min_p", np.float32),
            presence=column("presence_penalty", np.float32),
            frequency=column("frequency_penalty", np.float32),
            repetition=column("repetition_penalty", np.float32),
            repeat_last_n=column("repeat_last_n", np.int32), bias=bias,
            penalizing=np.asarray([s.penalizing for s in samplers], bool),
            allowed=np.ones(bias.shape, bool),
        )  # fmt: skip

    def counting(self) -> bool:
        """Whether a row has a penalty that counts the tokens it samples (a bias alone
        counts nothing)."""
        repeats = (np.asarray(self.repetition) != 1) & (np.asarray(self.repeat_last_n) > 0)
        return bool((np.asarray(self.presence) != 0).any() or
                    (np.asarray(self.frequency) != 0).any() or repeats.any())  # fmt: skip


@flax.struct.dataclass
class Penalties:
    """What the penalties count, per row: how often each token was sampled [B, N], and
    the last REPEAT_WINDOW tokens of the text [B, W] (oldest first, −1: none yet)."""

    counts: jax.Array
    recent: jax.Array

    @classmethod
    def start(cls, n_vocab: int, recent: list[list[int]]) -> Penalties:
        """No token sampled yet; each row's text so far ends with `recent` (its prompt)."""
        window = np.full([len(recent), REPEAT_WINDOW], -1, np.int32)
        for row, ids in enumerate(recent):
            tail = list(ids)[-REPEAT_WINDOW:]
            if tail:
                window[row, -len(tail) :] = tail
        return cls(counts=np.zeros([len(recent), n_vocab], np.int32), recent=window)

    def add(self, token: jax.Array, live: jax.Array) -> Penalties:
        """token [B] sampled where live [B]."""
        rows = jnp.arange(token.shape[0])
        counts = jnp.asarray(self.counts).at[rows, token].add(live.astype(jnp.int32))
        recent = jnp.asarray(self.recent)
        shifted = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
        return Penalties(counts=counts, recent=jnp.where(live[:, None], shifted, recent))


def penalized(rows: SamplerRows, penalties: Penalties, log_probs: jax.Array) -> jax.Array:
    """The log-probs [B, N] a row samples from: plus its logit bias, minus its frequency
    and presence penalties (OpenAI's definitions on the sampled counts), and × its
    repetition penalty where the token is among its last repeat_last_n (log-probs are
    ≤ 0, so a penalty above 1 lowers them: llama.cpp's rule for negative logits). Every
    term is exactly the identity for a row whose penalties are off."""
    counts = penalties.counts.astype(jnp.float32)
    x = log_probs + rows.bias
    x = x - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)
    window = penalties.recent.shape[1]
    within = jnp.arange(window)[None, :] >= window - rows.repeat_last_n[:, None]  # [B, W]
    valid = within & (penalties.recent >= 0)
    batch = jnp.arange(log_probs.shape[0])[:, None]
    seen = (
        jnp.zeros(log_probs.shape, jnp.bool_).at[batch, jnp.maximum(penalties.recent, 0)].max(valid)
    )
    return jnp.where(seen, x * rows.repetition[:, None], x)


def next_tokens(rows: SamplerRows, penalties: Penalties, u: jax.Array, log_probs: jax.Array
                ) -> jax.Array:  # fmt: skip
    """Each row's next token [B] by its own settings, penalties included: pick_rows of
    penalized. The parts no row uses are skipped (a cond per step: without penalties
    the log-probs go straight through, and a batch of greedy rows only takes argmax),
    which never changes a value."""
    x = jax.lax.cond(jnp.any(rows.penalizing), lambda: penalized(rows, penalties, log_probs),
                     lambda: log_probs)  # fmt: skip
    return jax.lax.cond(jnp.all(rows.temperature == 0),
                        lambda: jnp.argmax(x, axis=-1).astype(jnp.int32),
                        lambda: pick_rows(rows, u, x))  # fmt: skip


def guarded_tokens(
    rows: SamplerRows,
    penalties: Penalties,
    u: jax.Array,
    again: jax.Array,
    log_probs: jax.Array,
    live: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """next_tokens with a guard, for speculation under a constraint (docs/DESIGN.md
    section 7) → (tokens [B], drafts [B]). A live row whose draft (next_tokens with u)
    is outside rows.allowed draws again with its random number `again` under the mask
    of rows.allowed (mask, then truncate: what a masked step draws); other rows keep
    their draft. The second draw runs only at the steps where some row needs it."""
    drafts = next_tokens(rows, penalties, u, log_probs)
    outside = live & ~jnp.take_along_axis(rows.allowed, drafts[:, None], axis=-1)[:, 0]
    masked = rows.replace(bias=jnp.where(rows.allowed, rows.bias, BANNED),
                          penalizing=jnp.ones_like(rows.penalizing))  # fmt: skip
    tokens = jax.lax.cond(
        jnp.any(outside),
        lambda: jnp.where(outside, next_tokens(masked, penalties, again, log_probs), drafts),
        lambda: drafts,
    )
    return tokens, drafts


def count_tokens(rows: SamplerRows, penalties: Penalties, token: jax.Array,
                 live: jax.Array) -> Penalties:  # fmt: skip
    """penalties.add(token, live) when any row's penalties read them, else unchanged."""
    return jax.lax.cond(jnp.any(rows.penalizing), lambda: penalties.add(token, live),
                        lambda: penalties)  # fmt: skip


def pick_rows(rows: SamplerRows, u: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token id per row [B], each row by its own settings (greedy where its
    temperature is 0), with its random number u [B] in (0, 1]: for a row, exactly what
    Sampler.pick gives with that row's sampler."""
    greedy = rows.temperature == 0
    logits = log_probs / jnp.where(greedy, 1.0, rows.temperature)[:, None]
    k = rows.top_k
    logits = jax.lax.cond(
        jnp.any(k > 0),
        lambda x: jnp.where((k[:, None] > 0) & _below_kth(x, jnp.maximum(k, 1)), -jnp.inf, x),
        lambda x: x,
        logits,
    )
    probs = jax.nn.softmax(logits, axis=-1)
    floor = rows.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    logits = jnp.where((rows.min_p[:, None] > 0) & (probs < floor), -jnp.inf, logits)

    def nucleus(x):
        p = jax.nn.softmax(x, axis=-1)
        cut = top_p_cutoff(p, jnp.minimum(rows.top_p, 1.0)[:, None])
        return jnp.where((rows.top_p[:, None] < 1) & (p < cut), -jnp.inf, x)

    logits = jax.lax.cond(jnp.any(rows.top_p < 1), nucleus, lambda x: x, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    cumulative = jnp.cumsum(jax.lax.optimization_barrier(probs), axis=-1)
    index = jnp.sum(cumulative < u[:, None] * cumulative[:, -1:], axis=-1)
    sampled = jnp.minimum(index, probs.shape[-1] - 1).astype(jnp.int32)
    return jnp.where(greedy, jnp.argmax(log_probs, axis=-1).astype(jnp.int32), sampled)


def _below_kth(x: jax.Array, k: jax.Array) -> jax.Array:
    """x [B, N] < the k[b]-th largest value of its row: what lax.top_k's k-th value
    masks, found exactly for a k per row by bisection over floats ordered as integers
    (32 steps of one count each; no sort of the vocabulary)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # monotone in x
    low = jnp.min(keys, axis=-1, keepdims=True)  # count(keys >= low) = N >= k
    high = jnp.max(keys, axis=-1, keepdims=True)

    def halve(_, bounds):  # invariant: count(keys >= low) >= k; keys >= high+1 are fewer
        low, high = bounds
        mid = low + (high - low + 1) // 2
        enough = jnp.sum(keys >= mid, axis=-1, keepdims=True) >= k[:, None]
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid - 1)

    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    return keys < low


def row_uniforms(keys: jax.Array) -> jax.Array:
    """One number in (0, 1] per key [B, 2] → [B]: 1 − uniform(key)."""
    return 1.0 - jax.vmap(lambda k: jax.random.uniform(k, ()))(keys)


def top_p_cutoff(probs: jax.Array, top_p: float) -> jax.Array:
    """The smallest probability kept by nucleus sampling, per row [B, 1]: a token is kept
    when the mass of the tokens likelier than it is below top_p (the top one always).

    The mass above a threshold t, M(t) = Σ_{p > t} p, falls as t rises; the cutoff is the
    smallest float t with M(t) < top_p, which is a token's probability. Bisection over the
    bit patterns of positive floats (ordered like integers) finds it exactly in 31 steps
    of one masked sum each, where sorting the vocabulary would cost far more."""
    low = jnp.zeros([probs.shape[0], 1], jnp.int32)  # M(0) = 1 >= top_p
    high = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1, keepdims=True), jnp.int32)

    def halve(_, bounds):
        low, high = bounds
        mid = low + (high - low) // 2
        t = jax.lax.bitcast_convert_type(mid, jnp.float32)
        above = jnp.sum(jnp.where(probs > t, probs, 0.0), axis=-1, keepdims=True)
        below_p = above < top_p
        return jnp.where(below_p, low, mid), jnp.where(below_p, mid, high)

    _, high = jax.lax.fori_loop(0, 31, halve, (low, high))
    return jax.lax.bitcast_convert_type(high, jnp.float32)
