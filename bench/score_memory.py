"""Peak memory of `tvq score` and `tvq generate` at two lengths: it must not grow.

    python bench/score_memory.py [--model DIR] [--small-mb 1] [--big-mb 100]
                                 [--generate 1000 100000] [--algorithm parallel]

Each file is scored by a separate `tvq score` process, and each generation is a
separate `tvq generate -n N --ignore-eos` process (the token count printed is read from
its output); peak RSS comes from wait4(). All run in this
one invocation and the ratios large/small are printed (--big-mb 0 or --generate with
no values skips that part).
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

ROOT = Path(__file__).resolve().parent.parent
SEED_TEXT = ROOT / "tests" / "data" / "macbeth_head.txt"


def make_file(path: Path, megabytes: float) -> None:
    unit = SEED_TEXT.read_bytes()
    target = int(megabytes * 2**20)
    with path.open("wb") as f:
        written = 0
        while written < target:
            piece = unit[: target - written]
            f.write(piece)
            written += len(piece)


def peak_rss(args: list[str], stdout=subprocess.DEVNULL) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=stdout, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(args)} failed: {proc.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # MiB, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--small-mb", type=float, default=1)
    parser.add_argument("--big-mb", type=float, default=100)
    parser.add_argument("--generate", type=int, nargs="*", default=[1000, 100000])
    parser.add_argument("--algorithm", choices=["serial", "parallel"], default=None,
                        help="tvq score --algorithm (default: the device's)")  # fmt: skip
    args = parser.parse_args()
    model = ["-m", args.model] if args.model else []
    print(f"# score_memory: {machine()}; algorithm {args.algorithm or 'default'}")
    print("file_MiB  peak_RSS_MiB  seconds  ratio")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for mb in (args.small_mb, args.big_mb) if args.big_mb else ():
            path = Path(tmp) / f"{mb}MB.txt"
            make_file(path, mb)
            cmd = [sys.executable, "-m", "tvqcli", "score", str(path), *model, "--format", "json"]
            cmd += ["--algorithm", args.algorithm] if args.algorithm else []
            rss, seconds = peak_rss(cmd)
            base = base or rss
            print(f"{mb:>8}  {rss:12.1f}  {seconds:7.1f}  {rss / base:5.3f}")
            path.unlink()
    if args.generate:
        print("tokens_generated  peak_RSS_MiB  seconds  ratio")
        base = None
        peak_rss([sys.executable, "-m", "tvqcli", "generate", "-n", "1", *model])  # compile
        for n in args.generate:
            cmd = [sys.executable, "-m", "tvqcli", "generate", "-n", str(n), "--seed", "1",
                   "--ignore-eos", "--json", *model]  # fmt: skip
            with tempfile.TemporaryFile() as out:
                rss, seconds = peak_rss(cmd, stdout=out)
                out.seek(0)
                generated = len(json.loads(out.read())["tokens"])  # all n, past any EOS
            base = base or rss
            print(f"{generated:>16}  {rss:12.1f}  {seconds:7.1f}  {rss / base:5.3f}", flush=True)


if __name__ == "__main__":
    main()
