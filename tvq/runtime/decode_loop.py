"""The compiled decoding loop (docs/DESIGN.md section 7): B rows advance one token per
step against their rings, each step's token sampled or forced, CHUNK steps per call.

Decoding samples with it (tvq.decoding) and scoring feeds a text's tail shorter than a
block through it with every token forced (tvq.scoring.stream), so one compiled program serves
every tail length. Row r's k-th token is drawn with the key fold_in(keys[r], k): a row's
text depends on its own key only.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tvq.distributed.devices import replicated, split_rows
from tvq.files import warm
from tvq.nn.ring import RingState, model_from_ring, model_to_ring, repeat_rows
from tvq.nn.transformer import Transformer, network
from tvq.runtime.forward import on_device
from tvq.runtime.model import Model
from tvq.text.sampling import (
    Penalties,
    Sampler,
    SamplerRows,
    count_tokens,
    guarded_tokens,
    row_uniforms,
)

CHUNK = 32  # most tokens sampled per compiled call
# A guard's second draw (and a refused token's, tvq.decoding) uses the key
# fold_in(key(row), k + RESAMPLED): a stream of random numbers no first draw uses (k, the
# row's token count, stays far below it)
RESAMPLED = 1 << 30
GREEDY = Sampler(temperature=0)  # what feeding (every token forced) passes for sampling


@flax.struct.dataclass
class DecodeCarry:
    """The state of the compiled sampling loop, B rows."""

    step: jax.Array  # [] int32: steps taken in this chunk
    rings: tuple[RingState, ...]  # one per sublayer
    token: jax.Array  # [B] int32: the last token, next input
    done: jax.Array  # [B] bool: the row has sampled eos_id
    tokens: jax.Array  # [CHUNK, B] int32: sampled (or forced) tokens
    drafts: jax.Array  # [CHUNK, B] int32: the first draws (guarded_tokens)
    log_probs: jax.Array  # [CHUNK, B] float32: their log-probs
    top_log_probs: jax.Array  # [CHUNK, B, k] float32: the k most likely tokens' log-probs
    top_ids: jax.Array  # [CHUNK, B, k] int32: and their ids
    penalties: Penalties  # what the penalties count, per row


@warm.entry(static_argnames=("config", "top_k"))
def decode_chunk(config, params, rings, token, keys, counts, limits, forced, n_forced, eos_ids,
                 sampling: SamplerRows, penalties: Penalties, top_k: int = 0):  # fmt: skip
    """The compiled decoding loop: see _decode_chunk."""
    return _decode_chunk(config, params, rings, token, keys, counts, limits, forced, n_forced,
                         eos_ids, sampling, penalties, top_k)  # fmt: skip


@warm.entry(static_argnames=("config", "top_k"), donate_argnums=(2, 3, 11))
def decode_chunk_in_place(config, params, rings, token, keys, counts, limits, forced, n_forced,
                          eos_ids, sampling: SamplerRows, penalties: Penalties,
                          top_k: int = 0):  # fmt: skip
    """decode_chunk that takes over its rings, last tokens and penalties (donated: their
    buffers become the outputs', updated in place). Without it each call copies every
    row's rings before its first step (16 rows of the built-in model: 109 MB, 15 ms a
    call); the server's running batch owns its arrays and calls this."""
    return _decode_chunk(config, params, rings, token, keys, counts, limits, forced, n_forced,
                         eos_ids, sampling, penalties, top_k)  # fmt: skip


def _decode_chunk(config, params, rings, token, keys, counts, limits, forced, n_forced, eos_ids,
                  sampling: SamplerRows, penalties: Penalties, top_k: int):  # fmt: skip
    """Samples tokens after `token` [B]: row r takes limits[r] (≤ CHUNK) steps or stops
    at eos_ids[r] (−1: never); the loop ends when every row has. Row r samples by its
    own settings, sampling[r] (values, not the program's shape: one compiled loop serves
    every setting), after its penalties (which count what it sampled). Row r's k-th
    token of its text is drawn with the key fold_in(keys[r], k), k = counts[r] + step,
    so a row's text depends on its own key and settings only, never on the rows beside
    it (tvq.serving.engine batches requests). Row r's first n_forced[r] steps take
    forced [CHUNK, B] instead of sampling: text it reads, not samples (a prompt's tail
    in the server's running batch, a chunk replayed up to a stop string, scoring); they
    are neither counted by the penalties nor checked for eos_ids, and row r's k-th
    sampled token has k = counts[r] + step − n_forced[r]. Log-probs are the model's,
    before the sampler's penalties, temperature and truncation (those `tvq score`
    gives). Every row's state advances every step: a row that has stopped keeps going
    (its later tokens are not used). A row whose draw is outside sampling.allowed draws
    again under that mask, with the key of k + RESAMPLED (guarded_tokens: speculation
    under a constraint, tvq.decoding.SampleLoop); drafts are the first draws.

    Returns (rings, last token [B], tokens [CHUNK, B], log-probs [CHUNK, B], steps, the
    top_k most likely tokens' log-probs [CHUNK, B, top_k] and ids [CHUNK, B, top_k],
    the penalties' counts after the chunk, drafts [CHUNK, B]).
    """
    net, variables, tables = network(config, params)
    batch = token.shape[0]
    # Every step's random numbers [CHUNK, B], drawn before the loop: XLA:CPU runs the
    # threefry hash as small loops of its own, which cost more per step than the draw.
    steps = jnp.arange(CHUNK, dtype=jnp.int32)[:, None]
    fold = jax.vmap(jax.vmap(jax.random.fold_in), (None, 0))
    draws = counts + steps - n_forced
    uniforms = jax.vmap(row_uniforms)(fold(keys, draws))  # [CHUNK, B]
    again = jax.vmap(row_uniforms)(fold(keys, draws + RESAMPLED))  # a guard's second draws

    def cond(c: DecodeCarry):
        return jnp.any((c.step < limits) & ~c.done)

    def body(c: DecodeCarry) -> DecodeCarry:
        rings, log_probs = net.apply(variables, c.token, c.rings, tables, method=Transformer.step)
        reading = c.step < n_forced
        live = (c.step < limits) & ~c.done
        chosen = live & ~reading
        sampled, drafts = guarded_tokens(sampling, c.penalties, uniforms[c.step],
                                         again[c.step], log_probs, chosen)  # fmt: skip
        new = jnp.where(reading, forced[c.step], sampled)
        picked = jnp.take_along_axis(log_probs, new[:, None], axis=-1)[:, 0]
        top_values, top_ids = jax.lax.top_k(log_probs, top_k)
        return DecodeCarry(
            step=c.step + 1, rings=rings, token=new, done=c.done | (chosen & (new == eos_ids)),
            penalties=count_tokens(sampling, c.penalties, new, chosen),
            tokens=c.tokens.at[c.step].set(new), drafts=c.drafts.at[c.step].set(drafts),
            log_probs=c.log_probs.at[c.step].set(picked),
            top_log_probs=c.top_log_probs.at[c.step].set(top_values),
            top_ids=c.top_ids.at[c.step].set(top_ids.astype(jnp.int32)),
        )  # fmt: skip

    init = DecodeCarry(
        step=jnp.zeros([], jnp.int32), rings=rings, token=token,
        done=jnp.zeros([batch], jnp.bool_), tokens=jnp.zeros([CHUNK, batch], jnp.int32),
        drafts=jnp.zeros([CHUNK, batch], jnp.int32),
        log_probs=jnp.zeros([CHUNK, batch], jnp.float32),
        top_log_probs=jnp.zeros([CHUNK, batch, top_k], jnp.float32),
        top_ids=jnp.zeros([CHUNK, batch, top_k], jnp.int32), penalties=penalties,
    )  # fmt: skip
    c = jax.lax.while_loop(cond, body, init)
    return (c.rings, c.token, c.tokens, c.log_probs, c.step, c.top_log_probs, c.top_ids,
            c.penalties, c.drafts)  # fmt: skip


@warm.entry(static_argnames=("config",))
def ring_to_state(config, params, rings):
    return model_from_ring(rings, network(config, params)[2])


state_to_ring = warm.Entry(model_to_ring)
repeat_ring_rows = warm.Entry(repeat_rows, static_argnames=("n",))


def run_chunk(model: Model, rings, token, keys, counts, limits, forced, n_forced, eos_ids,
              sampling: SamplerRows, penalties: Penalties, mesh: Mesh | None = None,
              params: Any = None, top_k: int = 0, in_place: bool = False):  # fmt: skip
    """decode_chunk, always called in one form: jit keys its compiled code on which
    arguments are positional and which keyword, and on whether arrays are committed
    (tvq.runtime.forward.on_device); a second form would compile the loop again. With a
    mesh the rows are split over its devices (`params` replicated on them). in_place:
    decode_chunk_in_place (rings, token and penalties are used up)."""
    counts, limits = np.asarray(counts, np.int32), np.asarray(limits, np.int32)
    eos_ids = np.broadcast_to(np.asarray(eos_ids, np.int32), limits.shape)
    n_forced = np.broadcast_to(np.asarray(n_forced, np.int32), limits.shape)
    rows = (rings, token, keys, counts, limits, n_forced, eos_ids, sampling, penalties)
    if mesh is None:
        rows, forced = on_device((rows, forced))
        params = model.params
    else:
        rows, forced = split_rows(mesh, rows), replicated(mesh, forced)
    rings, token, keys, counts, limits, n_forced, eos_ids, sampling, penalties = rows
    loop = decode_chunk_in_place if in_place else decode_chunk
    return loop(model.config, params, rings, token, keys, counts, limits, forced, n_forced,
                eos_ids, sampling, penalties, top_k=top_k)  # fmt: skip


def feed(model: Model, rings, token, ids: np.ndarray, top_k: int = 0):
    """Feeds ids [B, T] after `token` [B] through the decoding loop (every step forced),
    CHUNK at a time; the same compiled loop as sampling (top_k too), so no other length
    gets compiled. Returns (rings, last token, scored): scored holds the log-probs of the
    ids [B, T] and, with top_k, the k most likely tokens' log-probs and ids [B, T, k]
    (numpy arrays)."""
    batch, length = ids.shape
    keys, sampling, penalties = _feeding(model.config.n_vocab, batch)
    parts = []
    for start in range(0, length, CHUNK):
        piece = ids[:, start : start + CHUNK]
        n = piece.shape[1]
        forced = np.zeros([CHUNK, batch], np.int32)
        forced[:n] = piece.T
        rings, token, _, log_probs, _, top_values, top_ids, *_ = run_chunk(
            model, rings, token, keys, np.zeros(batch), np.full(batch, n), forced, n, -1,
            sampling, penalties, top_k=top_k,
        )  # fmt: skip
        parts.append((n, log_probs, top_values, top_ids))
    # cut and joined on the host, fetched once: an operation on the device for each
    # length n would compile a program per length, each held for good (~1.4 MB on
    # XLA:CPU, RESULTS section 18)
    cut = [(lp[:n].T, tv[:n].swapaxes(0, 1), ti[:n].swapaxes(0, 1))
           for n, lp, tv, ti in jax.device_get(parts)]  # fmt: skip
    scored = [np.concatenate(p, axis=1) for p in zip(*cut, strict=True)]
    return rings, token, tuple(scored if top_k else scored[:1])


@functools.lru_cache(maxsize=8)
def _feeding(n_vocab: int, batch: int) -> tuple[jax.Array, SamplerRows, Penalties]:
    """What feeding passes for keys, settings and penalties (unused: nothing is
    sampled), on the device, made once per batch size (nothing donates them): a server
    feeds every joining request's prompt tail."""
    keys = row_keys(0, batch)
    sampling = SamplerRows.of([GREEDY] * batch, n_vocab)
    return on_device((keys, sampling, Penalties.start(n_vocab, [[]] * batch)))


def feed_ids(model: Model, state, token, ids: np.ndarray, top_k: int = 0):
    """Scores ids [B, T] following `token` [B] from `state` (a ModelState) through the
    decoding loop → (scored as feed's, the state after). tvq.scoring.stream sends each text's
    tail shorter than a block this way: one compiled loop serves every tail length,
    where the blockwise forward compiles one program per length."""
    rings = state_to_ring(on_device(state))
    token = jnp.asarray(token, jnp.int32)
    rings, _, scored = feed(model, rings, token, ids, top_k)
    return scored, ring_to_state(model.config, model.params, on_device(rings))


def row_keys(seed: int, n: int) -> np.ndarray:
    """The keys of n samples of one text [n, 2]: sample i draws from fold_in(key(seed), i)."""
    return np.asarray(device_row_keys(seed, n))


def device_row_keys(seed: int, n: int) -> jax.Array:
    """row_keys on the device, without waiting for them (the server's running batch)."""
    return _fold_keys(seed_key(seed), np.arange(n, dtype=np.int32))


def seed_key(seed: int) -> np.ndarray:
    """jax.random.PRNGKey(seed)'s data, made on the host when that is plain: with the
    default threefry keys and 32-bit integers it is [0, seed mod 2**32] (held equal by
    tests/test_sampling.py); no XLA program runs for it at start-up."""
    if jax.config.jax_enable_x64 or jax.config.jax_default_prng_impl != "threefry2x32":
        return np.asarray(jax.random.PRNGKey(seed))
    return np.array([0, seed % 2**32], np.uint32)


@warm.entry()
def _fold_keys(key: jax.Array, rows: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)
