"""Preparing a corpus: throughput and peak memory of `tvq prepare`, and how soon a run
whose data is cached reaches its first step.

    python bench/data_prep.py [--sizes-mb 100 1024] [--formats text jsonl] [--quick]

Corpora are random words (the sample texts' words and 50,000 made-up ones, Zipf-
distributed, 5-14 words a line) written in a temporary folder: `text` as files of about
400 kB (one document each, like PG-19's books), `jsonl` as one file of 4 kB documents.
For each corpus, side by side in this one invocation:
- single: `tvq prepare --workers 1` (one process does everything);
- parallel: `tvq prepare` (one worker per core); the ratio of their throughputs;
- cached: `tvq prepare` again on the same inputs (finds the dataset, tokenizes nothing);
- first / second run: `tvq train CORPUS --steps 1` twice with an empty data cache (the
  first prepares into it, the second reads it), seconds until metrics.jsonl records
  the first step (the compilation cache is warmed before, on a small corpus).
Every preparation trains its sentencepiece tokenizer (4,096 pieces, on a sample of at
most 16 MiB; with --tokenizer FILE, none is trained, so the ratio is that of tokenizing)
and holds nothing out (--val-fraction 0). Throughput is input MB per second
of wall time; peak memory is the largest sum of the resident memory of the command and
all its descendants, sampled every 50 ms from /proc (the largest single process beside
it; memory-mapped shard pages count for every process that touched them). CPU seconds
(user + system, of the command and every process it waited for) show whether the
parallel run does the single run's work: on a machine whose other load leaves less than
two cores free, its wall time cannot show it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TVQ = [sys.executable, "-m", "tvqcli"]
MODEL = ["--d-model", "64", "--d-k", "16", "--d-v", "32", "--n-head", "2", "--n-code", "16",
         "--n-layer", "1", "--mem-len", "32", "--block-len", "32", "--batch-size", "2",
         "--update-len", "64", "--steps", "1", "--eval-every", "1000",
         "--val-fraction", "0"]  # fmt: skip
POOL_MB = 32  # distinct random text; corpora are windows of it


def word_pool(megabytes: int, seed: int = 0) -> bytes:
    """Lines of random words: the sample texts' words and made-up ones, Zipf-distributed."""
    rng = np.random.default_rng(seed)
    base = sorted(set(re.findall(r"\S+", " ".join(
        p.read_text() for p in sorted((ROOT / "tests" / "data").glob("*.txt"))))))  # fmt: skip
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4,
                     2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.15, 0.1, 0.07])  # fmt: skip
    made_up = ["".join(rng.choice(letters, rng.integers(2, 11), p=freq / freq.sum()))
               for _ in range(50_000)]  # fmt: skip
    vocab = np.array(base + made_up)[rng.permutation(len(base) + len(made_up))]
    zipf = np.arange(1, len(vocab) + 1) ** -1.05
    zipf /= zipf.sum()
    out, size = [], 0
    while size < megabytes << 20:
        counts = rng.integers(5, 15, 20_000)
        words = vocab[rng.choice(len(vocab), counts.sum(), p=zipf)]
        for line in np.split(words, np.cumsum(counts)[:-1]):
            text = " ".join(line) + "\n"
            out.append(text)
            size += len(text)
    return "".join(out).encode()


def make_corpus(folder: Path, kind: str, megabytes: int, pool: bytes, seed: int = 1) -> Path:
    """`megabytes` MiB of windows of `pool` (cut after a newline) as text files or JSONL."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    target, written, n = megabytes << 20, 0, 0
    piece = 400_000 if kind == "text" else 4_000
    jsonl = open(folder / "corpus.jsonl", "w") if kind == "jsonl" else None  # noqa: SIM115
    while written < target:
        start = pool.index(b"\n", int(rng.integers(0, len(pool) - 2 * piece))) + 1
        end = pool.index(b"\n", start + piece) + 1
        chunk = pool[start:end]
        if jsonl is None:
            (folder / f"book-{n:05d}.txt").write_bytes(chunk)
        else:
            jsonl.write(json.dumps({"text": chunk.decode()}) + "\n")
        written, n = written + len(chunk), n + 1
    if jsonl is not None:
        jsonl.close()
    return folder


def tree_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of `pid` and all its descendants (from /proc) → (sum, largest)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))  # ppid
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss pages
    total, largest, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        total, largest = total + rss.get(p, 0), max(largest, rss.get(p, 0))
        todo += children.get(p, [])
    return total, largest


def run(cmd: list[str], env: dict, first_step: Path | None = None) -> dict:
    """Runs cmd → {seconds, peak_mb (process tree), largest_mb, first_step_s, stderr}."""
    started, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    peak = largest = 0
    first = None
    while proc.poll() is None:
        total, one = tree_rss(proc.pid)
        peak, largest = max(peak, total), max(largest, one)
        if first is None and first_step is not None and first_step.is_file():
            if first_step.read_text().strip():
                first = time.perf_counter() - started
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tree: each parent waited
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err}")
    phases = {m[0]: float(m[1]) for m in re.findall(r"^(\w+): .* in ([\d.]+) s$", err, re.M)}
    return dict(seconds=seconds, peak_mb=peak / 2**20, largest_mb=largest / 2**20,
                first_step_s=first, cpu_s=cpu, phases=phases, stderr=err)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1024])
    parser.add_argument("--formats", nargs="+", default=["text", "jsonl"])
    parser.add_argument("--quick", action="store_true", help="20 MB, text only")
    parser.add_argument("--tmp", default=None, help="folder for the corpora (default: /tmp)")
    parser.add_argument("--tokenizer", default=None,
                        help="a sentencepiece .model for every run (no tokenizer training: "
                             "the ratio is then that of tokenizing)")  # fmt: skip
    args = parser.parse_args()
    sizes, formats = ([20], ["text"]) if args.quick else (args.sizes_mb, args.formats)
    print(f"# data_prep: {machine()}; {os.cpu_count()} cores seen, "
          f"{len(os.sched_getaffinity(0))} usable")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="tvq-data-prep-", dir=args.tmp))
    env = dict(os.environ, TVQ_CACHE_DIR=str(tmp / "cache"), PYTHONPATH=str(ROOT))
    rows = []
    try:
        pool = word_pool(POOL_MB)
        warmed = False
        for kind in formats:
            for mb in sizes:
                corpus = make_corpus(tmp / f"{kind}-{mb}", kind, mb, pool)
                data = [str(corpus), "--val-fraction", "0"]
                given = ["--tokenizer", args.tokenizer] if args.tokenizer else []
                data += given
                single = run([*TVQ, "prepare", *data, "--out", str(tmp / "d1"), "--workers",
                              "1"], env)  # fmt: skip
                if not warmed:  # the compilation cache, for both train runs below
                    spm = args.tokenizer or str(tmp / "d1" / "tokenizer.model")
                    run([*TVQ, "train", str(ROOT / "tests" / "data"), "--tokenizer", spm,
                         "--out", str(tmp / "warm"), *MODEL], env)  # fmt: skip
                    warmed = True
                parallel = run([*TVQ, "prepare", *data, "--out", str(tmp / "d2")], env)
                cached = run([*TVQ, "prepare", *data, "--out", str(tmp / "d2")], env)
                first = run([*TVQ, "train", str(corpus), *given, "--out", str(tmp / "m1"),
                             *MODEL], env, tmp / "m1" / "train" / "metrics.jsonl")  # fmt: skip
                second = run([*TVQ, "train", str(corpus), *given, "--out", str(tmp / "m2"),
                              *MODEL], env, tmp / "m2" / "train" / "metrics.jsonl")  # fmt: skip
                assert "nothing to do" in cached["stderr"] and "nothing to do" in second["stderr"]
                rows.append((kind, mb, single, parallel, cached, first, second))
                for name in ("d1", "d2", "m1", "m2", "cache/data"):
                    shutil.rmtree(tmp / name, ignore_errors=True)
                shutil.rmtree(corpus)
                print_row(*rows[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


HEADER = ("| corpus | MB | 1 process: s, MB/s | all cores: s, MB/s | ratio (tokenize phase) | "
          "peak memory, tree (largest process) MB | cached prepare s | train: first step, "
          "first / second run s | second ÷ preparation |\n| --- | ---: | ---: | ---: | ---: | "
          "---: | ---: | ---: | ---: |")  # fmt: skip
_printed = False


def print_row(kind, mb, single, parallel, cached, first, second) -> None:
    global _printed
    if not _printed:
        print(HEADER)
        _printed = True
    size = mb * 2**20 / 1e6
    ratio = single["seconds"] / parallel["seconds"]
    phase = single["phases"].get("tokenize", 0) / max(parallel["phases"].get("tokenize", 0), 1e-9)
    print(f"| {kind} | {mb} | {single['seconds']:.1f}, {size / single['seconds']:.1f} | "
          f"{parallel['seconds']:.1f}, {size / parallel['seconds']:.1f} | {ratio:.2f} "
          f"({phase:.2f}) | {parallel['peak_mb']:.0f} ({parallel['largest_mb']:.0f}); 1 process "
          f"{single['peak_mb']:.0f} | {cached['seconds']:.2f} | {first['first_step_s']:.1f} / "
          f"{second['first_step_s']:.1f} | {second['first_step_s'] / parallel['seconds']:.1%} |",
          flush=True)  # fmt: skip
    for name, r in (("1 process", single), ("all cores", parallel), ("first run", first)):
        print(
            f"#   {kind} {mb} MB {name}: CPU {r['cpu_s']:.1f} s in {r['seconds']:.1f} s "
            f"(the tree's), phases (s): {r['phases']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
