"""Shared helpers: tiny configs, a runner for one sublayer over blocks, parameter edits,
and a counter of XLA compilations."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import mmap
import os
from pathlib import Path

# Unit tests compile hundreds of tiny programs; XLA's optimisations cost more time than
# they save there and do not change results beyond float rounding. XLA:CPU's fusion
# emitters compile each fusion more slowly than the older emitters (about 30% of the
# suite's compilation; same numbers). The variables reach the `tvq` processes that
# tests start too (tests that force a device count add to XLA_FLAGS: forced_devices).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
FAST_COMPILE_FLAG = "xla_cpu_use_fusion_emitters"


def xla_knows(flag: str) -> bool:
    """Whether the installed jaxlib has an XLA flag (an unknown flag in XLA_FLAGS aborts
    every process), read off its shared libraries without importing it."""
    spec = importlib.util.find_spec("jaxlib")
    for folder in spec.submodule_search_locations if spec else []:
        for library in Path(folder).glob("*.so"):
            if library.stat().st_size == 0:
                continue
            with library.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(flag.encode()) >= 0:
                    return True
    return False


if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", "") and xla_knows(FAST_COMPILE_FLAG):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --{FAST_COMPILE_FLAG}=false"
    os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import tvq  # noqa: E402
from tvq.nn.state import initial_attention_state  # noqa: E402
from tvq.nn.sublayer import VQAttention, attention_fields  # noqa: E402
from tvq.runtime.forward import scan_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIVISORS_12 = (1, 2, 3, 4, 6, 12)
jax.config.update("jax_disable_most_optimizations", True)


def forced_devices(count: int, **extra: str) -> dict:
    """The environment of a subprocess with `count` forced CPU devices (XLA_FLAGS) that
    imports tvq from this tree."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    return dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(ROOT), **extra)


def tiny_config(**overrides) -> tvq.ModelConfig:
    fields = dict(d_model=16, d_k=8, d_v=8, n_head=2, n_code=4, n_layer=1, n_vocab=13, mem_len=3,
                  e_scale=1.0)  # fmt: skip
    fields.update(overrides)
    return tvq.ModelConfig(**fields)


def save_byte_model(folder, seed: int):
    """A small random byte-level model with a spread-out output (not a trained one),
    saved in `folder` → folder."""
    from tvq.text.tokenizer import ByteTokenizer

    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    tvq.Model.init(config, seed=seed, block_len=4).with_tokenizer(ByteTokenizer()).save(folder)
    return folder


def random_tokens(config: tvq.ModelConfig, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.n_vocab, size=(batch, length))


def sublayer_for(config: tvq.ModelConfig) -> VQAttention:
    return VQAttention(**attention_fields(config))


def with_param(model: tvq.Model, name: str, value) -> tvq.Model:
    """A new model whose parameter `name` ("a/b/c") is `value`; the model is unchanged."""
    params = jax.tree_util.tree_map(lambda x: x, model.params)  # copies every dict
    *parents, last = name.split("/")
    node = params
    for part in parents:
        node = node[part]
    node[last] = jnp.asarray(value)
    return dataclasses.replace(model, params=params)


@contextlib.contextmanager
def count_compilations():
    """Counts XLA compilations by function name, e.g. counts["jit(decode_chunk)"]."""
    counts = collections.Counter()

    def listener(event, duration, fun_name=None, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            counts[fun_name] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def init_sublayer(config: tvq.ModelConfig, seed: int = 0):
    layer = sublayer_for(config)
    x = jnp.zeros([1, 1, config.d_model])
    state = initial_attention_state(config, 1)

    def run_once(module):
        return module(x, state, module.tables())

    variables = layer.init(jax.random.PRNGKey(seed), method=run_once)
    params = variables["params"]
    # Random (not zero-initialised) u, v so the content and position biases are exercised.
    key_u, key_v = jax.random.split(jax.random.PRNGKey(seed + 100))
    params = dict(params, u=jax.random.normal(key_u, params["u"].shape),
                  v=jax.random.normal(key_v, params["v"].shape))  # fmt: skip
    return layer, params


def run_sublayer(layer, params, x, block_len, state, train=False):
    """x [B, T, D] through one sublayer in blocks → (residuals [B, T, D], final state)."""
    variables = {"params": params}
    tables = layer.apply(variables, method=VQAttention.tables)

    def step(carry, block):
        carry, res, _ = layer.apply(variables, block, carry, tables, train)
        return carry, res

    final, out = scan_blocks(step, state, x, block_len)
    return out, final
