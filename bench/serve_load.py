"""Load on `tvq serve`, in one of two modes.

Without --against: 1, 4 and 16 concurrent clients, each sending streamed completion
requests one after another, against two server processes side by side in one run (the
built-in model unless --model): one that decodes concurrent requests together (the
default) and one that serves them one at a time (`--batch-rows 1`). Prints, per server
and level, requests/s, generated tokens/s, p50/p99 latency and p50/p99 time to the first
token, and the batched server's tokens/s over the one-at-a-time server's.

With --against REV: the working tree's server against the server of an earlier revision
REV (checked out into a temporary git worktree, run with `python -m tvqcli serve` and
PYTHONPATH set to it), one server after the other (never both under load at once), each
with an empty compilation cache of its own unless --shared-cache. On each server, in this
order:
  1. sampler settings never used before on that (warm) server: the first request with
     each and the same request repeated (median of 3), first ÷ repeated; a field the
     server rejects (400) or ignores (answers 200 to a nonsense value) is skipped;
  2. an 8-token request sent 1 s after a request whose long prompt (token ids) is being
     read: its latency, the long one's total time (the pair twice: the first may
     compile, the second is the target's), and the time of one prefill chunk (a request
     whose prompt is one chunk of the working tree's score_ids, max_tokens 1);
  3. concurrent streaming clients, each cycling through a few sampler settings: generated
     tokens/s (after one identical warm-up round; the median of three rounds);
  4. GET /health every 20 ms while a large text prompt is read and tokenized (from the
     request's start until its streamed answer begins; the request is then dropped):
     p50 and max latency.
Prints a table of both servers' numbers, the ratio working tree ÷ REV and the targets.

    python bench/serve_load.py [--requests 8] [--max-tokens 64] [--model DIR]
    python bench/serve_load.py --against REV [--quick] [--shared-cache] [--model DIR]
                               [--only settings long mixed health]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HAMLET = (ROOT / "tests" / "data" / "hamlet_head.txt").read_text()
PROMPTS = [line for line in HAMLET.splitlines() if line.strip()][:32]
BASE = {"temperature": 0.8, "top_p": 0.95}  # the CLI's default sampler, the warm-up's
# settings never used before on the server (each on top of BASE): (name, fields, nonsense)
NEW_SETTINGS = [
    ("temperature 0", {"temperature": 0}),
    ("top_p 0.5", {"top_p": 0.5}),
    ("top_k 7", {"top_k": 7}),
    ("min_p 0.1", {"min_p": 0.1}),
    ("logprobs 5", {"logprobs": 5}),
    ("n 3", {"n": 3}),
    ("frequency_penalty 0.5", {"frequency_penalty": 0.5}),
]
MIXED = [  # what the concurrent clients cycle through
    {"temperature": 0.8, "top_p": 0.95},
    {"temperature": 0.7, "top_k": 40},
    {"temperature": 1.0, "top_p": 0.9, "top_k": 20},
    {"temperature": 0.6, "min_p": 0.05},
]
SIZES = {  # --against: full, and --quick
    False: {"long_tokens": 120_000, "body_bytes": 15 << 20, "clients": 16},
    True: {"long_tokens": 30_000, "body_bytes": 2 << 20, "clients": 4},
}
STOP_WAIT = 30  # seconds a server may take to stop after SIGTERM before it is killed


class Failed(Exception):
    """A measurement that could not be made: one line says why."""


class Rejected(Failed):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def _error_message(data: bytes) -> str:
    try:
        return json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace")


def start_server(model: str | None, *options: str, cwd: Path = ROOT, env: dict | None = None,
                 timeout: float = 900) -> tuple[subprocess.Popen, int]:  # fmt: skip
    """Starts `python -m tvqcli serve` on a free port → (process, port), once it says its
    URL; Failed (with the end of its stderr) if it exits or stays silent for `timeout` s."""
    command = [sys.executable, "-m", "tvqcli", "serve", "--port", "0", *options]
    if model:
        command += ["-m", model]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    tail: collections.deque[str] = collections.deque(maxlen=12)
    found: list[int] = []
    ready = threading.Event()

    def read() -> None:  # the whole stderr, so the server never blocks on a full pipe
        for line in process.stderr:
            tail.append(line.rstrip())
            match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if match and not found:
                found.append(int(match.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    process.stderr_tail = tail  # type: ignore[attr-defined]  (shown if it dies later)
    ready.wait(timeout)
    if not found:
        stop_server(process)
        said = " | ".join(tail) or "nothing on stderr"
        raise Failed(f"the server did not start (exit {process.returncode}): {said}")
    return process, found[0]


def stop_server(process: subprocess.Popen, wait: float = STOP_WAIT) -> str:
    """SIGTERM, then SIGKILL after `wait` s; → a note when it had to be killed."""
    if process.poll() is not None:
        return ""
    process.terminate()
    try:
        process.wait(timeout=wait)
        return ""
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return f"did not stop within {wait:.0f} s of SIGTERM: killed"


def one_request(port: int, prompt: str, max_tokens: int, seed: int,
                sampler: dict | None = None, extra: dict | None = None) -> dict:  # fmt: skip
    """A streamed completion → {latency, ttft, tokens}; sampler: BASE unless given;
    extra: more fields of the request (a session)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "stream": True,
            **(BASE if sampler is None else sampler), "ignore_eos": True,
            "stream_options": {"include_usage": True}, **(extra or {})}  # fmt: skip
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    if response.status != 200:
        raise Rejected(response.status, _error_message(response.read()))
    first, tokens = None, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise Failed(f"streamed error: {event['error'].get('message')}")
        if first is None and event.get("choices") and event["choices"][0]["text"]:
            first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    connection.close()
    done = time.perf_counter()
    return {"latency": done - started, "ttft": (first or done) - started, "tokens": tokens}


def post(port: int, body: dict, timeout: float = 900) -> tuple[dict, float]:
    """A non-streamed completion → (its JSON, seconds); Rejected unless 200."""
    data = json.dumps(body)
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/completions", data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    seconds = time.perf_counter() - started
    if response.status != 200:
        raise Rejected(response.status, _error_message(answer))
    return json.loads(answer), seconds


def level(port: int, clients: int, requests: int, max_tokens: int,
          samplers: list[dict] | None = None) -> dict:  # fmt: skip
    """`clients` threads, each sending `requests` streamed requests one after another
    (client k's i-th with samplers[(k + i) % len(samplers)] when given)."""
    results: list[dict] = []
    errors: list[str] = []

    def client(k: int) -> None:
        try:
            for i in range(requests):
                prompt = PROMPTS[(k * requests + i) % len(PROMPTS)]
                sampler = samplers[(k + i) % len(samplers)] if samplers else None
                results.append(one_request(port, prompt, max_tokens, seed=k * 1000 + i,
                                           sampler=sampler))  # fmt: skip
        except Exception as e:  # noqa: BLE001  (said once, after the others are done)
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise Failed(f"{len(errors)} of {clients} clients failed, first: {errors[0]}")
    latencies = sorted(r["latency"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)

    def p99(values):
        return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]

    return {
        "clients": clients, "requests": len(results), "seconds": wall,
        "requests_per_second": len(results) / wall,
        "tokens_per_second": sum(r["tokens"] for r in results) / wall,
        "tokens": sum(r["tokens"] for r in results),
        "latency_p50": statistics.median(latencies), "latency_p99": p99(latencies),
        "ttft_p50": statistics.median(ttfts), "ttft_p99": p99(ttfts),
    }  # fmt: skip


def batched_vs_one_at_a_time(args: argparse.Namespace) -> None:
    """The default mode: the module docstring's first paragraph."""
    servers = {}
    rows = []
    try:
        servers["batched"] = start_server(args.model)
        servers["one at a time"] = start_server(args.model, "--batch-rows", "1")
        for _, port in servers.values():  # warm-up: every batch shape the levels use
            for clients in (16, 4, 1):
                level(port, clients, 1, args.max_tokens)
        for clients in (1, 4, 16):  # the two servers alternate, level by level
            for name, (_, port) in servers.items():
                rows.append({"server": name} | level(port, clients, args.requests,
                                                     args.max_tokens))  # fmt: skip
    except Failed as e:
        raise SystemExit(f"serve_load: {e}") from None
    finally:
        for process, _ in servers.values():
            stop_server(process, wait=60)
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


# --- --against REV: the four measurements, each on one running server -----------------

QUESTION = "To be, or not to be, that is the question:"


def sampler_settings(port: int, sizes: dict, facts: dict) -> dict:
    """1: each new setting's first request ÷ the same request repeated (median of 3)."""
    base = {"prompt": QUESTION, "max_tokens": 16, "seed": 1, "ignore_eos": True, **BASE}
    post(port, base)  # the plain warm-up
    settings, skipped = {}, {}
    for name, fields in NEW_SETTINGS:
        field = next(iter(fields))
        try:  # a server that ignores the field answers 200 to a value of the wrong type
            post(port, base | {field: "?"})
            skipped[name] = f"ignored ('{field}' of the wrong type answered 200)"
            continue
        except Rejected as e:
            if e.status != 400:
                raise
        try:
            _, first = post(port, base | fields)
        except Rejected as e:
            if e.status != 400:
                raise
            skipped[name] = f"rejected ({e})"
            continue
        repeated = statistics.median(post(port, base | fields)[1] for _ in range(3))
        settings[name] = {"first": first, "repeated": repeated, "ratio": first / repeated}
    if not settings:
        raise Failed(f"every setting was skipped: {skipped}")
    overall = (sum(s["first"] for s in settings.values())
               / sum(s["repeated"] for s in settings.values()))  # fmt: skip
    return {"settings": settings, "skipped": skipped, "overall": overall}


def long_prompt(port: int, sizes: dict, facts: dict) -> dict:
    """2: an 8-token request sent 1 s after a long prompt's request (token ids), twice:
    the first pair, and again (the target's)."""
    ids, chunk = facts["ids"], facts["chunk"]
    length = sizes["long_tokens"]

    def prompt_of(n: int) -> list[int]:
        return (ids * (n // len(ids) + 1))[:n]

    base = {"seed": 2, "ignore_eos": True, **BASE}
    short = base | {"prompt": QUESTION, "max_tokens": 8}
    # warm-up: the chunk and the last piece the long prompt's reading compiles, the short
    post(port, base | {"prompt": prompt_of(2 * chunk + length % chunk), "max_tokens": 1})
    post(port, short)
    one_chunk = base | {"prompt": prompt_of(chunk), "max_tokens": 1}
    post(port, one_chunk)
    chunk_seconds = statistics.median(post(port, one_chunk)[1] for _ in range(3))

    def pair() -> dict:  # the long request; 1 s later the short one
        long: dict = {}

        def send_long() -> None:
            try:
                long["seconds"] = post(port, base | {"prompt": prompt_of(length),
                                                     "max_tokens": 1})[1]  # fmt: skip
            except Exception as e:  # noqa: BLE001  (said by the caller)
                long["error"] = f"{type(e).__name__}: {e}"

        thread = threading.Thread(target=send_long)
        thread.start()
        time.sleep(1.0)
        try:
            short_seconds = post(port, short)[1]
            first = thread.is_alive()
        finally:
            thread.join()
        if "error" in long:
            raise Failed(f"the long request: {long['error']}")
        return {"short": short_seconds, "long": long["seconds"], "short_done_first": first}

    # twice: the first pair may compile what a request admitted mid-read needs
    first, again = pair(), pair()
    return again | {"short_first": first["short"], "long_first": first["long"],
                    "short_done_first": first["short_done_first"] and again["short_done_first"],
                    "chunk": chunk_seconds, "chunk_tokens": chunk,
                    "long_tokens": length}  # fmt: skip


def mixed_clients(port: int, sizes: dict, facts: dict, rounds: int = 3) -> dict:
    """3: concurrent streaming clients with mixed sampler settings → tokens/s, the round
    of median tokens/s of `rounds` (after one identical warm-up round: this machine's
    rounds of a few seconds vary by a quarter)."""
    clients, requests, tokens = sizes["clients"], 4, 32
    level(port, clients, requests, tokens, MIXED)  # warm-up: the same load
    runs = sorted((level(port, clients, requests, tokens, MIXED) for _ in range(rounds)),
                  key=lambda r: r["tokens_per_second"])  # fmt: skip
    median = runs[len(runs) // 2]
    return median | {"rounds_tokens_per_second": [r["tokens_per_second"] for r in runs]}


def health_while_tokenizing(port: int, sizes: dict, facts: dict) -> dict:
    """4: GET /health every 20 ms while a large text prompt is read and tokenized."""
    text = HAMLET * (sizes["body_bytes"] // len(HAMLET.encode()) + 1)
    body = json.dumps({"prompt": text, "max_tokens": 1, "stream": True, "seed": 3})
    body = body.encode()
    latencies: list[float] = []
    errors: list[str] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            started = time.perf_counter()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                connection.request("GET", "/health")
                response = connection.getresponse()
                response.read()
                connection.close()
                if response.status != 200:
                    errors.append(f"HTTP {response.status}")
            except OSError as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - started)
            done.wait(0.020)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.1)  # a few polls of the idle server first
    idle = len(latencies)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()  # the answer starts once the prompt is read
        window = time.perf_counter() - started
        status = response.status
        answer = b"" if status == 200 else response.read()
    finally:
        done.set()
        poller.join()
        connection.close()  # drops the request: the server stops reading it (if it can)
    if status != 200:
        raise Rejected(status, _error_message(answer))
    if errors:
        raise Failed(f"{len(errors)} /health polls failed, first: {errors[0]}")
    during = latencies[idle:]
    return {"p50": statistics.median(during), "max": max(during), "polls": len(during),
            "window": window, "body_bytes": len(body)}  # fmt: skip


MEASUREMENTS = [
    ("settings", "1 sampler settings never seen", sampler_settings),
    ("long", "2 short request during a long prompt", long_prompt),
    ("mixed", "3 mixed concurrent clients", mixed_clients),
    ("health", "4 /health while tokenizing", health_while_tokenizing),
]


def model_facts(model: str | None) -> dict:
    """What the measurements need of the model (the working tree's tvq reads it): the
    prefill chunk's length and the token ids of the Hamlet text."""
    import tvq
    from tvq.runtime.context import chunk_len

    loaded = tvq.load(model)
    return {"chunk": chunk_len(loaded.block_len), "ids": list(loaded.tokenizer.encode(HAMLET))}


def measure_server(name: str, tree: Path, args: argparse.Namespace, sizes: dict, facts: dict,
                   cache: Path | None) -> dict:  # fmt: skip
    """Starts the server of `tree`, runs the measurements on it, stops it; a measurement
    that fails leaves {"error": line}."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    if cache is not None:
        env["TVQ_CACHE_DIR"] = str(cache)
    options = ["--max-body-bytes", str(64 << 20), "--max-prompt-tokens", str(16 << 20)]
    results: dict = {}
    print(f"serve_load: starting the {name} server", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        process, port = start_server(args.model, *options, cwd=tree, env=env)
    except Failed as e:
        print(f"serve_load: {name}: {e}", file=sys.stderr, flush=True)
        return {key: {"error": str(e)} for key, _, _ in MEASUREMENTS}
    results["start_seconds"] = time.perf_counter() - started
    try:
        for key, title, measure in MEASUREMENTS:
            if key not in args.only:
                continue
            if process.poll() is not None:
                said = " | ".join(process.stderr_tail)  # type: ignore[attr-defined]
                results[key] = {"error": f"the server exited ({process.returncode}): {said}"}
            else:
                print(f"serve_load: {name}: {title}", file=sys.stderr, flush=True)
                started = time.perf_counter()
                try:
                    results[key] = measure(port, sizes, facts)
                except Exception as e:  # noqa: BLE001  (one line, not a traceback)
                    results[key] = {"error": f"{type(e).__name__}: {e}"}
                results[key]["wall"] = time.perf_counter() - started
            if "error" in results[key]:
                print(f"serve_load: {name}: {title} failed: {results[key]['error']}",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        note = stop_server(process)
        if note:
            print(f"serve_load: the {name} server {note}", file=sys.stderr, flush=True)
            results["stop"] = note
    return results


def table(old: dict, new: dict, rev: str) -> list[str]:
    """The comparison as a Markdown table: the two servers, working ÷ REV, the target."""
    lines = [f"| measurement | {rev} | working tree | working ÷ {rev} | target (working tree) |",
             "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip

    def cell(results: dict, key: str, get) -> tuple[float | None, str]:
        part = results.get(key)
        if part is None:
            return None, "not run"
        if "error" in part:
            return None, "failed"
        try:
            return get(part), ""
        except KeyError:  # a setting the server rejected or ignored
            return None, "skipped"

    def row(label: str, key: str, get, fmt: str, target=None) -> None:
        cells = [cell(results, key, get) for results in (old, new)]
        values = [value for value, _ in cells]
        shown = [why if value is None else format(value, fmt) for value, why in cells]
        ratio = f"{values[1] / values[0]:.2f}" if None not in values and values[0] else "–"
        verdict = ""
        if target is not None:
            text, ok = target(values)
            verdict = text if ok is None else f"{text}: {'met' if ok else 'NOT met'}"
        lines.append(f"| {label} | {shown[0]} | {shown[1]} | {ratio} | {verdict} |")

    for name, _ in NEW_SETTINGS:
        row(f"1. first ÷ repeated, {name} (×)", "settings",
            lambda r, n=name: r["settings"][n]["ratio"], ".2f")  # fmt: skip
    row("1. first ÷ repeated, all settings (×)", "settings", lambda r: r["overall"], ".2f",
        lambda v: ("≤ 1.2×", None if v[1] is None else v[1] <= 1.2))  # fmt: skip
    row("1. first requests, sum (s)", "settings",
        lambda r: sum(s["first"] for s in r["settings"].values()), ".2f")  # fmt: skip
    chunk = new.get("long", {}).get("chunk") or old.get("long", {}).get("chunk")
    tokens = new.get("long", {}).get("long_tokens") or old.get("long", {}).get("long_tokens")
    chunk_tokens = (new.get("long", {}).get("chunk_tokens")
                    or old.get("long", {}).get("chunk_tokens"))  # fmt: skip
    row(f"2. 8-token request during a {tokens or '?'}-token prompt, first pair (s)", "long",
        lambda r: r["short_first"], ".2f")  # fmt: skip
    row("2. the same, again (s)", "long", lambda r: r["short"], ".2f",
        lambda v: (f"≤ 1 s + one chunk ({1 + chunk:.2f} s)" if chunk else "≤ 1 s + one chunk",
                   None if v[1] is None or not chunk else v[1] <= 1 + chunk))  # fmt: skip
    row("2. the long request's total time, first pair (s)", "long",
        lambda r: r["long_first"], ".2f")  # fmt: skip
    row("2. the long request's total time, again (s)", "long", lambda r: r["long"], ".2f")
    row(f"2. one prefill chunk, {chunk_tokens or '?'} tokens, max_tokens 1 (s)", "long",
        lambda r: r["chunk"], ".2f")  # fmt: skip
    clients = new.get("mixed", {}).get("clients") or old.get("mixed", {}).get("clients")
    row(f"3. {clients or '?'} mixed clients, generated tokens/s", "mixed",
        lambda r: r["tokens_per_second"], ".0f",
        lambda v: ("ratio ≥ 1.5×", None if None in v else v[1] / v[0] >= 1.5))  # fmt: skip
    row("3. latency p50 / request (s)", "mixed", lambda r: r["latency_p50"], ".2f")
    mb = (new.get("health", {}).get("body_bytes") or old.get("health", {}).get("body_bytes")
          or 0) / 2**20  # fmt: skip
    row(f"4. /health p50 while a {mb:.0f} MB prompt is read (ms)", "health",
        lambda r: 1000 * r["p50"], ".1f",
        lambda v: ("≤ 50 ms", None if v[1] is None else v[1] <= 50))  # fmt: skip
    row("4. /health max (ms)", "health", lambda r: 1000 * r["max"], ".1f",
        lambda v: ("≤ 50 ms", None if v[1] is None else v[1] <= 50))  # fmt: skip
    row("4. the prompt's request until its answer starts (s)", "health",
        lambda r: r["window"], ".2f")  # fmt: skip
    return lines


def against(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The --against mode: the module docstring's second paragraph."""
    known = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "-q",
                            f"{args.against}^{{commit}}"], capture_output=True)  # fmt: skip
    if known.returncode != 0:
        parser.error(f"{args.against} is not a commit of this repository")
    sizes = SIZES[args.quick]
    try:
        facts = model_facts(args.model)
    except Exception as e:  # noqa: BLE001  (one line, not a traceback)
        raise SystemExit(f"serve_load: cannot read the model in-process: {e}") from None
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        base = Path(tmp) / "base"
        add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.against]
        added = subprocess.run(add, capture_output=True, text=True)
        if added.returncode != 0:
            raise SystemExit(f"serve_load: git worktree add failed: {added.stderr.strip()}")
        try:
            trees = {args.against: base, "working tree": ROOT}
            results = {}
            for name, tree in trees.items():
                cache = None if args.shared_cache else Path(tmp) / f"cache-{len(results)}"
                results[name] = measure_server(name, tree, args, sizes, facts, cache)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False)  # fmt: skip
    old, new = results[args.against], results["working tree"]
    print(f"# serve_load --against {args.against}{' --quick' if args.quick else ''}: "
          f"{machine()}; one server after the other, "
          f"{'the shared' if args.shared_cache else 'each with an empty'} compilation cache; "
          f"model {args.model or 'built-in'}")  # fmt: skip
    for line in table(old, new, args.against):
        print(line)
    for name, results_ in results.items():
        for key, title, _ in MEASUREMENTS:
            if "error" in results_.get(key, {}):
                print(f"- {name}: {title}: failed: {results_[key]['error']}")
        for setting, why in results_.get("settings", {}).get("skipped", {}).items():
            print(f"- {name}: {setting} skipped: {why}")
        if not results_.get("long", {}).get("short_done_first", True):
            print(f"- {name}: the 8-token request ended after the long one (in a pair)")
        if "stop" in results_:
            print(f"- {name}: the server {results_['stop']}")
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    parser.add_argument(
        "--against",
        metavar="REV",
        default=None,
        help="compare the working tree's server with REV's (see above)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="with --against: smaller sizes, for a smoke run"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[key for key, _, _ in MEASUREMENTS],
        default=[key for key, _, _ in MEASUREMENTS],
        help="with --against: run these measurements only (default: all)",
    )
    parser.add_argument(
        "--shared-cache",
        action="store_true",
        help="with --against: the user's compilation cache, not empty ones",
    )
    args = parser.parse_args()
    if args.against is None:
        if args.quick or args.shared_cache:
            parser.error("--quick and --shared-cache go with --against")
        batched_vs_one_at_a_time(args)
    else:
        against(args, parser)


if __name__ == "__main__":
    main()
