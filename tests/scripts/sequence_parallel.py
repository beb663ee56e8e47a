"""Run by tests/test_parallel.py in a process with 4 forced CPU devices: scores one
sequence on one device (serial form) and spread over 4 devices (sequence parallel), from
a carried state, with agg_cache on and off; prints the largest differences as JSON."""

import json

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import tvq
from tvq.runtime.forward import forward, sequence_parallel_forward

# The forced CPU devices, also on a machine whose default device is a GPU.
assert len(jax.devices("cpu")) == 4
mesh = Mesh(np.array(jax.devices("cpu")), ("seq",))
rng = np.random.default_rng(0)
report = {}
for agg_cache in (True, False):
    config = tvq.ModelConfig(d_model=16, d_k=8, d_v=8, n_head=2, n_code=4, n_layer=1,
                             n_vocab=13, mem_len=3, agg_cache=agg_cache)  # fmt: skip
    params = tvq.Model.init(config, seed=3).params
    tokens = rng.integers(0, 13, (2, 61))
    targets = rng.integers(0, 13, (2, 61))
    start = tvq.nn.state.initial_state(config, 2)
    _, state = forward(config, params, tokens[:, :7], start, 7)  # a carried state
    alone, alone_state = forward(config, params, tokens, state, 1, targets)
    replicated = NamedSharding(mesh, PartitionSpec())
    args = jax.device_put((params, tokens, state, targets), replicated)
    spread = jax.jit(sequence_parallel_forward, static_argnums=(0, 4, 6, 7))
    for block_len, chunk_len in ((2, 4), (3, None)):
        out, out_state = spread(config, args[0], args[1], args[2], block_len, args[3], mesh,
                                chunk_len)  # fmt: skip
        out, out_state = jax.device_get((out, out_state))
        expected = jax.device_get(alone_state)
        leaves = zip(jax.tree_util.tree_leaves(out_state), jax.tree_util.tree_leaves(expected),
                     strict=True)  # fmt: skip
        report[f"{agg_cache} {block_len} {chunk_len}"] = {
            "log_probs": float(np.max(np.abs(out - np.asarray(alone)))),
            "state": max(float(np.max(np.abs(a - b))) for a, b in leaves),
        }
print(json.dumps(report))
