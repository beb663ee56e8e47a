"""tvq's entropy coder (docs/DESIGN.md section 16): range asymmetric numeral systems
(rANS) with a 32-bit state and byte-wise renormalisation, its decoder written in JAX so
that it runs inside the compiled model loop.

Why not a coder from a library: the decompressor must decode each token before it can
feed it to the model. With a coder on the host that is one call of the compiled program,
and one host round trip, per token (~0.8 ms here on top of a ~1.6 ms step, RESULTS
section 18). Inside the program, a call decodes 32 tokens as the compressor codes 32.
So the quantization of the model's probabilities to integer frequencies is JAX code too,
in the same program on both sides, and the host only encodes: it gets each token's
(start, frequency) from the program and runs the rANS encoder over a frame in reverse.

The arithmetic (Duda's rANS, byte-wise as in ryg_rans): a frequency table sums to
TOTAL = 2**PRECISION; the state x stays in [LOW, 256 * LOW). Coding symbol (start, f)
pushes x to (x // f) * TOTAL + x % f + start, first emitting low bytes while x ≥
(LOW / TOTAL) * 256 * f; decoding inverts it: slot = x % TOTAL names the symbol, x = f *
(x // TOTAL) + slot - start, then bytes come in while x < LOW (at most 3). The encoder
runs over the symbols last to first, so the decoder reads forward; the stream starts with
the final state's 4 bytes (big-endian), and a decoder that reads every symbol ends back
at LOW, having read every byte.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp

PRECISION = 22  # bits of a frequency table's total: a floor of 1 in 4 million
TOTAL = 1 << PRECISION
LOW = 1 << 23  # the state's lower bound
BYTE_BITS = PRECISION - 8  # an escaped byte: frequency 2**BYTE_BITS, start byte << BYTE_BITS
MAX_READ = 3  # bytes the decoder reads after one symbol, at most


def frequencies(log_probs: jax.Array) -> jax.Array:
    """float32 log-probs [V] → int32 frequencies [V] summing to TOTAL, each ≥ 1: 1 +
    floor(p * (TOTAL - V)), what rounding leaves (or takes) going to the likeliest.
    Deterministic: exp, a product and a floor element by element, integer sums."""
    v = log_probs.shape[-1]
    freq = 1 + jnp.floor(jnp.exp(log_probs) * float(TOTAL - v)).astype(jnp.int32)
    return freq.at[jnp.argmax(log_probs)].add(TOTAL - jnp.sum(freq))


def table_hash(freq: jax.Array) -> jax.Array:
    """A uint32 hash of a frequency table (for the header's probe)."""
    weights = 2 * jnp.arange(freq.shape[-1], dtype=jnp.uint32) + 1
    return jnp.sum(freq.astype(jnp.uint32) * weights, dtype=jnp.uint32)


def decode(state: jax.Array, window: jax.Array, at: jax.Array, slot_of) -> tuple:
    """One symbol from state (uint32 scalar) and the stream bytes `window` [S] uint8 read
    from `at`: slot_of(slot) → (symbol, start, frequency) names the symbol a slot falls
    in. → (symbol, the state after, the position after)."""
    slot = state & jnp.uint32(TOTAL - 1)
    symbol, start, freq = slot_of(slot.astype(jnp.int32))
    state = freq.astype(jnp.uint32) * (state >> PRECISION) + slot - start.astype(jnp.uint32)
    for _ in range(MAX_READ):
        short = state < LOW
        byte = window[jnp.minimum(at, window.shape[0] - 1)].astype(jnp.uint32)
        state = jnp.where(short, (state << 8) | byte, state)
        at = at + short.astype(jnp.int32)
    return symbol, state, at


def token_slot(starts: jax.Array, freq: jax.Array):
    """slot_of for a frequency table (its starts, the cumulative sums before each, and
    frequencies): the token whose range holds the slot."""

    def slot_of(slot):
        token = jnp.sum(starts <= slot, dtype=jnp.int32) - 1
        return token, starts[token], freq[token]

    return slot_of


def byte_slot(slot):
    """slot_of for a byte coded uniformly (the escape's)."""
    byte = slot >> BYTE_BITS
    return byte, byte << BYTE_BITS, jnp.int32(1 << BYTE_BITS)


def encode(symbols: Iterable[tuple[int, int]]) -> bytes:
    """(start, frequency) pairs, in the order the decoder reads them → the stream."""
    state, out = LOW, bytearray()
    per_byte = (LOW >> PRECISION) << 8
    for start, freq in reversed(list(symbols)):
        limit = per_byte * freq
        while state >= limit:
            out.append(state & 0xFF)
            state >>= 8
        state = (state // freq << PRECISION) + state % freq + start
    out += state.to_bytes(4, "little")
    out.reverse()
    return bytes(out)


def first_state(stream: bytes) -> int:
    """The decoder's state at the start of a stream (its first 4 bytes)."""
    return int.from_bytes(stream[:4], "big")
