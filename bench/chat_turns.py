"""Latency of one turn of a conversation at turn 10 and at turn 1,000 (`tvq chat`), side
by side with their ratio: the attention state has a fixed size, so the target is equal
within noise.

    python bench/chat_turns.py [--model DIR] [--tokens 32] [--filler-tokens 4]
                               [--late-turn 1000] [--repeats 7] [--dtype bfloat16] [--quick]

A turn is what `tvq chat` runs for a typed line, through the library as it does: one
`tvq.generate` call fed only the line's tokens after the state so far (`context=`), then
the state after its last sampled token (`Generation.context`, waited for on the device);
only the printing is left out. The typed lines alternate "ROMEO.\\n" and "JULIET.\\n".

How turn 1,000 is reached (one real conversation, each turn continuing the state of the
one before): turns 1-9 as the measured turn (the line, then --tokens sampled tokens);
turns 10-999 the same way but with --filler-tokens sampled tokens each (one
`tvq.generate` call per turn; a short reply gets there sooner, and the state only
depends on the tokens fed, not on how many calls fed them). The turn-10 state is that of
turns 1-9 of this same conversation. Every turn ignores end-of-document tokens, so each
samples exactly as many tokens as it asks for.

Measured: from the state before turn 10 and the state before turn `--late-turn` (both
kept), the same turn (the line "ROMEO.\\n", which turns 10 and 1,000 type; seed 0;
exactly --tokens sampled tokens) is run --repeats times, alternating turn 10 and the
late turn so that drift of the machine hits both alike, after one untimed round that
compiles; each number is the median. Time to the first token is
Generation.prompt_seconds (the line fed and the first token sampled).
--quick: the late turn is 100, 3 repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jax  # noqa: E402
from common import machine  # noqa: E402

import tvq  # noqa: E402

LINES = ("ROMEO.\n", "JULIET.\n")  # turn k types LINES[k % 2]; measured turns LINES[0]
SAMPLER = tvq.Sampler(temperature=0.8, top_p=0.95)  # the CLI's default


def turn(model, context, line: str, tokens: int, seed: int):
    """One turn of `tvq chat` → (context after it, seconds, seconds to first token)."""
    started = time.perf_counter()
    result = tvq.generate(model, line, max_tokens=tokens, sampler=SAMPLER, seed=seed,
                          context=context, ignore_eos=True)  # fmt: skip
    context = result.context
    jax.block_until_ready(context.state)
    return context, time.perf_counter() - started, result.prompt_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=32, help="sampled tokens per measured turn")
    parser.add_argument("--filler-tokens", type=int, default=4,
                        help="sampled tokens per turn 10 to late-turn - 1")  # fmt: skip
    parser.add_argument("--late-turn", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="late turn 100, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.late_turn, args.repeats = 100, 3
    model = tvq.load(args.model)
    if args.dtype:
        model = model.with_dtype(args.dtype)
    print(f"# chat_turns: {machine()}; {args.model or 'built-in model'}, "
          f"{args.dtype or 'float32'}; a measured turn: {LINES[0]!r} fed, {args.tokens} "
          f"tokens sampled")  # fmt: skip

    started = time.perf_counter()
    context = None
    states = {}
    for k in range(1, args.late_turn):
        if k == 10:
            states[10] = context
        tokens = args.tokens if k < 10 else args.filler_tokens
        context, _, _ = turn(model, context, LINES[k % 2], tokens, seed=k)
    states[args.late_turn] = context
    reach = time.perf_counter() - started
    print(f"# reached turn {args.late_turn} in {reach:.1f} s "
          f"({states[args.late_turn].tokens} tokens in the state; "
          f"{states[10].tokens} before turn 10)")  # fmt: skip

    times = {k: [] for k in states}
    firsts = {k: [] for k in states}
    for r in range(args.repeats + 1):
        for k, state in states.items():
            _, seconds, first = turn(model, state, LINES[0], args.tokens, seed=0)
            if r:  # round 0 compiles and warms up
                times[k].append(seconds)
                firsts[k].append(first)
    early, late = 10, args.late_turn
    print(f"{'':22}{'turn 10':>12}{f'turn {late}':>12}{'ratio':>8}")
    for name, values in (("whole turn (ms)", times), ("first token (ms)", firsts)):
        a, b = statistics.median(values[early]), statistics.median(values[late])
        print(f"{name:22}{a * 1e3:12.1f}{b * 1e3:12.1f}{b / a:8.3f}")
    spread = {k: (min(v) * 1e3, max(v) * 1e3) for k, v in times.items()}
    print(f"# whole turn, min-max ms: turn 10 {spread[early][0]:.1f}-{spread[early][1]:.1f}; "
          f"turn {late} {spread[late][0]:.1f}-{spread[late][1]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
