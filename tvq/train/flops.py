"""FLOPs and model FLOP utilisation (MFU) of a run: what `tvq train` logs and bench/mfu.py
measures, from one definition.

FLOPs are counted by hand from docs/DESIGN.md section 4, two per multiply-add, for what
the blockwise algorithm computes per token at block length L (window W = M + L):
  per sublayer: projections 2·D·(2·H·K + 2·H·V) + 2·H·V·D; quantization 2·H·S·K;
  window scores 2·H·W·K, positional table 2·H·(M + 1)·K, codeword scores 2·H·S·K,
  weighted values 2·H·W·V + 2·H·S·V; eviction into the aggregate 2·H·S·V;
  output layer 2·D·N. Training counts 3× the forward (backward = 2× forward).
The peak is a chip's dense matrix rate from its data sheet where the chip is known
(bfloat16; float32 matmuls at the TF32 rate, half of it), else (a CPU) the best of a few
float32 matrix products measured once in this process.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from tvq.config import ModelConfig

# Dense bfloat16 FLOP/s per chip, by a substring of jax's device_kind (data sheets).
PEAK_BFLOAT16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def flops_per_token(config: ModelConfig, block_len: int) -> float:
    """The forward pass's FLOPs per token at block length `block_len` (module docstring)."""
    d, h, k, v, s, m, n = (config.d_model, config.n_head, config.d_k, config.d_v, config.n_code,
                           config.mem_len, config.n_vocab)  # fmt: skip
    w = m + block_len
    sublayer = (2 * d * (2 * h * k + 2 * h * v) + 2 * h * v * d + 2 * h * s * k
                + 2 * h * w * k + 2 * h * (m + 1) * k + 2 * h * s * k
                + 2 * h * w * v + 2 * h * s * v + 2 * h * s * v)  # fmt: skip
    return 2 * config.n_layer * sublayer + 2 * d * n


def training_flops_per_token(config: ModelConfig, block_len: int) -> float:
    """Forward and backward: 3× the forward."""
    return 3 * flops_per_token(config, block_len)


@functools.lru_cache(maxsize=8)
def peak_flops(device_kind: str, dtype: str) -> float:
    """One device's peak FLOP/s for matrix products in `dtype` (module docstring)."""
    for name, peak in PEAK_BFLOAT16.items():
        if name.lower() in device_kind.lower():
            return peak if dtype == "bfloat16" else peak / 2
    return measured_peak()


@functools.lru_cache(maxsize=1)
def measured_peak(size: int = 1024, repeats: int = 3) -> float:
    """The best rate of float32 size² matrix products on the default device."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()  # compiled outside the timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def mfu(config: ModelConfig, block_len: int, tokens_per_second: float, devices: int) -> float:
    """Model FLOP utilisation of training at tokens_per_second over `devices` devices."""
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, config.dtype) * devices
    return tokens_per_second * training_flops_per_token(config, block_len) / peak
