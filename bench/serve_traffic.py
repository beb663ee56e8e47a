"""Real traffic on `tvq serve` (issue 34's fifth target): many mixed requests from
concurrent clients, and what the server's memory does meanwhile.

The working tree's server (the built-in model unless --model) takes `--requests`
requests from `--clients` client threads, each request drawn from a seeded generator:
n from 1 to 8, a prompt of 10 B to 200 KB of Hamlet (log-uniform, so most are short and
some are long), max_tokens from 1 to 64, streamed or not, mixed sampler settings, echo
with logprobs on some, and a fifth abandoned part-way (a streamed one after its first
event, a non-streamed one after a short timeout). Meanwhile the server's resident memory
is read from /proc every 100 ms. Prints:

- the memory: idle (after start-up and a warm-up request), peak, and the bound
  idle + --cache-bytes + 1 GB;
- the answers by status: every 5xx is a failure, and every 429 is checked honest (at
  least --queue-size other requests were in flight when it came: sent and not answered,
  or abandoned less than 2 s before, which the server may not have noticed yet); a
  client told 429 waits the answer's Retry-After and sends the request again, as the
  openai client does, so every request is served in the end;
- requests/s and generated tokens/s.

    python bench/serve_traffic.py [--requests 500] [--clients 16] [--queue-size 8]
                                  [--batch-rows 32] [--cache-bytes BYTES] [--model DIR]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from serve_load import HAMLET, MIXED, start_server, stop_server  # noqa: E402

GB = 1 << 30
ABANDON_AFTER = 2.0  # s: an abandoned request still counts as in flight this long


def rss_bytes(pid: int) -> int:
    """The process's resident memory (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def health(port: int) -> dict:
    """The server's GET /health ({} when it does not answer in 10 s)."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health")
        return json.loads(connection.getresponse().read())
    except (OSError, ValueError):
        return {}


def text_of(size: int, offset: int) -> str:
    repeated = HAMLET * (1 + (offset + size) // len(HAMLET))
    return repeated[offset : offset + size]


def draw(rng: random.Random, index: int) -> dict:
    """One request of the mix: its body and how its client behaves."""
    size = int(math.exp(rng.uniform(math.log(10), math.log(200_000))))
    body = {"prompt": text_of(size, rng.randrange(len(HAMLET))), "n": rng.randint(1, 8),
            "max_tokens": rng.randint(1, 64), "seed": index, "stream": rng.random() < 0.6,
            **MIXED[index % len(MIXED)]}  # fmt: skip
    if not body["stream"] and rng.random() < 0.25:
        body |= {"echo": True, "logprobs": 1}
    return {"body": body, "abandon": rng.random() < 0.2, "patience": rng.uniform(0.2, 2.0)}


class Traffic:
    """The clients' shared record: answers by status, requests in flight, 429s."""

    def __init__(self, queue_size: int) -> None:
        self.queue_size = queue_size
        self.lock = threading.Lock()
        self.statuses: collections.Counter = collections.Counter()
        self.in_flight = 0
        self.abandoned_at: list[float] = []
        self.dishonest: list[str] = []
        self.errors: list[str] = []
        self.tokens = 0
        self.running: dict[int, dict] = {}  # id(spec) → the body of each request in flight

    def outstanding(self) -> int:
        recent = time.perf_counter() - ABANDON_AFTER
        return self.in_flight + sum(t > recent for t in self.abandoned_at)


def send(port: int, spec: dict, traffic: Traffic) -> None:
    """One request, as its client behaves; its outcome recorded in traffic."""
    body = spec["body"]
    with traffic.lock:
        traffic.in_flight += 1
        traffic.running[id(spec)] = body
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
    outcome = "abandoned"
    try:
        if spec["abandon"] and not body["stream"]:
            connection.timeout = spec["patience"]
        connection.request("POST", "/v1/completions", json.dumps(body),
                           {"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        outcome = str(response.status)
        if response.status == 429:
            with traffic.lock:
                others = traffic.outstanding() - 1
                if others < traffic.queue_size:
                    traffic.dishonest.append(f"429 with {others} others in flight")
            spec["retry"] = float(response.getheader("Retry-After") or 1)
        if response.status != 200 or not body["stream"]:
            answer = response.read()
            if response.status == 200:
                with traffic.lock:
                    traffic.tokens += json.loads(answer)["usage"]["completion_tokens"]
            elif response.status >= 500:
                traffic.errors.append(answer.decode()[:200])
            return
        for raw in response:
            line = raw.decode().strip()
            if spec["abandon"] and line.startswith("data: "):
                outcome = "abandoned"
                return
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    outcome = "streamed error"
                    traffic.errors.append(str(event["error"])[:200])
                elif event.get("usage"):
                    with traffic.lock:
                        traffic.tokens += event["usage"]["completion_tokens"]
    except TimeoutError:
        outcome = "abandoned"
    except OSError as e:
        outcome = f"{type(e).__name__}"
        traffic.errors.append(str(e)[:200])
    finally:
        connection.close()
        with traffic.lock:
            traffic.in_flight -= 1
            traffic.running.pop(id(spec), None)
            traffic.statuses[outcome] += 1
            if outcome == "abandoned":
                traffic.abandoned_at.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--batch-rows", type=int, default=32)
    parser.add_argument("--cache-bytes", type=int, default=GB)
    parser.add_argument("--model", help="a model directory (default: the built-in model)")
    parser.add_argument(
        "--timeline",
        help="also write the memory each second (the server's breakdown, /health, every "
        "10 s), and what was in flight at each new peak, to this file (JSON lines)",
    )
    args = parser.parse_args()
    rng = random.Random(34)
    specs = [draw(rng, i) for i in range(args.requests)]
    process, port = start_server(args.model, "--queue-size", str(args.queue_size),
                                 "--batch-rows", str(args.batch_rows), "--cache-bytes",
                                 str(args.cache_bytes), "--max-body-bytes", str(1 << 20),
                                 "--max-n", "8")  # fmt: skip
    peak, sampling = [0], threading.Event()
    timeline = open(args.timeline, "w") if args.timeline else None  # noqa: SIM115
    traffic = Traffic(args.queue_size)

    def in_flight() -> list:
        with traffic.lock:
            return [[len(b["prompt"]), b["n"], b["max_tokens"], bool(b.get("echo"))]
                    for b in traffic.running.values()]  # fmt: skip

    def watch() -> None:
        last = 0.0
        while not sampling.wait(0.1):
            now, rss = time.perf_counter(), rss_bytes(process.pid)
            if timeline and rss > peak[0] + (16 << 20):
                timeline.write(json.dumps({"t": now, "peak": rss, "running": in_flight()}) + "\n")
            if timeline and now - last >= 1:
                record = {"t": now, "rss": rss, "done": sum(traffic.statuses.values()),
                          "in_flight": traffic.in_flight}  # fmt: skip
                if int(now) // 10 != int(last) // 10:  # the server's own breakdown
                    record["memory"] = health(port).get("memory")
                last = now
                timeline.write(json.dumps(record) + "\n")
                timeline.flush()
            peak[0] = max(peak[0], rss)

    try:
        send(
            port,
            {"body": {"prompt": "Warm up.", "max_tokens": 4, "stream": False}, "abandon": False},
            Traffic(1),
        )
        idle = rss_bytes(process.pid)
        watcher = threading.Thread(target=watch)
        watcher.start()
        todo = collections.deque(specs)
        taking = threading.Lock()

        def client() -> None:
            while True:
                with taking:
                    if not todo:
                        return
                    spec = todo.popleft()
                while True:  # as the openai client does: a 429 waits Retry-After, then again
                    spec.pop("retry", None)
                    send(port, spec, traffic)
                    if "retry" not in spec:
                        break
                    time.sleep(spec["retry"])

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        sampling.set()
        watcher.join()
        after = rss_bytes(process.pid)
    finally:
        stop_server(process)
    bound = idle + args.cache_bytes + GB
    five = sum(c for s, c in traffic.statuses.items() if s.isdigit() and int(s) >= 500)
    print(f"# serve_traffic: {machine()}; {args.requests} requests from {args.clients} "
          f"clients, --queue-size {args.queue_size} --batch-rows {args.batch_rows} "
          f"--cache-bytes {args.cache_bytes}; model {args.model or 'built-in'}")  # fmt: skip
    print(f"memory: idle {idle / GB:.2f} GB, peak {peak[0] / GB:.2f} GB, after "
          f"{after / GB:.2f} GB; bound idle + cache + 1 GB = {bound / GB:.2f} GB: "
          f"{'met' if peak[0] <= bound else 'NOT met'}")  # fmt: skip
    print(f"answers: {dict(sorted(traffic.statuses.items()))}; 5xx and streamed errors: "
          f"{five + traffic.statuses['streamed error']}; 429s not honest: "
          f"{len(traffic.dishonest)}")  # fmt: skip
    print(f"{args.requests / seconds:.2f} requests/s, {traffic.tokens / seconds:.0f} generated "
          f"tokens/s over {seconds:.0f} s")  # fmt: skip
    for line in (traffic.errors + traffic.dishonest)[:5]:
        print(f"  {line}")
    print(json.dumps({"idle": idle, "peak": peak[0], "after": after, "bound": bound,
                      "statuses": traffic.statuses, "dishonest": traffic.dishonest,
                      "errors": traffic.errors[:20], "seconds": seconds,
                      "tokens": traffic.tokens}))  # fmt: skip


if __name__ == "__main__":
    main()
