"""Where a decoding step's time goes at batch 1, and the floor the machine puts under it.

    python bench/decode_profile.py [--model DIR] [--tokens 200] [--repeats 5]

Three measurements in one run:
1. `step`: milliseconds per token of the compiled sampling loop (the CLI's default
   sampler, temperature 0.8, top-p 0.95), untraced, median over repeats.
2. `profile`: the same loop traced with jax.profiler (XLA:CPU's per-thunk trace events
   on): how many thunks (XLA's units of work: a fused kernel, a matrix product, a copy)
   one step runs, and the share of the traced time spent in matrix products, in the
   sampler's nucleus search and in everything else. Tracing adds a microsecond or two
   to every thunk, so the shares overweight the many small ones (time the nucleus
   search alone for its true cost).
3. `floor`: a compiled loop that only streams the bytes one token must read (every
   matrix the step multiplies by, the parameters and the per-sublayer state at the
   model's shapes) through chained matrix-vector products, nothing else: the time no
   rearrangement of the other work can go below. Beside it, the machine's streaming
   rate for that many bytes and for 2 MB (which stays in cache), and the same floor with
   the parameters stored in bfloat16 and widened to float32 inside the loop (what
   storing the model in bfloat16 would save here: half the parameter bytes, if XLA:CPU
   fused the widening into the products).
"""

from __future__ import annotations

import os

# Per-thunk trace events; must be in XLA_FLAGS before jax starts.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import argparse  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import machine  # noqa: E402

import tvq  # noqa: E402
from tvq.decoding import generate  # noqa: E402
from tvq.nn.layout import QUANTIZER, sublayer_params  # noqa: E402
from tvq.text.sampling import Sampler  # noqa: E402

SAMPLER = Sampler(temperature=0.8, top_p=0.95)


def step_ms(model, prompt, tokens: int, repeats: int) -> float:
    times = []
    for r in range(repeats + 1):
        result = generate(model, prompt, max_tokens=tokens, sampler=SAMPLER, seed=r)
        if r:  # round 0 compiles
            times.append(result.generate_seconds / result.generated_tokens)
    return 1e3 * statistics.median(times)


def traced_shares(model, prompt, tokens: int) -> dict[str, float]:
    """Thunks per step and the shares of traced thunk time, from a perfetto trace."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        result = generate(model, prompt, max_tokens=tokens, sampler=SAMPLER, seed=1)
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    thunks = [
        e for e in events
        if e.get("ph") == "X" and not e["name"].startswith(("$", "end:", "Threadpool"))
        and "Execute" not in e["name"] and "Pjit" not in e["name"]
    ]  # fmt: skip
    # A while loop run once per step is the sampler's nucleus search (the step's only
    # nested loop); its event spans its own thunks, which are not counted again.
    loops = collections.Counter(e["name"] for e in thunks if e["name"].startswith("while"))
    per_step = {name for name, count in loops.items() if count >= tokens // 2}
    spans = collections.defaultdict(list)  # thread → [(start, end)], sorted
    for e in sorted(thunks, key=lambda e: e["ts"]):
        if e["name"] in per_step:
            spans[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    kinds = collections.Counter()
    for e in thunks:
        mine = spans[e["tid"]]
        at = bisect.bisect_left(mine, (e["ts"],)) - 1
        if e["name"] in per_step:
            kinds["nucleus search"] += e["dur"]
        elif at < 0 or e["ts"] >= mine[at][1]:
            name = re.sub(r"[.\d]+$", "", e["name"])
            dot = name.startswith("dot") or name.endswith("dot_fusion")
            kinds["matrix products" if dot else "other thunks"] += e["dur"]
    total = sum(kinds.values())
    shares = {k: v / total for k, v in kinds.items()}
    shares["thunks per step"] = len(thunks) / result.generated_tokens
    return shares


def step_arrays(model, param_dtype: str = "float32") -> list[jax.Array]:
    """What one token's step multiplies by: the output embedding, and per sublayer its
    q, kvg and res kernels, its codebook, its aggregate means [H, S, V] and its ring of
    values [H, M + 1, V] (state arrays at their decoding shapes, batch 1, float32; the
    parameters in param_dtype)."""
    config = model.config
    arrays = [jnp.asarray(model.params["token_embedder"]["embs"], param_dtype)]
    for sublayer in sublayer_params(model.params):
        weights = [sublayer[p]["kernel"] for p in ("q_proj", "kvg_proj", "res_proj")]
        weights.append(sublayer[QUANTIZER]["c_sum"])
        arrays += [jnp.asarray(w, param_dtype) for w in weights]
        h, s, v, m = config.n_head, config.n_code, config.d_v, config.mem_len
        arrays.append(jnp.full([h, s, v], 1e-3, jnp.float32))
        arrays.append(jnp.full([h, m + 1, v], 1e-3, jnp.float32))
    return arrays


def stream_ms(arrays: list[jax.Array], steps: int = 200, repeats: int = 7) -> float:
    """ms per pass of chained matrix-vector products over every array (in float32: an
    array stored narrower is widened inside the loop, as a model would)."""

    def one_pass(_, x):
        for a in arrays:
            flat = a.reshape(-1, a.shape[-1]).astype(jnp.float32)
            x = x + 1e-6 * jnp.sum(x[: flat.shape[0]] @ flat)
        return x

    width = max(a.reshape(-1, a.shape[-1]).shape[0] for a in arrays)
    run = jax.jit(lambda x: jax.lax.fori_loop(0, steps, one_pass, x))
    x = jnp.ones([width], jnp.float32)
    run(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = tvq.load(args.model)
    prompt = model.tokenizer.encode("To be, or not to be, that is the question:")
    print(f"# decode_profile: {machine()}; batch 1, CLI default sampler, {args.tokens} tokens")
    arrays = step_arrays(model)
    mbytes = sum(a.nbytes for a in arrays) / 2**20
    narrow = step_arrays(model, "bfloat16")
    small = [jnp.full([256, 2048], 1e-3, jnp.float32)]  # 2 MB: stays in cache
    step = step_ms(model, prompt, args.tokens, args.repeats)
    floor = stream_ms(arrays)
    narrow_ms = stream_ms(narrow)
    small_ms = stream_ms(small)
    shares = traced_shares(model, prompt, args.tokens)
    print(f"step, untraced: {step:.3f} ms/token ({1e3 / step:.0f} tokens/s)")
    print(f"thunks per step: {shares.pop('thunks per step'):.0f}")
    for kind, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {kind}: {100 * share:.1f}% of traced thunk time")
    print(f"floor: {mbytes:.1f} MB read per token, streamed by matrix-vector products alone "
          f"in {floor:.3f} ms ({mbytes / 1024 / floor * 1e3:.1f} GB/s; "
          f"{1e3 / floor:.0f} tokens/s at most)")  # fmt: skip
    print(f"with the parameters stored in bfloat16 ({sum(a.nbytes for a in narrow) / 2**20:.1f} "
          f"MB, widened to float32 in the loop): {narrow_ms:.3f} ms "
          f"({narrow_ms / floor:.2f}× the float32 floor)")  # fmt: skip
    print(f"cache: 2 MB streamed the same way at {2 / 1024 / small_ms * 1e3:.1f} GB/s")
    print(f"step / floor: {step / floor:.2f}")


if __name__ == "__main__":
    main()
