"""Speed at scale on an accelerator (issue: the parallel form, GPU numbers).

    python bench/gpu_speed.py SECTION [--out FILE.jsonl] [--quick]

Sections, each meant for its own process (bench/gpu.sh runs them in order):
  peak    the device's measured matmul peak (bfloat16 and float32, 8192³ and 4096³)
  check   serial vs parallel on this device: a small float32 model (highest matmul
          precision) and the paper-size model in bfloat16
  score   scoring tokens/s for the paper-size model, batch 8, 8k / 32k / 131k tokens
          per sequence: tvq serial, tvq parallel (8,192-token calls carrying the state,
          as `tvq score` streams) and the dense baseline (bench/dense.py, fused
          attention) run whole; MFU against the peak measured in the same process
  decode  tokens/s of the compiled sampling loop, batch 1 and 64, greedy and the CLI
          default sampler
  train   training tokens/s and MFU, serial and parallel (batch 8 × 1,024 tokens)

The paper-size model is the reference's enwik8 shape: d_model 768, d_k 128, d_v 1536,
24 layers of two single-head sublayers, n_code 512, mem_len = block_len = 512, byte
vocabulary; random parameters; compute in bfloat16. Every timing: compiled first, then
block_until_ready and the median of repeats. Each result is printed and appended as
JSON to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dense  # noqa: E402
from common import median_time  # noqa: E402
from mfu import flops_per_token  # noqa: E402

import tvq  # noqa: E402
from tvq.nn.params import nest, param_layout  # noqa: E402
from tvq.nn.state import initial_state  # noqa: E402
from tvq.runtime.forward import default_chunk_len, forward  # noqa: E402
from tvq.runtime.model import init_params  # noqa: E402

PAPER = tvq.ModelConfig(d_model=768, d_k=128, d_v=1536, n_head=1, n_code=512, n_layer=24,
                        n_vocab=256, mem_len=512, e_scale=768**-0.5, dtype="bfloat16")  # fmt: skip
BLOCK = 512
SEGMENT = 8192  # tokens per compiled scoring call
LENGTHS = (8192, 32768, 131072)
BATCH = 8


def random_params(config: tvq.ModelConfig, seed: int = 0):
    """Random parameters of the right shapes and scales, made with numpy on the host: the
    compiled flax init of the 24-layer model took ~100 s on the H100 (RESULTS section 9),
    and speed does not depend on where the numbers came from. Kernels normal(1/√fan-in),
    embeddings normal(1), norm gains 1, biases 0, codebook counts 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_layout(config).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "kernel":
            value = rng.standard_normal(shape, np.float32) / np.sqrt(shape[0])
        elif leaf in ("embs", "c_sum"):
            value = rng.standard_normal(shape, np.float32)
        elif leaf in ("g", "c_count"):
            value = np.ones(shape, np.float32)
        else:
            value = np.zeros(shape, np.float32)
        out[name] = jnp.asarray(value, config.param_dtype)
    return nest(out)


def emit(out: Path | None, **record) -> None:
    record = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, **record}
    print(json.dumps(record), flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (block_until_ready inside), after one warm-up call; with
    repeats 0, one call and no warm-up (for runs of a minute, compiled already)."""
    if repeats == 0:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start
    return median_time(lambda: jax.block_until_ready(fn()), repeats=repeats)


def peak(dtype) -> tuple[float, int]:
    best = (0.0, 0)
    for size in (4096, 8192):
        a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
        matmul = jax.jit(lambda x, y: x @ y)
        best = max(best, (2 * size**3 / timed(lambda a=a, b=b, f=matmul: f(a, b), 10), size))
    return best


def section_peak(out, args) -> None:
    for dtype in ("bfloat16", "float32"):
        flops, size = peak(jnp.dtype(dtype))
        emit(out, section="peak", dtype=dtype, tflops=round(flops / 1e12, 1), size=size)


def max_mean(a, b) -> tuple[float, float]:
    d = jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))
    return float(jnp.max(d)), float(jnp.mean(d))


def section_check(out, args) -> None:
    small = tvq.ModelConfig(d_model=64, d_k=16, d_v=32, n_head=2, n_code=32, n_layer=2,
                            n_vocab=256, mem_len=64)  # fmt: skip
    paper = dataclasses.replace(PAPER, n_layer=4)  # the paper's layers, fewer of them
    with jax.default_matmul_precision("highest"):
        for config, length, block in ((small, 2048, 64), (paper, 4096, BLOCK)):
            params = init_params(config, 0)
            rng = np.random.default_rng(0)
            tokens = jnp.asarray(rng.integers(0, config.n_vocab, (2, length)), jnp.int32)
            targets = jnp.roll(tokens, 1, axis=1)  # not the input token: a real log-prob
            run = jax.jit(forward, static_argnames=("config", "block_len", "algorithm"))
            state = initial_state(config, 2)
            serial, s1 = run(config, params, tokens, state, block, targets, algorithm="serial")
            par, s2 = run(config, params, tokens, state, block, targets, algorithm="parallel")
            worst, mean = max_mean(serial, par)
            pairs = list(zip(s1.sublayers, s2.sublayers, strict=True))
            counts = max(max_mean(a.n, b.n)[0] / max(1.0, float(jnp.max(a.n))) for a, b in pairs)
            codes = max(float(jnp.mean(a.z != b.z)) for a, b in pairs)
            emit(out, section="check", model="paper, 4 layers" if config is paper else "small",
                 dtype=config.dtype, tokens=length, max_abs_dlogprob=worst,
                 mean_abs_dlogprob=mean, mean_abs_logprob=float(jnp.mean(jnp.abs(serial))),
                 max_rel_dcounts=counts, window_codes_differing=codes)  # fmt: skip


def section_score(out, args) -> None:
    bf16_peak, _ = peak(jnp.bfloat16)
    params = random_params(PAPER, 0)
    lengths = args.lengths or (LENGTHS[:2] if args.quick else LENGTHS)
    rng = np.random.default_rng(0)
    data = jnp.asarray(rng.integers(0, 256, (BATCH, max(lengths) + 1)), jnp.int32)
    run = jax.jit(forward, static_argnames=("config", "block_len", "algorithm", "chunk_len"))
    per_token: dict[str, dict[int, float]] = {}
    start_state = jax.device_put(initial_state(PAPER, BATCH))  # on the device, once
    for algorithm in ("serial", "parallel"):
        chunk = default_chunk_len(PAPER, BATCH, BLOCK) if algorithm == "parallel" else None
        start = time.perf_counter()
        jax.block_until_ready(
            run(
                PAPER,
                params,
                data[:, :SEGMENT],
                start_state,
                BLOCK,
                data[:, 1 : SEGMENT + 1],
                algorithm=algorithm,
            )
        )
        compile_s = time.perf_counter() - start
        for length in lengths:

            def score(length=length, algorithm=algorithm):
                state, total = start_state, 0.0
                for s in range(0, length, SEGMENT):
                    lp, state = run(
                        PAPER,
                        params,
                        data[:, s : s + SEGMENT],
                        state,
                        BLOCK,
                        data[:, s + 1 : s + SEGMENT + 1],
                        algorithm=algorithm,
                    )
                    total = total + jnp.sum(lp)
                return total

            seconds = timed(score, 3 if length <= 32768 else 0)
            rate = BATCH * length / seconds
            flops = flops_per_token(PAPER, BLOCK)
            per_token.setdefault(algorithm, {})[length] = seconds / length
            emit(out, section="score", model=f"tvq {algorithm}", tokens=length, batch=BATCH,
                 seconds=round(seconds, 4), tokens_per_s=round(rate), chunk_len=chunk,
                 compile_s=round(compile_s, 1), mfu=round(rate * flops / bf16_peak, 4),
                 per_token_vs_8k=round(per_token[algorithm][length]
                                       / per_token[algorithm][lengths[0]], 4))  # fmt: skip
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    for length in () if args.tvq_only else lengths:
        inputs, targets = data[:, :length], data[:, 1 : length + 1]
        try:
            start = time.perf_counter()
            compiled = dense.score_fused.lower(PAPER, params, inputs, targets, impl).compile()
            compile_s = time.perf_counter() - start
            seconds = timed(lambda c=compiled, i=inputs, t=targets: c(params, i, t),
                            3 if length <= 32768 else 0)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - report and go on: the table says why
            emit(out, section="score", model="dense", tokens=length, error=str(e)[:300])
            continue
        rate = BATCH * length / seconds
        flops = dense.flops_per_token(PAPER, length)
        tvq_seconds = {alg: per_token[alg][length] * length for alg in per_token}
        emit(out, section="score", model=f"dense ({impl or 'xla'})", tokens=length,
             batch=BATCH, seconds=round(seconds, 4), tokens_per_s=round(rate),
             compile_s=round(compile_s, 1), mfu=round(rate * flops / bf16_peak, 4),
             tvq_parallel_speedup=round(seconds / tvq_seconds["parallel"], 2),
             tvq_serial_speedup=round(seconds / tvq_seconds["serial"], 2))  # fmt: skip


STARTED = time.perf_counter()


def stage(message: str) -> None:
    """A progress line with the seconds since the start (to see where a limit went)."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", flush=True)


def section_decode(out, args) -> None:
    from tvq.nn.ring import empty_rings
    from tvq.runtime.decode_loop import CHUNK, decode_chunk
    from tvq.text.sampling import Penalties, Sampler, SamplerRows

    for layers in args.layers or (4, PAPER.n_layer):
        config = dataclasses.replace(PAPER, n_layer=layers)
        params = random_params(config, 0)
        for batch in args.batches or (1, 64):
            samplers = (("greedy", Sampler(temperature=0)),
                        ("CLI default", Sampler(temperature=0.8, top_p=0.95)))  # fmt: skip
            for name, sampler in samplers:
                rings = jax.device_put(empty_rings(config, batch))
                token = jnp.zeros([batch], jnp.int32)
                forced = jnp.zeros([CHUNK, batch], jnp.int32)
                keys = jax.random.split(jax.random.PRNGKey(0), batch)
                counts = jnp.zeros([batch], jnp.int32)
                limits = jnp.full([batch], CHUNK, jnp.int32)
                n_forced = jnp.zeros([batch], jnp.int32)
                eos = jnp.full([batch], -1, jnp.int32)
                sampling = jax.device_put(SamplerRows.of([sampler] * batch, config.n_vocab))
                penalties = jax.device_put(Penalties.start(config.n_vocab, [[]] * batch))
                stage(f"decode {layers} layers batch {batch} {name}: compiling")
                compiled = decode_chunk.lower(config, params, rings, token, keys, counts, limits,
                                              forced, n_forced, eos, sampling,
                                              penalties).compile()  # fmt: skip
                stage("compiled")
                chunks = 4

                def run(c=compiled, p=params, rings=rings, token=token, forced=forced, keys=keys,
                        counts=counts, limits=limits, eos=eos, s=sampling,
                        pen=penalties, n_forced=n_forced):  # fmt: skip
                    r, t = rings, token
                    for i in range(4):
                        r, t, *_, pen = c(p, r, t, keys, counts + i * CHUNK, limits, forced,
                                          n_forced, eos, s, pen)  # fmt: skip
                    return t

                seconds = timed(run, 3)
                emit(out, section="decode", layers=layers, sampler=name, batch=batch,
                     tokens_per_s=round(batch * CHUNK * chunks / seconds),
                     ms_per_step=round(1000 * seconds / (CHUNK * chunks), 3))  # fmt: skip


def section_train(out, args) -> None:
    from tvq.train import TrainSettings, make_optimizer, make_train_step
    from tvq.train.checkpoints import to_run_layout

    bf16_peak, _ = peak(jnp.bfloat16)
    settings = TrainSettings(batch_size=BATCH, update_len=1024, block_len=BLOCK)
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (BATCH, settings.update_len + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])
    optimizer = make_optimizer(settings)
    for layers, algorithm in itertools.product(
        args.layers or (4, PAPER.n_layer), ("parallel", "serial")
    ):
        config = dataclasses.replace(PAPER, n_layer=layers)
        # the step's layout: stacked where the network scans
        params, state = to_run_layout((random_params(config, 0), initial_state(config, BATCH)),
                                      config)  # fmt: skip
        step = make_train_step(config, settings, optimizer, algorithm)
        carry = {"params": params, "opt": optimizer.init(params)}
        state = jax.device_put(state)
        try:
            stage(f"train {layers} layers {algorithm}: compiling")
            compiled = step.lower(carry["params"], carry["opt"], state, inputs, targets).compile()
            state = jax.tree_util.tree_map(jnp.copy, state)
            stage("compiled")

            def once(c=compiled, carry=carry, state=state):  # the step donates its state
                fresh = jax.tree_util.tree_map(jnp.copy, state)
                p, o, _, metrics = c(carry["params"], carry["opt"], fresh, inputs, targets)
                carry["params"], carry["opt"] = p, o
                return metrics

            seconds = timed(once, 3)
        except Exception as e:  # noqa: BLE001 - report (out of memory, say) and go on
            emit(out, section="train", layers=layers, algorithm=algorithm, error=str(e)[:300])
            continue
        rate = BATCH * settings.update_len / seconds
        flops = 3 * flops_per_token(config, BLOCK)
        emit(out, section="train", layers=layers, algorithm=algorithm, batch=BATCH,
             update_len=settings.update_len, tokens_per_s=round(rate),
             mfu=round(rate * flops / bf16_peak, 4))  # fmt: skip


SECTIONS = {"peak": section_peak, "check": section_check, "score": section_score,
            "decode": section_decode, "train": section_train}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="8k and 32k only")
    parser.add_argument("--tvq-only", action="store_true", help="score: no dense baseline")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and lengths")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="decode, train: only these layer counts (default 4 and 24)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="decode: only these batch sizes (default 1 and 64)",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="score: only these tokens per sequence (multiples of 8,192)",
    )
    args = parser.parse_args()
    if args.smoke:  # checks that the script runs, on any machine, in a minute
        global PAPER, BLOCK, SEGMENT, LENGTHS, BATCH
        PAPER = tvq.ModelConfig(d_model=32, d_k=8, d_v=16, n_head=1, n_code=16, n_layer=1,
                                n_vocab=256, mem_len=32, dtype="bfloat16")  # fmt: skip
        BLOCK, SEGMENT, LENGTHS, BATCH = 32, 256, (256, 512, 1024), 2
    emit(args.out, section="devices", devices=[str(d) for d in jax.devices()])
    SECTIONS[args.section](args.out, args)


if __name__ == "__main__":
    main()
