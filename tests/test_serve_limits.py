"""`tvq serve` keeps its limits under real traffic (docs/DESIGN.md section 13): the
queue bounds every request not started, the rows every request started, memory stays
bounded, no request is overtaken forever, a client that leaves cancels its request, one
request's failure is its own, a deleted session stays deleted, stop strings are bounded
and read once, and a new `n` or `logprobs` compiles nothing. Driven in-process (an
Engine on a tiny byte-level model, its events recorded in the order its worker sends
them), except where HTTP is the point."""

import contextlib
import errno
import socket
import threading
import time

import jax
import numpy as np
import pytest

import tvq
from tests.conftest import count_compilations, save_byte_model, tiny_config
from tvq.serving.engine import Engine
from tvq.serving.jobs import ChoiceText, Failed, Finished, Job
from tvq.serving.protocol import ApiError, ServerSettings, parse_completion
from tvq.serving.structured import parse_request
from tvq.text.constraints import Constraint
from tvq.text.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    return tvq.Model.init(config, seed=11, block_len=4).with_tokenizer(ByteTokenizer())


class _Job(Job):
    """A job whose events go to its Client's log instead of an event loop."""

    def send(self, event) -> None:
        self.client.record(self.name, event)


class Client:
    """Requests sent to an in-process Engine; every event its worker sends, in order."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.log, self.jobs = engine, [], []
        self.changed = threading.Condition()

    def submit(self, name: str, **body) -> Job:
        """Parses the body as the server does and submits it (ApiError 429 when full)."""
        engine = self.engine
        request = parse_request(body, engine.tokenizer, engine.model.config.n_vocab,
                                engine.settings)  # fmt: skip
        job = _Job(request, None, None)
        job.client, job.name = self, name
        engine.submit(job)
        self.jobs.append(job)
        return job

    def record(self, name: str, event) -> None:
        with self.changed:
            self.log.append((name, event))
            self.changed.notify_all()

    def wait(self, condition, timeout: float = 300) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, timeout), self.log

    def events(self, name: str) -> list:
        return [event for who, event in self.log if who == name]

    def started(self, name: str) -> bool:
        return any(isinstance(e, ChoiceText) for e in self.events(name))

    def ended(self, name: str) -> bool:
        return any(isinstance(e, Finished | Failed) for e in self.events(name))

    def text(self, name: str, choice: int = 0) -> str:
        return "".join(e.text for e in self.events(name)
                       if isinstance(e, ChoiceText) and e.choice == choice)  # fmt: skip

    def first(self, name: str, kind: type) -> int:
        """Where in the log the first event of this kind for this request is."""
        return next(i for i, (who, e) in enumerate(self.log) if who == name and isinstance(e, kind))


BUSY_TOKENS = 1 << 22


@contextlib.contextmanager
def serving(model, **settings):
    # a busy request runs until cancelled (4,096 tokens of a tiny model took under a second)
    engine = Engine(model, ServerSettings(**{"max_tokens_limit": BUSY_TOKENS, **settings}))
    client = Client(engine)
    try:
        yield client
    finally:
        for job in client.jobs:
            job.cancelled.set()
        engine.close()


def busy(client: Client, name: str = "busy", **body) -> Job:
    """A request that runs until cancelled, once its first text came."""
    job = client.submit(name, prompt="Busy ", max_tokens=BUSY_TOKENS, ignore_eos=True, seed=1,
                        **body)  # fmt: skip
    client.wait(lambda: client.started(name))
    return job


def alone(model, prompt: str, **options) -> list[str]:
    return [s.text for s in tvq.generate(model, prompt, **options).samples]


def submitted(client: Client, bodies: list[dict]) -> int:
    """How many of these requests are accepted, sent one by one with the worker's rounds
    running in between; the others are answered 429."""
    accepted = 0
    for i, body in enumerate(bodies):
        try:
            client.submit(f"later{i}", **body)
            accepted += 1
        except ApiError as e:
            assert e.status == 429 and e.kind == "rate_limit_error"
        time.sleep(0.05)
    return accepted


# -- the queue and the rows -----------------------------------------------------------------


@pytest.mark.parametrize("case", ["session", "rows", "long"])
def test_the_queue_bounds_every_request_not_started(model, case):
    """A request the worker cannot start yet (its session busy, or its rows not free)
    waits in the queue and counts there: once it took such requests off the queue into a
    list of its own, and a burst of them was accepted without bound. A long prompt being
    read holds its rows, so it is bounded by --batch-rows."""
    later = {"prompt": "x", "max_tokens": 4096, "ignore_eos": True}
    with serving(model, queue_size=2, max_batch_rows=4) as client:
        if case == "session":
            busy(client, session="s")
            later |= {"session": "s"}
        elif case == "rows":
            busy(client, n=3)
            later |= {"n": 2}
        else:
            busy(client)
            later |= {"prompt": "To be, or not to be. " * 1000}  # read in chunks
        accepted = submitted(client, [later] * 12)
    if case == "long":
        assert accepted <= 2 + 3  # the queue, and the rows the busy request left
    else:
        assert accepted == 2


def test_batch_rows_bound_the_rows_and_the_arrays(model, monkeypatch):
    """--batch-rows 3: a long prompt being read holds its row (once it joined the batch
    when read, a fourth row beside three), and the arrays hold 3 slots, not 4 (once a
    power of two above it); each request still gets the text generate() gives it."""
    from tvq.serving.running import RunningBatch

    seen = []
    step = RunningBatch.step

    def recording(self) -> None:
        seen.append((self.rows, len(self.slots)))
        step(self)

    monkeypatch.setattr(RunningBatch, "step", recording)
    long_prompt = "To be, or not to be. " * 1000
    with serving(model, max_batch_rows=3) as client:
        client.submit("long", prompt=long_prompt, max_tokens=8, seed=2)
        for name in "abc":  # still running when the long prompt is read
            client.submit(name, prompt=f"{name}: ", max_tokens=200, ignore_eos=True, seed=3)
        client.wait(lambda: all(client.ended(name) for name in ["long", *"abc"]))
        texts = {name: client.text(name) for name in ["long", *"abc"]}
    assert max(rows for rows, _ in seen) <= 3
    assert max(slots for _, slots in seen) <= 3
    assert texts["long"] == alone(model, long_prompt, max_tokens=8, seed=2)[0]
    for name in "abc":
        assert texts[name] == alone(model, f"{name}: ", max_tokens=200, ignore_eos=True,
                                    seed=3)[0]  # fmt: skip


def test_free_slots_hold_one_blank_row(model):
    """Free slots are filled from one blank row made once: once a set of blank rows was
    kept for every count of free slots ever seen (~6.8 MB a row for the built-in model)."""
    from tvq.batching import BatchItem
    from tvq.serving.running import RunningBatch
    from tvq.text.rows import TextRows

    batch = RunningBatch(model, alternatives=3, max_rows=8)

    def join(n: int, max_tokens: int) -> None:
        rows = TextRows(model.tokenizer, [[]] * n, [False] * n, [0] * n)
        batch.admit(BatchItem(np.zeros([0], np.int32), max_tokens, 1, n), None,
                    np.zeros([0], np.int32), rows, lambda samples: None)  # fmt: skip

    for first, then in [(1, 3), (1, 2), (2, 5), (1, 6), (3, 4)]:  # 1 → 4, 1 → 4, ...
        join(first, 2)
        join(then, 6)
        while batch.rows:
            batch.step()
    held = sum(a.nbytes for a in jax.tree_util.tree_leaves(batch._blank))
    one = sum(a.nbytes for a in jax.tree_util.tree_leaves(batch._blank_row()))
    assert held <= one


def test_a_request_of_many_rows_is_not_overtaken(model):
    """--batch-rows 2, one row running: a request of n=2 waits for both rows, and a
    request of one row that arrives after it waits behind it (once it took the free row
    at once, and requests like it could keep the n=2 one waiting forever)."""
    with serving(model, max_batch_rows=2) as client:
        client.submit("running", prompt="A", max_tokens=40, ignore_eos=True, seed=1)
        client.wait(lambda: client.started("running"))
        client.submit("wide", prompt="B", max_tokens=3, ignore_eos=True, seed=2, n=2)
        client.submit("narrow", prompt="C", max_tokens=3, ignore_eos=True, seed=3)
        client.wait(lambda: client.ended("wide") and client.ended("narrow"))
        assert client.first("wide", Finished) < client.first("narrow", ChoiceText)
        assert client.text("wide", 1) == alone(model, "B", max_tokens=3, ignore_eos=True,
                                               seed=2, num_samples=2)[1]  # fmt: skip


@pytest.mark.parametrize("length", [40, 100, 170])
def test_a_prompt_tail_longer_than_a_chunk_is_read_over_several_calls(length):
    """Blocks of 64 tokens: a prompt's tail (what is left after its whole blocks) may
    run past one call's CHUNK steps, and is read over several calls, alone or beside
    another request, constrained or not. Once the tail and the sampled steps were planned
    as one call of up to a block's length, and every such request was a 500 (the
    built-in model: any prompt whose tail passed 32 tokens). Each answer equals
    generate()'s, logprobs too."""
    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    model = tvq.Model.init(config, seed=5, block_len=64).with_tokenizer(ByteTokenizer())
    prompt = "".join(chr(97 + (i * 7) % 26) for i in range(length))
    with serving(model, max_batch_rows=4) as client:
        client.submit("long", prompt=prompt, max_tokens=12, ignore_eos=True, seed=2, n=2,
                      logprobs=1)  # fmt: skip
        client.wait(lambda: client.started("long") or client.ended("long"))
        client.submit("running", prompt="A", max_tokens=60, ignore_eos=True, seed=1)
        client.submit("guided", prompt=prompt, max_tokens=30, seed=4, temperature=1.0,
                      guided_regex="[a-z]{3}-[0-9]{2,4}")  # fmt: skip
        client.wait(lambda: all(client.ended(n) for n in ("running", "long", "guided")))
        assert not any(isinstance(e, Failed) for _, e in client.log), client.log
        expected = alone(model, prompt, max_tokens=12, ignore_eos=True, seed=2, num_samples=2)
        assert [client.text("long", j) for j in range(2)] == expected
        regex = Constraint.regex("[a-z]{3}-[0-9]{2,4}")
        assert client.text("guided") == alone(model, prompt, max_tokens=30, seed=4,
                                              sampler=tvq.Sampler(temperature=1.0),
                                              constraint=regex)[0]  # fmt: skip
        assert client.text("running") == alone(model, "A", max_tokens=60, ignore_eos=True,
                                               seed=1)[0]  # fmt: skip


# -- cancelling, failing, deleting ------------------------------------------------------------


def test_a_cancelled_request_still_waiting_is_dropped(model):
    """--queue-size 1: a waiting request whose client left gives its place up at once
    (once it held it until the worker took it) and never runs."""
    with serving(model, queue_size=1, max_batch_rows=1) as client:
        running = busy(client)
        waiting = client.submit("waiting", prompt="x", max_tokens=3)
        waiting.cancelled.set()
        client.submit("next", prompt="y", max_tokens=3, seed=4)  # no 429
        running.cancelled.set()
        client.wait(lambda: client.ended("next"))
        assert client.text("next") == alone(model, "y", max_tokens=3, seed=4)[0]
        assert client.events("waiting") == []


def test_a_session_that_cannot_be_saved_fails_its_request_only(model, tmp_path, monkeypatch):
    """A full disk while a session's state is saved: that request fails (a 500 naming the
    session); the request running beside it gets its whole text (once every running
    request was failed and the batch thrown away)."""
    import tvq.serving.sessions

    save = tvq.serving.sessions.save_state

    def full_disk(path, model, context):
        if path.name == "full.state":
            raise OSError(errno.ENOSPC, "No space left on device")
        save(path, model, context)

    monkeypatch.setattr(tvq.serving.sessions, "save_state", full_disk)
    with serving(model, session_dir=tmp_path) as client:
        client.submit("beside", prompt="Hamlet: ", max_tokens=60, ignore_eos=True, seed=5)
        client.wait(lambda: client.started("beside"))
        client.submit("full", prompt="x", max_tokens=2, session="full")
        client.wait(lambda: client.ended("beside") and client.ended("full"))
        assert isinstance(client.events("beside")[-1], Finished)
        assert client.text("beside") == alone(model, "Hamlet: ", max_tokens=60,
                                              ignore_eos=True, seed=5)[0]  # fmt: skip
        (failed,) = [e for e in client.events("full") if isinstance(e, Failed)]
        assert failed.error.status == 500 and failed.error.param == "session"
        assert "No space left" in failed.error.message
        assert not (tmp_path / "full.state").exists()


def test_a_session_deleted_while_its_request_runs_stays_deleted(model, tmp_path):
    """DELETE while the session's request runs: the request ends without storing its
    state (once it stored it again, file and all); the next request starts anew."""
    with serving(model, session_dir=tmp_path) as client:
        client.submit("first", prompt="x", max_tokens=200, ignore_eos=True, session="gone")
        client.wait(lambda: client.started("first"))
        assert client.engine.sessions.delete("gone")  # the app's DELETE
        client.wait(lambda: client.ended("first"))
        assert client.engine.sessions.get("gone") is None
        assert not (tmp_path / "gone.state").exists()
        client.submit("again", prompt="ab", max_tokens=3, ignore_eos=True, session="gone")
        client.wait(lambda: client.ended("again"))
        assert client.events("again")[-1].usage["session_tokens"] == 5


def test_a_dropped_whole_answer_is_cancelled(tmp_path):
    """A client that leaves before its (not streamed) answer cancels its request: the one
    row is free for the next (once it ran to max_tokens, here hours)."""
    from tests.test_serve import Server

    model_dir = save_byte_model(tmp_path / "tiny", seed=11)
    server = Server(model_dir, "--batch-rows", 1, "--max-tokens-limit", 10**8)
    try:
        body = b'{"prompt": "x", "max_tokens": 100000000, "ignore_eos": true}'
        leaving = socket.create_connection(("127.0.0.1", server.port))
        leaving.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                        + b"test-key\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        while server.request("GET", "/health")[1]["requests"] < 1:
            time.sleep(0.05)
        leaving.close()
        status, out = server.request("POST", "/v1/completions",
                                     {"prompt": "y", "max_tokens": 3, "seed": 1})  # fmt: skip
        assert status == 200 and out["choices"][0]["finish_reason"] == "length"
    finally:
        assert server.stop() == 0


# -- stop strings ---------------------------------------------------------------------------


def test_stop_strings_have_a_bounded_length(model, tmp_path):
    """A stop string longer than its range (tvq.text.settings.RANGES["stop"]) is a 400
    naming 'stop', a SettingError from tvq.generate and a usage error naming --stop
    (once any length was taken, and held back and searched per token)."""
    from tests.test_cli import invoke
    from tvq.text.settings import RANGES

    longest = int(RANGES["stop"].high)
    settings = ServerSettings()
    for stop in ("x" * (longest + 1), ["ok", "y" * (longest + 1)]):
        with pytest.raises(ApiError) as info:
            parse_completion({"prompt": "a", "stop": stop}, model.tokenizer, 259, settings)
        assert info.value.status == 400 and info.value.param == "stop"
        assert f"'stop' must be <= {longest}" in info.value.message
    assert parse_completion({"prompt": "a", "stop": "x" * longest}, model.tokenizer, 259,
                            settings).stop == ["x" * longest]  # fmt: skip
    with pytest.raises(tvq.SettingError, match="stop"):
        tvq.generate(model, "a", max_tokens=2, stop=["x" * (longest + 1)])
    model_dir = save_byte_model(tmp_path / "tiny", seed=11)
    out = invoke("generate", "a", "-m", model_dir, "-n", 2, "--stop", "x" * (longest + 1),
                 code=2)  # fmt: skip
    assert "--stop must be <=" in out.output
    out = invoke("chat", "-m", model_dir, "-n", 2, "--stop", "x" * (longest + 1), input="",
                 code=2)  # fmt: skip
    assert "--stop must be <=" in out.output


class _Counted(str):
    """A stop string that counts how often its characters are read."""

    reads = 0

    def __getitem__(self, index):
        _Counted.reads += 1
        return str.__getitem__(self, index)


def test_stop_strings_are_matched_in_time_linear_in_the_text(model):
    """A text that keeps beginning a long stop string: each character is read a bounded
    number of times (once every token tried every prefix of every stop string and
    searched the whole text held back)."""
    from tvq.text.rows import TextRows

    stops = [_Counted("a" * 255 + "b"), _Counted("ab" * 100)]
    rows = TextRows(model.tokenizer, [stops], [False], [0])
    _Counted.reads = 0
    text = "a" * 2000
    for byte in text.encode():
        rows.take(np.array([byte + 3]), np.zeros(1), np.zeros([1, 0]), np.zeros([1, 0], int))
    assert _Counted.reads <= 4 * len(text) * len(stops)
    assert rows.samples[0].text == "a" * (2000 - 255)  # what may begin the stop is held
    rows.take(np.array([ord("b") + 3]), np.zeros(1), np.zeros([1, 0]), np.zeros([1, 0], int))
    assert rows.samples[0].done and rows.samples[0].finish_reason == "stop"
    assert rows.samples[0].text == "a" * (2000 - 255)


def test_stop_strings_end_the_text_before_the_first_to_appear(model):
    """Random texts and stop strings, a character a token: the text ends before the first
    stop string to be completed (the longest of those completed at one character), as a
    plain search finds it."""
    from tvq.text.rows import TextRows

    rng = np.random.default_rng(0)
    for _ in range(300):
        text = "".join(rng.choice(list("abc"), size=int(rng.integers(0, 30))))
        stops = ["".join(rng.choice(list("abc"), size=int(rng.integers(1, 5))))
                 for _ in range(int(rng.integers(1, 4)))]  # fmt: skip
        rows = TextRows(model.tokenizer, [stops], [False], [0])
        for byte in text.encode():
            if rows.take(np.array([byte + 3]), np.zeros(1), np.zeros([1, 0]),
                         np.zeros([1, 0], int)):  # fmt: skip
                break
        rows.finish_all()
        ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
        expected = text[: min(ends)[0] + min(ends)[1]] if ends else text
        assert rows.samples[0].text == expected, (text, stops)
        assert rows.samples[0].finish_reason == ("stop" if ends else "length")


# -- compilations ---------------------------------------------------------------------------


def test_a_new_n_or_logprobs_compiles_nothing_on_a_warm_server(model):
    """A warm server (started and warmed up, then one request of one prompt and one of
    two): requests with an n and a logprobs it has not seen, one joining a running one,
    one of two prompts, compile nothing (once the free slots' rows were made per count,
    and a request of several prompts ran alone, its loop compiled per n)."""
    with serving(model, max_batch_rows=4) as client:
        client.engine.warm_up()
        client.submit("one", prompt="abcd", max_tokens=5, seed=1)
        client.submit("two", prompt=["abcd", "efgh"], max_tokens=5, seed=1, logprobs=1)
        client.wait(lambda: client.ended("one") and client.ended("two"))
        with count_compilations() as compiled:
            client.submit("running", prompt="abcd", max_tokens=40, ignore_eos=True, seed=2)
            client.wait(lambda: client.started("running"))
            client.submit("three", prompt="abcd", max_tokens=5, seed=3, n=3, logprobs=5)
            client.submit("both", prompt=["abcd", "efgh"], max_tokens=5, seed=3, n=3,
                          logprobs=4)  # fmt: skip
            client.wait(lambda: all(client.ended(name) for name in ("running", "three", "both")))
        assert dict(compiled) == {}
        assert client.text("both", 5) == alone(model, "efgh", max_tokens=5, seed=3,
                                               num_samples=3)[2]  # fmt: skip


def test_a_new_prompt_length_compiles_nothing_on_a_warm_server(model):
    """Prompts of lengths the server has not seen, with and without echo and logprobs,
    compile nothing once every piece size is warm: a program held for each length met
    (cutting and joining scores on the device) had grown a server by 0.84 GB over 500
    requests (bench/RESULTS.md section 18). The echoed log-probs are those of
    tvq.score_ids."""
    from tvq.runtime.context import score_ids

    with serving(model, max_batch_rows=4) as client:
        client.engine.warm_up()
        warm = "".join(chr(97 + i % 26) for i in range(127))  # pieces of 64, 32, …, 4, 3
        client.submit("warm", prompt=warm, max_tokens=2, seed=1)
        client.submit("warm echo", prompt=warm, max_tokens=2, seed=1, echo=True, logprobs=1)
        client.wait(lambda: client.ended("warm") and client.ended("warm echo"))
        prompts = {f"p{n}": "".join(chr(98 + i * 5 % 23) for i in range(n))
                   for n in (37, 53, 90, 101, 118)}  # fmt: skip
        with count_compilations() as compiled:
            for name, prompt in prompts.items():
                client.submit(name, prompt=prompt, max_tokens=3, seed=2)
                client.submit(name + " echo", prompt=prompt, max_tokens=0, echo=True,
                              logprobs=2)  # fmt: skip
                client.wait(lambda n=name: client.ended(n) and client.ended(n + " echo"))
        assert dict(compiled) == {}
        ids = model.tokenizer.encode(prompts["p101"])
        echoed = [e for e in client.events("p101 echo") if isinstance(e, ChoiceText)]
        got = [p for e in echoed for p in (e.logprobs or {}).get("token_logprobs", [])]
        want = score_ids(model, ids, keep_log_probs=True)[0].log_probs[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_new_logprobs_compiles_nothing_in_tvq_generate(tmp_path):
    """tvq generate --logprobs K finds as many alternatives whatever K up to 20, so a
    second K runs the program the first compiled."""
    from tests.test_cli import invoke

    model_dir = save_byte_model(tmp_path / "tiny", seed=11)
    first = ("generate", "abcd", "-m", model_dir, "-n", 3, "--seed", 1, "--json", "--no-cache")
    invoke(*first, "--logprobs", 2)
    with count_compilations() as compiled:
        out = invoke(*first, "--logprobs", 5)
    assert dict(compiled) == {}
    assert '"top_logprobs"' in out.output


def test_a_new_num_samples_compiles_nothing_in_tvq_generate(tmp_path):
    """tvq generate pads its rows to a power of two (rows that never sample), so 3 samples
    after 4 run the program 4 compiled; the 3 are the first 3 of the 4."""
    import json

    from tests.test_cli import invoke

    model_dir = save_byte_model(tmp_path / "tiny", seed=11)
    first = ("generate", "abcd", "-m", model_dir, "-n", 6, "--seed", 1, "--json", "--no-cache")
    four = invoke(*first, "--num-samples", 4)
    with count_compilations() as compiled:
        three = invoke(*first, "--num-samples", 3)
    assert dict(compiled) == {}
    tokens = [[json.loads(line)["tokens"] for line in out.stdout.splitlines()]
              for out in (four, three)]  # fmt: skip
    assert len(tokens[1]) == 3 and tokens[1] == tokens[0][:3]


def test_the_server_gives_freed_memory_back_now_and_then(monkeypatch):
    """Two malloc arenas at start, and the heaps trimmed at most every few seconds
    (tvq/serving/memory.py)."""
    from tvq.serving import memory

    calls = []

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    monkeypatch.setattr(memory, "_libc", lambda: Libc())
    assert memory.limit_arenas(2) and calls == [(memory.M_ARENA_MAX, 2)]
    clock = iter([100.0, 101.0, 104.9, 105.0, 105.1])
    monkeypatch.setattr(memory.time, "monotonic", lambda: next(clock))
    releaser = memory.Releaser(every=5.0)
    for _ in range(5):
        releaser.maybe()
    assert calls[1:] == [0, 0]  # at 100 and 105 only
    monkeypatch.setattr(memory, "_libc", lambda: None)  # not glibc: nothing, no error
    assert not memory.limit_arenas(2)
