"""The state cache against an earlier revision, side by side in one run (issue 34's
targets): the working tree's server and CLI against REV's (a temporary git worktree, run
with PYTHONPATH set to it), one after the other, each with an empty tvq cache folder of
its own (so no state and no compiled program is shared; each server is warmed up with
a request of every shape first).

On each server:
  1. a conversation resent in full: `--turns` turns, each adding `--turn-chars`
     characters of Hamlet, the whole history sent each turn (streamed, 16 tokens): the
     time to the first token of each turn; last turn ÷ first;
  1b. the same conversation through a `session` (each turn sends only its new text):
     the time to the first token of each turn, the slowest over the median;
  2. lm-evaluation-harness's multiple choice: four continuations of one context of
     `--context-kb` KB as one request (echo, logprobs 1, max_tokens 0), against the
     context alone (another text of the same length); then the same request again;
  3. 16 concurrent clients with mixed sampler settings (bench/serve_load.py's): tokens/s,
     with both servers up at once and rounds alternating between them (after one
     warm-up round each), the median of the pairs' ratios.
And the CLI: `tvq generate -f` of a `--file-kb` KB text with `-n 1`, twice (the
compilation cache warmed by a run on another text first): second ÷ first.

    python bench/serve_cache.py --against REV [--quick] [--model DIR] [--mixed-rounds 5]
                                [--only conversation session choices generate mixed]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from serve_load import (  # noqa: E402
    HAMLET,
    MIXED,
    Failed,
    level,
    one_request,
    post,
    start_server,
    stop_server,
)

ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = ["conversation", "session", "choices", "generate", "mixed"]
ENDINGS = [" a king.", " a maiden fair.", " nobody at all.", " a whale in the sea."]


def text_of(chars: int, offset: int = 0) -> str:
    """`chars` characters of Hamlet, from `offset` on (repeated as needed)."""
    repeated = HAMLET * (1 + (offset + chars) // len(HAMLET))
    return repeated[offset : offset + chars]


def conversation(port: int, args: argparse.Namespace) -> dict:
    """1: each turn resends the whole history → time to the first token per turn."""
    history, ttfts = "", []
    for turn in range(args.turns):
        history += text_of(args.turn_chars, 7919 * turn)
        result = one_request(port, history, 16, seed=turn, sampler={"temperature": 0})
        ttfts.append(result["ttft"])
        history += f"\n[{turn}]\n"  # the client's own reply marker, as a front end adds
    return {"ttft_first": ttfts[0], "ttft_last": ttfts[-1], "ttfts": ttfts,
            "last_over_first": ttfts[-1] / ttfts[0]}  # fmt: skip


def session_conversation(port: int, args: argparse.Namespace) -> dict:
    """1b: the same conversation through a session (each turn sends only its new text)
    → time to the first token per turn, and the slowest turn over the median."""
    ttfts = []
    for turn in range(args.turns):
        text = ("" if turn == 0 else f"\n[{turn - 1}]\n") + text_of(args.turn_chars, 7919 * turn)
        result = one_request(port, text, 16, seed=turn, sampler={"temperature": 0},
                             extra={"session": f"bench-{os.getpid()}"})  # fmt: skip
        ttfts.append(result["ttft"])
    median = sorted(ttfts)[len(ttfts) // 2]
    return {"ttfts": ttfts, "ttft_median": median, "slowest_over_median": max(ttfts) / median}


def multiple_choice(port: int, args: argparse.Namespace) -> dict:
    """2: four continuations of one context as one request, against the context alone."""
    chars = args.context_kb * 1000
    body = {"max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    _, alone = post(port, body | {"prompt": text_of(chars, 101)})
    context = text_of(chars, 50_021)
    choices = body | {"prompt": [context + e for e in ENDINGS]}
    answer, four = post(port, choices)
    _, again = post(port, choices)
    cached = answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"alone": alone, "four": four, "again": again, "four_over_alone": four / alone,
            "again_over_alone": again / alone, "cached_tokens": cached}  # fmt: skip


def generate_twice(tree: Path, cache: Path, args: argparse.Namespace) -> dict:
    """The CLI: `tvq generate -f` twice on one text, after a run on another."""
    env = dict(os.environ, PYTHONPATH=str(tree), TVQ_CACHE_DIR=str(cache))
    folder = cache / "texts"
    folder.mkdir(parents=True, exist_ok=True)
    book, other = folder / "book.txt", folder / "other.txt"
    book.write_text(text_of(args.file_kb * 1000, 13))
    other.write_text(text_of(args.file_kb * 1000, 40_009))
    model = ["-m", args.model] if args.model else []

    def run(path: Path) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tvqcli", "generate", "-f", str(path), "-n", "1",
                        *model], env=env, cwd=tree, check=True, capture_output=True)  # fmt: skip
        return time.perf_counter() - started

    run(other)  # compiles what both runs need
    first, second = run(book), run(book)
    return {"first": first, "second": second, "second_over_first": second / first}


def measure(name: str, tree: Path, cache: Path, args: argparse.Namespace) -> dict:
    """1, 1b, 2 on the tree's own server, then the CLI's (those in args.only)."""
    env = dict(os.environ, PYTHONPATH=str(tree), TVQ_CACHE_DIR=str(cache))
    if not {"conversation", "session", "choices"} & set(args.only):
        return generate_of(name, tree, cache, args)
    print(f"serve_cache: {name}: starting its server", file=sys.stderr, flush=True)
    process, port = start_server(args.model, "--max-body-bytes", str(64 << 20), cwd=tree,
                                 env=env)  # fmt: skip
    results: dict = {}
    try:
        one_request(port, "Warm up.", 4, seed=0, sampler={"temperature": 0})
        post(port, {"prompt": ["Warm", "up"], "max_tokens": 0, "echo": True, "logprobs": 1})
        work_of = {"conversation": conversation, "session": session_conversation,
                   "choices": multiple_choice}  # fmt: skip
        for key, work in work_of.items():
            if key not in args.only:
                continue
            print(f"serve_cache: {name}: {key}", file=sys.stderr, flush=True)
            try:
                results[key] = work(port, args)
            except (Failed, OSError) as e:
                results[key] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        stop_server(process)
    return results | generate_of(name, tree, cache, args)


def generate_of(name: str, tree: Path, cache: Path, args: argparse.Namespace) -> dict:
    if "generate" not in args.only:
        return {}
    print(f"serve_cache: {name}: tvq generate -f twice", file=sys.stderr, flush=True)
    try:
        return {"generate": generate_twice(tree, cache, args)}
    except subprocess.CalledProcessError as e:
        return {"generate": {"error": e.stderr.decode()[-300:]}}


def mixed_side_by_side(trees: dict[str, Path], caches: dict[str, Path],
                       args: argparse.Namespace) -> dict:  # fmt: skip
    """3: both servers up at once (idle but for the one measured), each warmed by one
    round, then rounds of 16 mixed clients alternating between them, so a slow spell
    of this machine falls on both: tokens/s per round, the ratio of each pair, and the
    median ratio."""
    servers = {}
    try:
        for name, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=str(tree), TVQ_CACHE_DIR=str(caches[name]))
            print(f"serve_cache: {name}: starting its server", file=sys.stderr, flush=True)
            servers[name] = start_server(args.model, cwd=tree, env=env)
        rounds: dict[str, list[float]] = {name: [] for name in trees}
        for i in range(1 + args.mixed_rounds):
            for name, (_, port) in servers.items():
                print(f"serve_cache: {name}: mixed clients, round {i}", file=sys.stderr,
                      flush=True)  # fmt: skip
                result = level(port, 16, 4, 32, MIXED)
                if i:  # round 0 warms up
                    rounds[name].append(result["tokens_per_second"])
    finally:
        for process, _ in servers.values():
            stop_server(process)
    old, new = rounds.values()
    ratios = sorted(n / o for o, n in zip(old, new, strict=True))
    return {
        "rounds": rounds,
        "ratios": ratios,
        "median_ratio": ratios[len(ratios) // 2],
        "tokens_per_second": {name: sorted(r)[len(r) // 2] for name, r in rounds.items()},
    }


def table(old: dict, new: dict, rev: str) -> list[str]:
    rows = [
        ("conversation: last turn's time to first token ÷ first's", "conversation",
         "last_over_first", "≤ 1.5"),
        ("the same through a session: slowest turn's time to first token ÷ median",
         "session", "slowest_over_median", "steady"),
        ("four continuations ÷ the context alone", "choices", "four_over_alone", "≤ 1.3"),
        ("the same request again ÷ the context alone", "choices", "again_over_alone", "≤ 0.2"),
        ("second tvq generate -f ÷ first", "generate", "second_over_first", "≤ 0.1"),
    ]  # fmt: skip
    lines = [f"| measurement | {rev} | working tree | target |", "| --- | ---: | ---: | --- |"]
    for title, key, field, target in rows:
        cells = [f"{r[key][field]:.3g}" if field in r.get(key, {}) else
                 r.get(key, {}).get("error", "–") for r in (old, new)]  # fmt: skip
        lines.append(f"| {title} | {cells[0]} | {cells[1]} | {target} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", required=True, help="the revision to compare with")
    parser.add_argument("--model", help="a model directory (default: the built-in model)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke run")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=MEASUREMENTS,
                        help="run only these measurements")  # fmt: skip
    parser.add_argument("--mixed-rounds", type=int, default=5,
                        help="measured rounds of 16 mixed clients on each server")  # fmt: skip
    args = parser.parse_args()
    args.turns, args.turn_chars = (6, 1500) if args.quick else (24, 1500)
    args.context_kb, args.file_kb = (10, 100) if args.quick else (40, 1000)
    with tempfile.TemporaryDirectory(prefix="serve_cache-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base),
                        args.against], check=True)  # fmt: skip
        trees = {args.against: base, "working tree": ROOT}
        caches = {name: Path(tmp) / f"cache-{i}" for i, name in enumerate(trees)}
        try:
            results = {name: measure(name, tree, caches[name], args)
                       for name, tree in trees.items()}  # fmt: skip
            if "mixed" in args.only:
                mixed = mixed_side_by_side(trees, caches, args)
                results["mixed"] = mixed
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip
    old, new = results[args.against], results["working tree"]
    print(f"# serve_cache --against {args.against}{' --quick' if args.quick else ''}: "
          f"{machine()}; model {args.model or 'built-in'}")  # fmt: skip
    for line in table(old, new, args.against):
        print(line)
    if "mixed" in results:
        m = results["mixed"]
        speeds = " | ".join(f"{m['tokens_per_second'][name]:.0f}" for name in trees)
        print(
            f"| 16 mixed clients, tokens/s (median of {args.mixed_rounds} alternating "
            f"rounds; ratio: median of the pairs') | {speeds} | ≥ 1.5× {args.against}: "
            f"{m['median_ratio']:.2f}× (pairs {', '.join(f'{r:.2f}' for r in m['ratios'])}) |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
