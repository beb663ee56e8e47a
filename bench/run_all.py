"""Runs every benchmark in turn with its defaults; the output is what bench/RESULTS.md
records.

    python bench/run_all.py [--quick]

--quick shortens every run (smaller lengths, fewer positions) for a smoke test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    ["score_length.py"],
    ["vs_dense.py"],
    ["decode_speed.py"],
    ["decode_flat.py", "--positions", "200", "2000", "20000", "100000"],
    ["decode_flat.py", "--positions", "200", "2000", "20000", "100000", "--batch", "8"],
    ["mfu.py"],
    ["score_batch.py"],
    ["startup.py"],
    # 100 MB takes about 80 minutes on 2 cores: python bench/score_memory.py --generate
    ["score_memory.py", "--big-mb", "16"],
    ["scaling.py", "--collectives"],
    ["comm.py"],
    ["parallel.py"],
    # needs the held-out plays (see RESULTS.md section 9): python bench/precision.py FILES
    ["gpu_speed.py", "check", "--smoke"],  # on a GPU: bash bench/gpu.sh
    ["compile_depth.py"],
    ["depth_forms.py"],
    ["data_prep.py", "--sizes-mb", "100"],  # the 1 GB corpora: --sizes-mb 1024
]
QUICK = [
    ["score_length.py", "--lengths", "1024", "8192", "--batches", "2", "--batch-length", "8192"],
    ["vs_dense.py", "--score-lengths", "1024", "--positions", "200", "--batches", "1"],
    ["decode_speed.py", "--tokens", "40", "--batches", "1", "--repeats", "1"],
    ["decode_flat.py", "--positions", "200", "2000", "--repeats", "2"],
    ["mfu.py", "--block-lens", "128", "--tokens", "4096"],
    ["startup.py", "--repeats", "1"],
    ["score_memory.py", "--small-mb", "0.05", "--big-mb", "0.2", "--generate", "10", "100"],
    ["scaling.py", "--devices", "1", "2", "--steps", "1", "--files", "2", "--update-len", "64"],
    ["comm.py"],
    ["parallel.py", "--lengths", "4096", "--repeats", "1"],
    ["gpu_speed.py", "check", "--smoke"],
    ["compile_depth.py", "--layers", "2", "8"],
    ["depth_forms.py", "--rounds", "1", "--tokens", "20", "--score-tokens", "1024"],
    ["data_prep.py", "--quick"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    failed = []
    for command in QUICK if args.quick else FULL:
        print(f"\n$ python bench/{' '.join(command)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]]).returncode:
            failed.append(command[0])
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
