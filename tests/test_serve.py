"""`tvq serve` (tvq/serving/): a real server process on a free port of 127.0.0.1 with a
tiny byte-level model, driven by the official `openai` client and by raw HTTP."""

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tvq

openai = pytest.importorskip("openai")

KEY = "test-key"


class Server:
    def __init__(self, model_dir: Path, *options) -> None:
        env = dict(os.environ, TVQ_CACHE_DIR=os.environ.get("TVQ_TEST_CACHE",
                                                            "/tmp/tvq-test-cache"))  # fmt: skip
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tvqcli", "serve", "-m", str(model_dir), "--port", "0",
             "--api-key", KEY, *map(str, options)],
            stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if found:
                self.port = int(found.group(1))
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.process.kill()
        raise AssertionError("the server did not start: " + "".join(self.lines))

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def client(self, **kwargs):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY,
                             max_retries=0, timeout=120, **kwargs)  # fmt: skip

    def request(self, method: str, path: str, body=None, headers=None):
        """Raw HTTP → (status, parsed JSON)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        connection.request(method, path, body=data, headers=sent | (headers or {}))
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, json.loads(payload) if payload else None

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import save_byte_model

    return save_byte_model(tmp_path_factory.mktemp("serve") / "tiny", seed=11)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    sessions = tmp_path_factory.mktemp("sessions")
    running = Server(model_dir, "--session-dir", sessions, "--max-tokens-limit", 512,
                     "--max-body-bytes", 4096)  # fmt: skip
    running.sessions = sessions
    yield running
    if running.process.poll() is None:
        running.stop()


def token_bytes(tokens: list[str]) -> bytes:
    """The bytes of OpenAI-style token texts ("bytes:\\xNN" for partial UTF-8)."""
    out = b""
    for token in tokens:
        if token.startswith("bytes:"):
            out += bytes(int(h, 16) for h in token[len("bytes:") :].split("\\x")[1:])
        else:
            out += token.encode()
    return out


def complete(client, prompt, **kwargs):
    return client.completions.create(model="tiny", prompt=prompt, **kwargs)


def test_completion_models_and_health(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"
    first = complete(client, "Hamlet: ", max_tokens=12, seed=3, temperature=0.8)
    again = complete(client, "Hamlet: ", max_tokens=12, seed=3, temperature=0.8)
    other = complete(client, "Hamlet: ", max_tokens=12, seed=4, temperature=0.8)
    choice = first.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.text
    assert choice.text == again.choices[0].text != other.choices[0].text
    assert first.usage.prompt_tokens == 8
    if choice.finish_reason == "length":
        assert first.usage.completion_tokens == 12
    three = complete(client, "Hamlet: ", max_tokens=8, seed=3, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) > 1
    two_prompts = complete(client, ["A", "B"], max_tokens=4, seed=1, n=2)
    assert [c.index for c in two_prompts.choices] == [0, 1, 2, 3]


def test_streaming_joins_to_the_same_text(server):
    client = server.client()
    whole = complete(client, "To be", max_tokens=40, seed=9, n=2)
    pieces = ["", ""]
    finished = [None, None]
    for chunk in complete(client, "To be", max_tokens=40, seed=9, n=2, stream=True):
        for c in chunk.choices:
            pieces[c.index] += c.text
            finished[c.index] = c.finish_reason or finished[c.index]
    assert pieces == [c.text for c in whole.choices]
    assert finished == [c.finish_reason for c in whole.choices]


def test_logprobs_and_echo_scoring_equal_tvq_score(server, model_dir):
    from tvq.runtime.context import score_ids

    client = server.client()
    model = tvq.load(model_dir)
    text = "Ophelia, in thy orisons be all my sins remembered."[:32]  # one compiled piece
    echoed = complete(client, text, max_tokens=0, echo=True, logprobs=2)
    lp = echoed.choices[0].logprobs
    assert echoed.choices[0].text == text
    assert "".join(lp.tokens) == text and lp.text_offset[:3] == [0, 1, 2]
    scored, _ = score_ids(model, model.tokenizer.encode(text), keep_log_probs=True)
    np.testing.assert_allclose(lp.token_logprobs, scored.log_probs[0], atol=1e-5)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    bare = complete(client, text, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
    assert bare.token_logprobs == lp.token_logprobs and bare.top_logprobs == [{}] * len(text)
    # generated tokens: their log-probs are those of scoring prompt + completion
    out = complete(client, "Ophelia", max_tokens=9, seed=2, logprobs=3, temperature=1.0)
    lp = out.choices[0].logprobs
    assert lp.text_offset[0] == len("Ophelia")  # offsets count from the prompt's start
    assert token_bytes(lp.tokens) == b"".join(map(model.tokenizer.token_bytes, lp.token_ids))
    ids = model.tokenizer.encode("Ophelia") + lp.token_ids
    full, _ = score_ids(model, ids, keep_log_probs=True)
    np.testing.assert_allclose(lp.token_logprobs, full.log_probs[0, 7:], atol=1e-4)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) >= value - 1e-6
        if token in top:
            assert top[token] == pytest.approx(value, abs=1e-5)


def test_a_session_continued_over_three_requests_equals_one_request(server):
    client = server.client()
    server.request("DELETE", "/v1/sessions/talk")
    parts = ["Horatio: ", "\nHamlet: ", "\nHoratio: "]
    ids = []  # the whole text's token ids (a byte model: a prompt's ids are its bytes + 3)
    for i, prompt in enumerate(parts):
        out = complete(client, prompt, max_tokens=6, seed=20 + i, temperature=1.0,
                       logprobs=1, extra_body={"session": "talk"})  # fmt: skip
        assert out.choices[0].finish_reason == "length"
        ids += [b + 3 for b in prompt.encode()] + out.choices[0].logprobs.token_ids
        last = out
    prompt = ids[: len(ids) - 6]
    whole = complete(client, prompt, max_tokens=6, seed=22, temperature=1.0, logprobs=1)
    assert whole.choices[0].text == last.choices[0].text
    np.testing.assert_allclose(whole.choices[0].logprobs.token_logprobs,
                               last.choices[0].logprobs.token_logprobs, atol=1e-4)  # fmt: skip
    assert last.usage.session_tokens == len(ids)  # what the session holds: a new one holds 0
    assert (server.sessions / "talk.state").is_file()
    assert server.request("DELETE", "/v1/sessions/talk")[0] == 200
    assert server.request("DELETE", "/v1/sessions/talk")[0] == 404
    assert not (server.sessions / "talk.state").exists()


def test_bad_requests_get_openai_errors(server, tmp_path):
    status, body = server.request("POST", "/v1/completions", {"prompt": "x"},
                                  headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert status == 401 and body["error"]["type"] == "authentication_error"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("GET", "/v1/models")
    assert connection.getresponse().status == 401
    connection.close()
    cases = [
        (b"{not json", None),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "min_p": 1}, "min_p"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": [[1, 2, 999]]}, "prompt"),
        ({"prompt": "x", "session": "../../etc/passwd"}, "session"),
        ({"prompt": "x", "session": "a/b"}, "session"),
        ({"prompt": ["x", "y"], "session": "s"}, "prompt"),
        ([1, 2], None),
    ]
    for body, field in cases:
        status, answer = server.request("POST", "/v1/completions", body)
        assert status == 400, (body, answer)
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["param"] == field, (body, answer)
        if field:
            assert field in answer["error"]["message"]
    status, answer = server.request("POST", "/v1/completions", {"prompt": "x" * 5000})
    assert status == 413 and "larger than" in answer["error"]["message"]
    status, _ = server.request("DELETE", "/v1/sessions/..%2F..%2Fetc%2Fpasswd")
    assert status == 400
    status, answer = server.request("GET", "/v1/nothing")
    assert status == 404 and "error" in answer
    assert not list(Path("/etc").glob("passwd.state"))
    assert all("Traceback" not in line for line in server.lines)


def test_many_clients_at_once_and_one_leaving_mid_stream(server):
    cases = [("Enter ", 1), ("Exit ", 2), ("Lord ", 3), ("Lady ", 4)]
    client = server.client()
    expected = {c: complete(client, c[0], max_tokens=10, seed=c[1]).choices[0].text
                for c in cases}  # fmt: skip
    leaving = server.client().completions.create(
        model="tiny", prompt="Long ", max_tokens=512, seed=5, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(leaving))  # the first chunk, then the client goes away
    leaving.close()
    answers, errors = [], []

    def client_run(k: int) -> None:
        mine = server.client()
        try:
            for i in range(4):
                case = cases[(k + i) % 4]
                out = complete(mine, case[0], max_tokens=10, seed=case[1])
                answers.append((case, out.choices[0].text))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client_run, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(answers) == 64
    assert all(text == expected[case] for case, text in answers)  # batched = alone
    assert server.request("GET", "/health")[1]["largest_batch"] > 1


def test_restart_keeps_sessions_and_a_full_queue_answers_429(model_dir, tmp_path):
    # a server of its own: the module's may still serve tests on this worker after this one
    server = Server(model_dir, "--session-dir", tmp_path)
    first = complete(server.client(), "Polonius: ", max_tokens=5, seed=1,
                     extra_body={"session": "kept"})  # fmt: skip
    assert server.stop() == 0
    assert any("stopped" in line for line in server.lines)
    again = Server(model_dir, "--session-dir", tmp_path, "--queue-size", 1, "--batch-rows", 1)
    try:
        later = complete(again.client(), " and ", max_tokens=5, seed=2,
                         extra_body={"session": "kept"})  # fmt: skip
        whole = complete(again.client(), "Polonius: " + first.choices[0].text + " and ",
                         max_tokens=5, seed=2)  # fmt: skip
        assert later.choices[0].text == whole.choices[0].text
        # one request running (the one row), one waiting: a third is refused with 429
        clients = [again.client(), again.client()]  # kept: a dropped client disconnects
        streams = []
        for busy in clients:  # each many seconds of work, until its client goes away
            streams.append(busy.completions.create(
                model="tiny", prompt=["Busy "] * 16, max_tokens=4096, seed=1, stream=True,
                extra_body={"ignore_eos": True}))  # fmt: skip
            time.sleep(0.5)
        status, answer = again.request("POST", "/v1/completions", {"prompt": "x"})
        assert status == 429 and answer["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError) as info:  # and says when to try again
            again.client().with_options(max_retries=0).completions.create(model="tiny",
                                                                          prompt="x")  # fmt: skip
        assert info.value.response.headers["retry-after"] == "1"
        for s in streams:
            s.close()
    finally:
        assert again.stop() == 0


def test_sessions_beyond_the_limit_drop_the_least_recently_used(model_dir, tmp_path):
    from tvq.runtime.context import Context
    from tvq.serving.sessions import Sessions

    model = tvq.load(model_dir)
    memory = Sessions(model, limit=2, folder=None)
    for name in ("a", "b"):
        memory.put(name, Context.start(model))
    assert memory.get("a") is not None  # a is now the most recently used
    memory.put("c", Context.start(model))
    assert memory.get("b") is None and memory.get("a") is not None
    on_disk = Sessions(model, limit=1, folder=tmp_path)
    for name in ("a", "b"):
        on_disk.put(name, Context.start(model))
    assert on_disk.get("a") is not None  # dropped from memory, read back from its file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.state", "b.state"]


def test_endpoints_say_what_they_are(model_dir, tmp_path):
    """Chat and other OpenAI paths: 404 naming /v1/completions; a lone surrogate and JSON
    nested 100,000 deep: 400; a session file whose writing was killed is removed at
    start; /health answers without the key (every other path still asks for it)."""
    stale = tmp_path / ".killed.state.x1y2z3"  # what a kill -9 mid-write leaves
    stale.write_bytes(b"half")
    kept = tmp_path / "kept.state"
    kept.write_bytes(b"not ours to judge")
    server = Server(model_dir, "--session-dir", tmp_path, "--max-body-bytes", 1_000_000)
    try:
        assert not stale.exists() and kept.exists()
        with pytest.raises(openai.NotFoundError) as info:
            server.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "hi"}]
            )
        assert "tvq serves a base model: use /v1/completions" in str(info.value)
        for path in ("/v1/embeddings", "/v1/chat/completions", "/v1/moderations"):
            status, answer = server.request("POST", path, {"input": "x"})
            assert status == 404, path
            assert "use /v1/completions" in answer["error"]["message"]
            assert answer["error"]["type"] == "not_found_error"
        status, answer = server.request("POST", "/v1/completions", b'{"prompt": "a\\ud800b"}')
        assert status == 400 and answer["error"]["param"] == "prompt"
        assert "surrogate" in answer["error"]["message"]
        status, answer = server.request("POST", "/v1/completions",
                                        {"prompt": "x", "stop": ["\ud800"]})  # fmt: skip
        assert status == 400 and answer["error"]["param"] == "stop"
        deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, answer = server.request("POST", "/v1/completions", deep)
        assert status == 400 and "nested too deeply" in answer["error"]["message"]
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for path, expected in (("/health", 200), ("/v1/models", 401)):
            connection.request("GET", path)  # no Authorization header
            response = connection.getresponse()
            response.read()
            assert response.status == expected, path
        connection.close()
        assert complete(server.client(), "x", max_tokens=2, seed=1).choices[0].text is not None
        assert all("Traceback" not in line for line in server.lines)
    finally:
        assert server.stop() == 0


def test_lm_eval_requests_give_tvq_score_numbers(server, model_dir, tmp_path):
    """The requests lm-evaluation-harness 0.4 sends (local-completions, its remote
    tokenizer found through vLLM's endpoints), replayed: the tokenizer endpoints, a
    rolling-perplexity document prefixed with the end-of-document token (as an id, and
    as text with tokenized_requests=False) and a multiple-choice loglikelihood; the
    numbers are `tvq score`'s and score_ids' exactly."""
    from tests.test_cli import invoke
    from tvq.runtime.context import score_ids

    model = tvq.load(model_dir)
    tokenizer = model.tokenizer
    status, info = server.request("GET", "/tokenizer_info")
    assert status == 200 and info["bos_token"] is None
    eos_text = info["eos_token"]
    # how lm-eval's RemoteTokenizer finds its ids: encode(eos_token)[0]
    status, answer = server.request("POST", "/tokenize",
                                    {"prompt": eos_text, "add_special_tokens": False})  # fmt: skip
    assert status == 200 and answer["tokens"] == [tokenizer.eos_id]
    document = "Ophelia, in thy orisons\nbe all my sins remembered. " * 3
    ids = server.request("POST", "/tokenize", {"prompt": document})[1]["tokens"]
    assert ids == tokenizer.encode(document)
    status, back = server.request("POST", "/detokenize", {"tokens": [tokenizer.eos_id, *ids]})
    assert status == 200 and back["prompt"] == eos_text + document
    status, answer = server.request("POST", "/tokenize", {"prompt": 3})
    assert status == 400 and answer["error"]["param"] == "prompt"
    status, answer = server.request("POST", "/detokenize", {"tokens": [10**6]})
    assert status == 400 and answer["error"]["param"] == "tokens"

    # rolling loglikelihood: one window [eos] + document, echo, one token generated
    path = tmp_path / "document.txt"
    path.write_text(document)
    row = json.loads(invoke("score", path, "-m", model_dir, "--format", "jsonl").output
                     .splitlines()[0])  # fmt: skip
    request = {"model": "tiny", "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}  # fmt: skip
    for prompt in ([[tokenizer.eos_id, *ids]], eos_text + document):
        status, answer = server.request("POST", "/v1/completions", request | {"prompt": prompt})
        assert status == 200, answer
        lp = answer["choices"][0]["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 2  # the marker, the text, one sampled
        assert lp["token_logprobs"][0] is None and lp["tokens"][0] == eos_text
        nll = -sum(lp["token_logprobs"][1:-1])
        assert nll == pytest.approx(row["nll"] * row["tokens"], rel=1e-5)
        assert answer["usage"]["prompt_tokens"] == len(ids) + 1

    # multiple choice: log p(continuation | context), ctxlen tokens of context
    context, choices = "Question: who speaks?\nAnswer:", [" Hamlet", " Ophelia"]
    for choice in choices:
        whole = tokenizer.encode(context + choice)
        ctxlen = len(tokenizer.encode(context))
        status, answer = server.request("POST", "/v1/completions", request | {"prompt": [whole]})
        values = answer["choices"][0]["logprobs"]["token_logprobs"]
        scored, _ = score_ids(model, whole, keep_log_probs=True)
        expected = float(scored.log_probs[0, ctxlen:].sum())
        assert sum(values[ctxlen:-1]) == pytest.approx(expected, abs=1e-4)


def test_penalties_and_logit_bias_over_http(server):
    """The new sampler fields work (a banned token is never sampled; penalties change the
    text as in the library) and each bad value is a 400 naming its field."""
    client = server.client()
    greedy = complete(client, "To be", max_tokens=12, temperature=0, seed=1)
    first = greedy.choices[0].text[0].encode()[0] + 3  # the byte model's id of that byte
    banned = complete(client, "To be", max_tokens=12, temperature=0, seed=1,
                      logit_bias={str(first): -100})  # fmt: skip
    assert banned.choices[0].text[0] != greedy.choices[0].text[0]
    penalized = complete(client, "To be", max_tokens=12, temperature=0, seed=1,
                         frequency_penalty=2, presence_penalty=2,
                         extra_body={"repetition_penalty": 2.0, "repeat_last_n": 32})  # fmt: skip
    assert penalized.choices[0].text != greedy.choices[0].text
    for field, value in [("presence_penalty", 3), ("frequency_penalty", "x"),
                         ("repetition_penalty", 0), ("repeat_last_n", 10**6),
                         ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 101}),
                         ("logit_bias", [1, 2]), ("logit_bias", {"999999": 1})]:  # fmt: skip
        status, answer = server.request("POST", "/v1/completions", {"prompt": "x", field: value})
        assert status == 400 and answer["error"]["param"] == field, (field, value, answer)


def test_every_numeric_field_is_checked_before_any_array(server):
    """Numbers beyond any integer array (once a 500: OverflowError) are 400s naming the
    field, checked with the ranges every front end shares (tvq.text.settings)."""
    huge = 10**20
    for field, value in [("top_k", huge), ("seed", huge), ("n", huge), ("max_tokens", huge),
                         ("logprobs", huge), ("repeat_last_n", huge), ("seed", -1),
                         ("logit_bias", {str(huge): 1}), ("logit_bias", {"5": 1e300}),
                         ("temperature", 1e400), ("top_p", True)]:  # fmt: skip
        status, answer = server.request("POST", "/v1/completions", {"prompt": "x", field: value})
        assert status == 400 and answer["error"]["param"] == field, (field, value, answer)


@pytest.mark.parametrize("extra", [{}, {"echo": True, "stop": ["e"]}])
def test_streamed_logprobs_come_with_their_chunks_and_join_to_the_whole(server, extra):
    client = server.client()
    kwargs = dict(max_tokens=30, seed=7, logprobs=3, temperature=1.0, **extra)
    whole = complete(client, "To be", **kwargs).choices[0]
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    joined, text, carrying = {key: [] for key in keys}, "", 0
    for chunk in complete(client, "To be", stream=True, **kwargs):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                carrying += 1
                for key in keys:
                    joined[key] += getattr(choice.logprobs, key)
    assert text == whole.text
    for key in keys:
        assert joined[key] == getattr(whole.logprobs, key), key
    assert carrying > 2  # chunk by chunk, not one chunk at the end


def test_a_short_request_overtakes_a_long_prompt(model_dir, tmp_path):
    """A prompt longer than one prefill chunk is read a chunk at a time, the queue looked
    at between chunks: a short request sent while it is read finishes first, and the
    long one still gets exactly what generate() gives it alone."""
    server = Server(model_dir, "--max-body-bytes", 4_000_000)
    try:
        long_prompt = ("To be, or not to be, that is the question. " * 5000)[:200_000]
        finished, answers = {}, {}

        def send(name: str, prompt: str, max_tokens: int) -> None:
            out = complete(server.client(), prompt, max_tokens=max_tokens, seed=3)
            finished[name], answers[name] = time.monotonic(), out.choices[0].text

        long = threading.Thread(target=send, args=("long", long_prompt, 8))
        long.start()
        time.sleep(0.5)  # the long prompt is being read
        send("short", "Hamlet: ", 8)
        long.join(timeout=300)
        assert finished["short"] < finished["long"]
        model = tvq.load(model_dir)
        alone = tvq.generate(model, long_prompt, max_tokens=8, seed=3, sampler=tvq.Sampler())
        assert answers["long"] == alone.samples[0].text
    finally:
        assert server.stop() == 0


def test_requests_join_and_leave_the_running_batch(model_dir):
    """Continuous batching (tvq.serving.running): requests join the running rows at
    different times, with their own samplers, penalties, sample counts and lengths, and
    each gets exactly what generate() gives it alone."""
    from tvq.batching import BatchItem
    from tvq.decoding import generate
    from tvq.serving.running import RunningBatch
    from tvq.text.rows import TextRows

    model = tvq.load(model_dir)
    batch = RunningBatch(model, alternatives=3, max_rows=4)
    cases = [
        ("Hamlet: ", 40, 3, 1, tvq.Sampler(temperature=0.8), 0),
        ("Ophelia, in thy orisons", 20, 4, 2, tvq.Sampler(top_k=5, presence_penalty=1.0), 3),
        ("A", 5, 5, 1, tvq.Sampler(temperature=0, repetition_penalty=1.3), 2),
        ("To be", 9, 6, 1, tvq.Sampler(min_p=0.1, frequency_penalty=0.5), 1),
    ]
    done = {}

    def join(i: int) -> None:
        text, max_tokens, seed, n, sampler, logprobs = cases[i]
        ids = np.asarray(model.tokenizer.encode(text), np.int32)
        whole = len(ids) - len(ids) % model.block_len
        context = tvq.score_ids(model, ids[:whole])[1] if whole else None
        request = BatchItem(ids, max_tokens, seed, n, (), sampler, logprobs, False)
        rows = TextRows(model.tokenizer, [[]] * n, [False] * n, [logprobs] * n)
        batch.admit(request, context, ids[whole:], rows, lambda s, i=i: done.__setitem__(i, s))

    join(0)
    batch.step()
    batch.step()
    join(1)
    batch.step()
    join(2)
    while 2 not in done:
        batch.step()
    assert batch.rows == 3 and len(batch.slots) == 4  # case 2's slot is free again
    join(3)  # takes the free slot: the arrays keep their shape
    assert batch.rows == 4 and len(batch.slots) == 4
    while batch.rows:
        batch.step()
    assert batch.device is None and not batch.slots
    for i, (text, max_tokens, seed, n, sampler, logprobs) in enumerate(cases):
        alone = generate(model, text, max_tokens=max_tokens, seed=seed, num_samples=n,
                         sampler=sampler, logprobs=logprobs)  # fmt: skip
        for mine, theirs in zip(done[i], alone.samples, strict=True):
            assert mine.ids == theirs.ids and mine.text == theirs.text
            np.testing.assert_allclose(mine.log_probs, theirs.log_probs, atol=1e-5)
            assert [len(t) for t in mine.top_logprobs] == [len(t) for t in theirs.top_logprobs]


def test_prompt_tails_are_read_in_the_running_batch(model_dir, monkeypatch):
    """The tails of joining prompts (here longer than a call's CHUNK steps, and of
    different lengths) are read by their rows' first steps in the running batch's calls,
    beside rows that sample: joining runs no loop of its own, and each request still
    gets exactly what generate() gives it alone."""
    import tvq.runtime.decode_loop
    from tvq.batching import BatchItem
    from tvq.decoding import generate
    from tvq.serving.running import RunningBatch
    from tvq.text.rows import TextRows

    model = tvq.load(model_dir).with_block_len(64)
    calls = []
    loop = tvq.runtime.decode_loop.decode_chunk
    monkeypatch.setattr(tvq.runtime.decode_loop, "decode_chunk",
                        lambda *a, **k: calls.append(1) or loop(*a, **k))  # fmt: skip
    batch = RunningBatch(model, alternatives=2, max_rows=4)
    cases = [
        ("Hamlet: ", 30, 3, 1, tvq.Sampler(temperature=0.8)),
        ("Ophelia, in thy orisons be all my sins remembered, ", 9, 4, 2,
         tvq.Sampler(top_k=5, presence_penalty=1.0)),
        ("O, that this too too solid flesh would melt, thaw and resolve itself "
         "into a dew", 12, 5, 1, tvq.Sampler(temperature=0, repetition_penalty=1.3)),
    ]  # fmt: skip
    done = {}

    def join(i: int) -> None:
        text, max_tokens, seed, n, sampler = cases[i]
        ids = np.asarray(model.tokenizer.encode(text), np.int32)
        whole = len(ids) - len(ids) % model.block_len
        context = tvq.score_ids(model, ids[:whole])[1] if whole else None
        request = BatchItem(ids, max_tokens, seed, n, (), sampler, 1, False)
        rows = TextRows(model.tokenizer, [[]] * n, [False] * n, [1] * n)
        before = len(calls)
        batch.admit(request, context, ids[whole:], rows, lambda s, i=i: done.__setitem__(i, s))
        assert len(calls) == before  # nothing read on its own
        return len(ids) - whole

    join(0)
    batch.step()
    batch.step()
    tails = [join(1), join(2)]  # in the same round
    assert max(tails) > tvq.runtime.decode_loop.CHUNK and tails[0] != tails[1]
    while batch.rows:
        batch.step()
    for i, (text, max_tokens, seed, n, sampler) in enumerate(cases):
        alone = generate(model, text, max_tokens=max_tokens, seed=seed, num_samples=n,
                         sampler=sampler, logprobs=1)  # fmt: skip
        for mine, theirs in zip(done[i], alone.samples, strict=True):
            assert mine.ids == theirs.ids and mine.text == theirs.text
            np.testing.assert_allclose(mine.log_probs, theirs.log_probs, atol=1e-5)
    assert sum(len(s.ids) for s in done[2]) > 1
