"""Folding the network over blocks (docs/DESIGN.md section 8).

A sequence of any length is cut into blocks of `block_len` tokens (and one shorter
tail); a `jax.lax.scan` carries the fixed-size attention state from block to block, so
time is linear in length and memory is flat. Results do not depend on the block length
(docs/DESIGN.md invariant 3): it is a speed setting only. Scoring (`forward`) and
training (tvq/train/step.py) both fold `Transformer.block` with `fold_blocks`: one block
per scan step (the serial form), or chunks of blocks each computed at once (the
parallel form, docs/DESIGN.md section 12); `sequence_parallel_forward` spreads one
sequence's chunks over devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tvq.config import ModelConfig
from tvq.errors import InputError
from tvq.files import warm
from tvq.nn.layout import scanned
from tvq.nn.state import AttentionState, ModelState, stack_state, unstack_state
from tvq.nn.transformer import Transformer, network


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


ALGORITHMS = ("serial", "parallel")

# Elements (float32: 4 bytes each) one sublayer's parallel-form intermediates may hold,
# on a CPU and on an accelerator; bounds the chunk, so memory stays flat however long
# the text.
PARALLEL_ELEMENTS = {"cpu": 2**27, "accelerator": 2**29}


def default_algorithm() -> str:
    """The faster form for the default device (measured, bench/RESULTS.md section 9):
    serial on a CPU, where blocks of a few hundred tokens already fill the cores;
    parallel on an accelerator, where the serial scan leaves it idle between small
    steps."""
    return "serial" if jax.default_backend() == "cpu" else "parallel"


def check_algorithm(algorithm: Any) -> str:
    """An algorithm name (None: default_algorithm()), or InputError."""
    if algorithm is None:
        return default_algorithm()
    if algorithm not in ALGORITHMS:
        raise InputError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    return algorithm


def default_chunk_len(config: ModelConfig, batch: int, block_len: int) -> int:
    """Tokens per chunk of the parallel form: whole blocks, as many as keep one
    sublayer's per-block windows, scores and aggregates under PARALLEL_ELEMENTS."""
    width = config.mem_len + block_len
    per_block = (
        batch
        * config.n_head
        * (
            config.n_code * (config.d_v + 1)  # per-block aggregate
            + width * (config.d_k + config.d_v)  # per-block window
            + block_len * (width + config.n_code)  # scores
        )
    )
    budget = PARALLEL_ELEMENTS["cpu" if jax.default_backend() == "cpu" else "accelerator"]
    return block_len * max(1, budget // per_block)


def fold_blocks(
    step: Callable, carry: Any, seqs: Any, block_len: int, algorithm: str = "serial",
    chunk_len: int | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    """Folds `step(carry, piece, piece_block_len) -> (carry, out)` over a [B, T, ...]
    pytree. serial: one block per step (piece_block_len None: the piece is one block).
    parallel: chunks of chunk_len tokens (a multiple of block_len), each piece of whole
    blocks in the parallel form (piece_block_len = block_len), a tail shorter than a
    block as one serial block."""
    if algorithm == "serial":
        return scan_blocks(lambda c, x: step(c, x, None), carry, seqs, block_len)
    if algorithm != "parallel":
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")

    def chunk_step(carry, piece):
        length = jax.tree_util.tree_leaves(piece)[0].shape[1]
        full = length // block_len * block_len
        if full in (0, length):
            return step(carry, piece, block_len if full else None)
        carry, head = step(carry, jax.tree_util.tree_map(lambda a: a[:, :full], piece), block_len)
        carry, tail = step(carry, jax.tree_util.tree_map(lambda a: a[:, full:], piece), None)
        return carry, jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=1), head, tail)

    return scan_blocks(chunk_step, carry, seqs, chunk_len)


def forward(
    config: ModelConfig,
    params: Any,
    tokens: jax.Array,
    state: ModelState | AttentionState,
    block_len: int,
    targets: jax.Array | None = None,
    input_offsets: jax.Array | None = None,
    algorithm: str = "serial",
    chunk_len: int | None = None,
    top_k: int = 0,
) -> tuple[Any, ModelState]:
    """Runs tokens [B, T] from `state`.

    Returns (log-probs [B, T, N], new state), or with targets [B, T] the log-probs of
    the targets [B, T]; then only one chunk of logits ever exists (top_k > 0: also the
    k most likely tokens per position, pick_targets). input_offsets
    [B, T, D], added to the embeddings, lets tests take Jacobians. algorithm "serial"
    or "parallel" (docs/DESIGN.md section 8) gives the same numbers; chunk_len (parallel
    only, None: default_chunk_len) bounds memory. The state comes back in the form
    given; where the network scans its sublayers, the fold carries it stacked
    (tvq/nn/state.py): a ModelState is stacked once here and unstacked once at the end.
    """
    net, variables, tables = network(config, params)
    if algorithm == "parallel" and chunk_len is None:
        chunk_len = default_chunk_len(config, tokens.shape[0], block_len)

    def step(carry: AttentionState, piece, piece_block_len):
        piece_tokens, piece_targets, piece_offsets = piece
        carry, log_probs, _ = net.apply(
            variables, piece_tokens, carry, tables, False, piece_offsets, piece_block_len,
            method=Transformer.block,
        )  # fmt: skip
        if piece_targets is None:
            return carry, log_probs
        return carry, pick_targets(log_probs, piece_targets, top_k)

    seqs = (tokens, targets, input_offsets)
    stack = isinstance(state, ModelState) and net.scanned  # a scan carries it stacked
    carried = stack_state(state) if stack else state
    new_state, out = fold_blocks(step, carried, seqs, block_len, algorithm, chunk_len)
    return out, unstack_state(new_state) if stack else new_state


def pick_targets(log_probs: jax.Array, targets: jax.Array, top_k: int = 0) -> Any:
    """The log-probs of targets [B, T] in log_probs [B, T, N]; top_k > 0: a tuple of
    those, the top_k largest log-probs [B, T, k] and their token ids [B, T, k]."""
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if not top_k:
        return picked
    values, ids = jax.lax.top_k(log_probs, top_k)
    return picked, values, ids.astype(jnp.int32)


def _stacked_forward(
    config: ModelConfig, params: Any, tokens: jax.Array, state: Any, block_len: int,
    targets: jax.Array | None = None, input_offsets: jax.Array | None = None,
    algorithm: str = "serial", chunk_len: int | None = None, top_k: int = 0,
) -> tuple[Any, AttentionState]:  # fmt: skip
    """forward() returning the state stacked where the network scans its sublayers,
    whatever came in: the compiled program's outputs, like its body, do not grow with
    depth (docs/DESIGN.md section 5)."""
    if isinstance(state, ModelState) and scanned(2 * config.n_layer):
        state = stack_state(state)
    return forward(config, params, tokens, state, block_len, targets, input_offsets,
                   algorithm, chunk_len, top_k)  # fmt: skip


_stacked_forward.__name__ = _stacked_forward.__qualname__ = "forward"  # its jit's name
FORWARD_STATIC = ("config", "block_len", "algorithm", "chunk_len", "top_k")
forward_program = warm.Entry(_stacked_forward, static_argnames=FORWARD_STATIC)


def forward_jit(
    config: ModelConfig, params: Any, tokens: jax.Array, state: Any, block_len: int,
    targets: jax.Array | None = None, input_offsets: jax.Array | None = None, *,
    algorithm: str = "serial", chunk_len: int | None = None, top_k: int = 0,
) -> tuple[Any, Any]:  # fmt: skip
    """forward(), compiled: one program per shape (`forward_program`, whose state comes
    back stacked), called always in one form; a ModelState comes back as one, unstacked
    outside the program (tvq.nn.layout.unstack_tree)."""
    out, stacked = forward_program(
        config, params, tokens, state, block_len, targets, input_offsets, algorithm=algorithm,
        chunk_len=chunk_len, top_k=top_k,
    )  # fmt: skip
    return out, public_state(state, stacked)


def public_state(given: Any, result: Any) -> Any:
    """A program's resulting state in the form the caller gave (a ModelState is unstacked
    outside the program, by tvq.nn.layout.unstack_tree)."""
    if isinstance(given, ModelState) and not isinstance(result, ModelState):
        return unstack_state(result)
    return result


def on_device(tree: Any) -> Any:
    """Commits arrays to the default device. jit keys its compiled code on whether
    arguments are committed: a jit's outputs are, host arrays and fresh constants are not,
    so feeding a call's output state back in would compile the same function twice.
    Compiled entry points take their arguments through here. Arrays committed to that
    device already pass through untouched (a device_put costs ~35 µs a leaf, and the
    server's running batch passes ~75 leaves a call)."""
    device = jax.local_devices()[0]
    leaves, structure = jax.tree_util.tree_flatten(tree)
    there = jax.sharding.SingleDeviceSharding(device)
    moving = [i for i, x in enumerate(leaves)
              if not (isinstance(x, jax.Array) and x.committed
                      and x.sharding == there)]  # fmt: skip
    if moving:
        moved = jax.device_put([leaves[i] for i in moving], device)
        for i, x in zip(moving, moved, strict=True):
            leaves[i] = x
    return jax.tree_util.tree_unflatten(structure, leaves)


def sequence_parallel_forward(
    config: ModelConfig,
    params: Any,
    tokens: jax.Array,
    state: ModelState,
    block_len: int,
    targets: jax.Array | None,
    mesh: Any,
    chunk_len: int | None = None,
    top_k: int = 0,
) -> tuple[Any, ModelState]:
    """forward() with each sequence's time axis spread over the one-axis `mesh`: the
    parallel form, every device taking a contiguous run of chunk_len tokens of each
    span of mesh.size · chunk_len (docs/DESIGN.md section 8, "Across devices"); the
    state goes in and comes out replicated, and a remainder shorter than a span runs
    on one device. Same numbers as forward()."""
    from jax.sharding import PartitionSpec

    axis, n_devices = mesh.axis_names[0], mesh.size
    if chunk_len is None:  # the call's blocks shared out, within the memory bound
        share = tokens.shape[1] // n_devices // block_len * block_len
        chunk_len = min(default_chunk_len(config, tokens.shape[0], block_len), share)
    # Each device's run must hold the M entries its right neighbour's first window needs.
    chunk_len = max(chunk_len, block_len, -(-config.mem_len // block_len) * block_len)
    span = n_devices * chunk_len
    net, variables, tables = network(config, params)
    stack = isinstance(state, ModelState) and net.scanned
    state = stack_state(state) if stack else state

    def local(variables, tables, state, piece):
        piece_tokens, piece_targets = piece
        state, log_probs, _ = net.apply(
            variables, piece_tokens, state, tables, False, None, block_len, axis, n_devices,
            method=Transformer.block,
        )  # fmt: skip
        if piece_targets is not None:
            log_probs = pick_targets(log_probs, piece_targets, top_k)
        return state, log_probs

    along_time = PartitionSpec(None, axis)
    spread = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(), along_time),
        out_specs=(PartitionSpec(), along_time),
        check_vma=False,  # the state is the same on every device: built by psum/all_gather
    )

    length = tokens.shape[1]
    whole = length // span * span
    outs = []
    if whole:
        head = jax.tree_util.tree_map(
            lambda a: None if a is None else to_blocks(a[:, :whole], span), (tokens, targets)
        )
        state, ys = jax.lax.scan(lambda c, x: spread(variables, tables, c, x), state, head)
        outs.append(jax.tree_util.tree_map(from_blocks, ys))
    if whole < length:
        rest, state = forward(
            config, variables["params"], tokens[:, whole:], state, block_len,
            None if targets is None else targets[:, whole:], algorithm="parallel",
            chunk_len=chunk_len, top_k=top_k,
        )  # fmt: skip
        outs.append(rest)
    state = unstack_state(state) if stack else state
    if len(outs) == 1:
        return outs[0], state
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=1), *outs), state


def _stacked_sequence_parallel(
    config: ModelConfig, params: Any, tokens: jax.Array, state: Any, block_len: int,
    targets: jax.Array | None, mesh: Any, chunk_len: int | None = None, top_k: int = 0,
) -> tuple[Any, AttentionState]:  # fmt: skip
    """sequence_parallel_forward() returning the state stacked (as _stacked_forward)."""
    if isinstance(state, ModelState) and scanned(2 * config.n_layer):
        state = stack_state(state)
    return sequence_parallel_forward(config, params, tokens, state, block_len, targets, mesh,
                                     chunk_len, top_k)  # fmt: skip


_stacked_sequence_parallel.__name__ = "sequence_parallel_forward"
_stacked_sequence_parallel.__qualname__ = "sequence_parallel_forward"
# A mesh is a static argument: its program is not kept on disk (warm.Entry).
sequence_parallel_program = warm.Entry(
    _stacked_sequence_parallel,
    static_argnames=("config", "block_len", "mesh", "chunk_len", "top_k"),
    store=False,
)


def sequence_parallel_jit(config: ModelConfig, params: Any, tokens: jax.Array, state: Any,
                          block_len: int, targets: jax.Array | None, mesh: Any,
                          top_k: int = 0) -> tuple[Any, Any]:  # fmt: skip
    """sequence_parallel_forward(), compiled (as forward_jit)."""
    out, stacked = sequence_parallel_program(config, params, tokens, state, block_len, targets,
                                             mesh, top_k=top_k)  # fmt: skip
    return out, public_state(state, stacked)
