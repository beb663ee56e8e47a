"""How well `tvq train --dry-run` predicts the run (issue 36's target: memory and time per
step within 20% of what the run then measures), side by side in one run.

On a prepared corpus (the repository's test texts, bytes, unless --data), for a recipe
(recipes/builtin.toml unless --config) and a few sizes: the dry run's plan, then the
same command without --dry-run for --steps steps: the run's compiled-step memory
(`tvq train -v`, XLA's analysis) and its median seconds per step from metrics.jsonl
(tokens per step ÷ tokens/s, the first step, which compiles, left out).

    python bench/dry_run.py [--steps 12] [--config recipes/builtin.toml] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = [
    ("batch 2 × 256", ["--batch-size", "2", "--update-len", "256", "--block-len", "64"]),
    ("batch 4 × 512", ["--batch-size", "4", "--update-len", "512", "--block-len", "128"]),
]


def tvq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvqcli", *args], capture_output=True,
                          text=True, cwd=ROOT, check=True)  # fmt: skip


def measure(data: Path, config: str, size: list[str], steps: int, out: Path) -> dict:
    common = ["train", str(data), "--config", config, *size, "--steps", str(steps),
              "--eval-every", str(10 * steps), "--out", str(out)]  # fmt: skip
    plan = dict(line.split("  ", 1) for line in tvq(*common, "--dry-run").stdout.splitlines()
                if "  " in line)  # fmt: skip
    planned_step = float(plan["time per step"].split()[0])
    planned_memory = plan["memory per device"].split("(")[0].strip()
    run = tvq(*common, "-v")
    memory = re.search(r"step memory: ([0-9.]+ MiB) per device", run.stderr)
    records = [json.loads(line) for line in (out / "train" / "metrics.jsonl").open()
               if '"loss"' in line]  # fmt: skip
    tokens_per_step = int(plan["tokens per step"].replace(",", ""))
    per_step = statistics.median(tokens_per_step / r["tokens_per_second"] for r in records[1:])
    return {"planned_step": planned_step, "step": per_step, "planned_memory": planned_memory,
            "memory": memory.group(1) if memory else run.stderr[-300:]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--config", default="recipes/builtin.toml")
    parser.add_argument("--data", type=Path, help="a prepared corpus (default: tests/data)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dry_run-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            tvq("prepare", "tests/data", "--bytes", "--val-fraction", "0.2", "--out", str(data))
        rows = [(name, measure(data, args.config, size, args.steps, Path(tmp) / f"m{i}"))
                for i, (name, size) in enumerate(SIZES)]  # fmt: skip
    print(f"# bench/dry_run.py --steps {args.steps} --config {args.config}: {machine()}")
    print("| size | planned s/step | run s/step | ratio | planned memory | run memory |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows:
        print(
            f"| {name} | {r['planned_step']:.3f} | {r['step']:.3f} | "
            f"{r['step'] / r['planned_step']:.2f} | {r['planned_memory']} | {r['memory']} |"
        )


if __name__ == "__main__":
    main()
