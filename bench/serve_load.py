"""Load on `tvq serve`: 1, 4 and 16 concurrent clients, each sending streamed completion
requests one after another, against two server processes side by side in one run (the
built-in model unless --model): one that decodes concurrent requests together (the
default) and one that serves them one at a time (`--batch-rows 1`). Prints, per server
and level, requests/s, generated tokens/s, p50/p99 latency and p50/p99 time to the first
token, and the batched server's tokens/s over the one-at-a-time server's.

    python bench/serve_load.py [--requests 8] [--max-tokens 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [line for line in (ROOT / "tests" / "data" / "hamlet_head.txt").read_text().splitlines()
           if line.strip()][:32]  # fmt: skip


def start_server(model: str | None, *options: str) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "tvqcli", "serve", "--port", "0", *options]
    if model:
        command += ["-m", model]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in process.stderr:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if found:
            threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
            return process, int(found.group(1))
    raise SystemExit("the server did not start")


def one_request(port: int, prompt: str, max_tokens: int, seed: int) -> dict:
    """A streamed completion → {latency, ttft, tokens}."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            "temperature": 0.8, "top_p": 0.95, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    first, tokens = None, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if first is None and event.get("choices") and event["choices"][0]["text"]:
            first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    connection.close()
    done = time.perf_counter()
    return {"latency": done - started, "ttft": (first or done) - started, "tokens": tokens}


def level(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []

    def client(k: int) -> None:
        for i in range(requests):
            prompt = PROMPTS[(k * requests + i) % len(PROMPTS)]
            results.append(one_request(port, prompt, max_tokens, seed=k * 1000 + i))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)

    def p99(values):
        return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]

    return {
        "clients": clients, "requests": len(results), "seconds": wall,
        "requests_per_second": len(results) / wall,
        "tokens_per_second": sum(r["tokens"] for r in results) / wall,
        "latency_p50": statistics.median(latencies), "latency_p99": p99(latencies),
        "ttft_p50": statistics.median(ttfts), "ttft_p99": p99(ttfts),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    servers = {"batched": start_server(args.model),
               "one at a time": start_server(args.model, "--batch-rows", "1")}  # fmt: skip
    rows = []
    try:
        for _, port in servers.values():  # warm-up: every batch shape the levels use
            for clients in (16, 4, 1):
                level(port, clients, 1, args.max_tokens)
        for clients in (1, 4, 16):  # the two servers alternate, level by level
            for name, (_, port) in servers.items():
                rows.append({"server": name} | level(port, clients, args.requests,
                                                     args.max_tokens))  # fmt: skip
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
    print("| server | clients | requests | req/s | tokens/s | batched ÷ one at a time "
          "| latency p50 / p99 (s) | first token p50 / p99 (s) |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        alone = next(x for x in rows if x["server"] == "one at a time"
                     and x["clients"] == r["clients"])  # fmt: skip
        ratio = r["tokens_per_second"] / alone["tokens_per_second"]
        print(f"| {r['server']} | {r['clients']} | {r['requests']} | "
              f"{r['requests_per_second']:.2f} | {r['tokens_per_second']:.0f} | {ratio:.2f} | "
              f"{r['latency_p50']:.2f} / {r['latency_p99']:.2f} | "
              f"{r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} |")  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
