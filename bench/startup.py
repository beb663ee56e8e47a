"""Time to first token of `tvq generate "..." -n 1`, cold (empty compilation cache) and warm;
with --score FILE also the whole time of `tvq score FILE`, cold and warm.

python bench/startup.py [--model DIR] [--repeats 3] [--score tests/data/hamlet_head.txt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def first_byte(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    proc.stdout.read()
    proc.wait()
    return elapsed


def whole(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--score", default=None, help="also time `tvq score FILE`")
    args = parser.parse_args()
    model = ["-m", args.model] if args.model else []
    cmd = [sys.executable, "-m", "tvqcli", "generate", "To be, or not", "-n", "1",
           "--seed", "1", "-t", "0", *model]  # fmt: skip
    print(f"# startup: {machine()}")
    score = [sys.executable, "-m", "tvqcli", "score", args.score, *model] if args.score else None
    cold, warm, score_cold, score_warm = [], [], [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TVQ_CACHE_DIR=cache)
            cold.append(first_byte(cmd, env))
            warm.append(first_byte(cmd, env))
            if score:
                score_cold.append(whole(score, env))
                score_warm.append(whole(score, env))
    print(f"cold time to first token: median {statistics.median(cold):.2f} s  {cold}")
    print(f"warm time to first token: median {statistics.median(warm):.2f} s  {warm}")
    if score:
        print(f"cold tvq score {args.score}: median {statistics.median(score_cold):.2f} s")
        print(f"warm tvq score {args.score}: median {statistics.median(score_warm):.2f} s")


if __name__ == "__main__":
    main()
