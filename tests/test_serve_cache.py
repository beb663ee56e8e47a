"""`tvq serve` with the state cache (tvq/runtime/state_cache.py): a conversation resent in
full reads only what is new, the shared context of several prompts (lm-evaluation-
harness's multiple choice) is read once, usage says what was reused
(prompt_tokens_details.cached_tokens, with the official `openai` client), the numbers
are those of reading every prompt whole, and a server killed with -9 answers correctly
from its cache folder after a restart."""

import signal

import numpy as np
import pytest

import tvq
from tests.test_serve import KEY, Server, complete, model_dir  # noqa: F401  (a fixture)
from tvq.runtime.context import score_ids

openai = pytest.importorskip("openai")

TURN = "HAMLET. To be, or not to be, that is the question. "


@pytest.fixture(scope="module")
def cached_server(model_dir, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("states")
    running = Server(model_dir, "--cache-dir", folder, "--max-body-bytes", 1 << 20)
    running.folder = folder
    yield running
    if running.process.poll() is None:
        running.stop()


def test_a_conversation_resent_in_full_reads_only_what_is_new(cached_server, model_dir):  # noqa: F811
    """A chat front end sends the whole history each turn: every turn after the first
    finds the previous prompt and the model's own answer in the cache, and its text is
    what one generation over the whole history gives (greedy)."""
    client = cached_server.client()
    model = tvq.load(model_dir)
    history, before = "", 0
    for turn in range(4):
        history += f"{TURN}{turn}\n"
        stream = complete(client, history, max_tokens=10, temperature=0, stream=True,
                          stream_options={"include_usage": True})  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        usage = chunks[-1].usage
        want = tvq.generate(model, history, max_tokens=10, sampler=tvq.Sampler(temperature=0))
        assert text == want.samples[0].text
        cached = usage.prompt_tokens_details.cached_tokens
        assert usage.prompt_tokens == len(model.tokenizer.encode(history))
        if turn:
            assert cached >= before, (turn, cached, before)  # the last prompt and answer
        history += text
        before = len(model.tokenizer.encode(history))


def test_the_shared_context_of_several_prompts_is_read_once(cached_server, model_dir):  # noqa: F811
    """lm-evaluation-harness's multiple choice: one request, a context with each of its
    continuations, echo with logprobs and no tokens: the context is read once (the
    other prompts start from it), every token's log-prob is tvq score's, and the same
    request again reads nothing."""
    model = tvq.load(model_dir)
    context = "Once upon a time, in a kingdom by the sea, there lived " * 4
    endings = ["a king.", "a maiden fair.", "nobody at all.", "a whale."]
    body = {"model": "tiny", "prompt": [context + e for e in endings], "max_tokens": 0,
            "echo": True, "logprobs": 1, "temperature": 0}  # fmt: skip
    status, first = cached_server.request("POST", "/v1/completions", body)
    assert status == 200, first
    shared = len(model.tokenizer.encode(context))  # bytes: the prompts share them
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] >= 3 * shared
    for choice, ending in zip(first["choices"], endings, strict=True):
        ids = model.tokenizer.encode(context + ending)
        scored, _ = score_ids(model, ids, keep_log_probs=True)
        np.testing.assert_allclose(choice["logprobs"]["token_logprobs"], scored.log_probs[0],
                                   atol=2e-5)  # fmt: skip
    status, again = cached_server.request("POST", "/v1/completions", body)
    total = first["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == total
    assert [c["logprobs"] for c in again["choices"]] == [c["logprobs"] for c in first["choices"]]


def test_a_killed_server_answers_from_its_cache_folder_after_a_restart(model_dir, tmp_path):  # noqa: F811
    prompt = TURN * 6
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}
    first = Server(model_dir, "--cache-dir", tmp_path)
    status, answer = first.request("POST", "/v1/completions", body)
    assert status == 200 and answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=60)
    assert list(tmp_path.glob("*.state"))
    again = Server(model_dir, "--cache-dir", tmp_path)
    try:
        status, repeated = again.request("POST", "/v1/completions", body)
        assert status == 200
        assert repeated["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert repeated["choices"][0]["text"] == answer["choices"][0]["text"]
    finally:
        assert again.stop() == 0


def test_continuations_sent_one_by_one_read_their_context_once(cached_server, model_dir):  # noqa: F811
    """lm-evaluation-harness sends each continuation of a context as a request of its own
    (batch size 1): a scored prompt's state is kept near its end too (its last multiple
    of 32 tokens) and at its common prefix with the scored prompts before it, so the
    second continuation reads its own tokens and a few more, and the others only their
    own."""
    model = tvq.load(model_dir)
    context = "Now is the winter of our discontent made glorious summer by this sun of " * 3
    shared = len(model.tokenizer.encode(context))
    for i, ending in enumerate(["York.", "Spain.", "noon.", "the sea."]):
        body = {"model": "tiny", "prompt": context + ending, "max_tokens": 1, "echo": True,
                "logprobs": 1, "temperature": 0}  # fmt: skip
        status, answer = cached_server.request("POST", "/v1/completions", body)
        assert status == 200, answer
        cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == [0, shared // 32 * 32, shared, shared][i], (i, cached, shared)
        scored, _ = score_ids(model, model.tokenizer.encode(context + ending), keep_log_probs=True)
        np.testing.assert_allclose(answer["choices"][0]["logprobs"]["token_logprobs"][:-1],
                                   scored.log_probs[0], atol=2e-5)  # fmt: skip
