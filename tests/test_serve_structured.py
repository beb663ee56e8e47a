"""Structured output over HTTP (tvq/serving/structured.py), with the official openai
client: response_format (json_object, json_schema), vLLM's guided_* fields in
extra_body, llama.cpp's grammar; one constraint at a time; a bad one is a 400 naming its
field; constrained and free requests share the running batch, the free one getting
exactly what it gets alone."""

import json
import re
import threading

import numpy as np
import pytest

import tvq
from tests.conftest import save_byte_model
from tests.test_serve import Server

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_byte_model(tmp_path_factory.mktemp("structured") / "tiny", seed=7)


@pytest.fixture(scope="module")
def server(model_dir):
    server = Server(model_dir)
    yield server
    server.stop()


def test_over_http(server, model_dir):
    """One server for all of it (a server's start is most of this file's time)."""
    check_response_format_and_guided_fields(server)
    check_bad_constraints_are_400s_naming_the_field(server)
    check_constrained_and_free_requests_share_the_running_batch(server, model_dir)


def _text(client, **options) -> list:
    options = {"max_tokens": 120, "seed": 2, "temperature": 1.0} | options
    answer = client.completions.create(model="tiny", prompt="Q: ", **options)
    return answer.choices


def check_response_format_and_guided_fields(server):
    client = server.client()
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for choice in _text(client, n=3, extra_body={"response_format": schema_format}):
        value = json.loads(choice.text)
        assert set(value) == {"name", "age"} and len(value["name"]) <= 6, choice.text
        assert choice.finish_reason == "stop"
    for choice in _text(client, n=2, extra_body={"response_format": {"type": "json_object"}}):
        assert choice.text.startswith("{")
    for choice in _text(client, n=2, extra_body={"guided_regex": r"[0-9]{2}-[a-z]{3}"}):
        assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", choice.text), choice.text
    for choice in _text(client, n=3, extra_body={"guided_choice": ["yes", "no", "maybe"]}):
        assert choice.text in ("yes", "no", "maybe")
    for choice in _text(client, extra_body={"grammar": 'root ::= "go " [a-c] [a-c]'}):
        assert re.fullmatch(r"go [a-c][a-c]", choice.text), choice.text
    stream = client.completions.create(model="tiny", prompt="Q: ", max_tokens=50, seed=3,
                                       stream=True, extra_body={"guided_json": SCHEMA})  # fmt: skip
    assert set(json.loads("".join(c.choices[0].text for c in stream))) == {"name", "age"}
    cut = _text(client, max_tokens=3, extra_body={"guided_json": SCHEMA})[0]
    assert cut.finish_reason == "length" and cut.text.startswith("{")


def check_bad_constraints_are_400s_naming_the_field(server):
    cases = [({"guided_regex": "[a-"}, "guided_regex", "unclosed character class"),
             ({"guided_json": {"type": "nonsense"}}, "guided_json", "nonsense"),
             ({"guided_choice": "yes"}, "guided_choice", "a list of strings"),
             ({"response_format": {"type": "xml"}}, "response_format", "json_object"),
             ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "one constraint"),
             ({"grammar": "root ::= ("}, "grammar", "invalid")]  # fmt: skip
    for body, field, message in cases:
        status, answer = server.request("POST", "/v1/completions",
                                        {"prompt": "x", "max_tokens": 2, **body})  # fmt: skip
        assert status == 400, answer
        assert answer["error"]["param"] == field and message in answer["error"]["message"]


def check_constrained_and_free_requests_share_the_running_batch(server, model_dir):
    client = server.client()
    results = {}

    def free():
        results["free"] = client.completions.create(model="tiny", prompt="To be", max_tokens=40,
                                                    seed=9, temperature=0.8)  # fmt: skip

    thread = threading.Thread(target=free)
    thread.start()
    results["bound"] = _text(client, n=2, extra_body={"guided_choice": ["Hamlet", "Ophelia"]})
    thread.join()
    assert all(c.text in ("Hamlet", "Ophelia") for c in results["bound"])
    alone = tvq.generate(tvq.load(model_dir), "To be", max_tokens=40, seed=9,
                         sampler=tvq.Sampler(temperature=0.8))  # fmt: skip
    assert results["free"].choices[0].text == alone.samples[0].text


def test_constrained_rows_speculate_in_the_running_batch(model_dir, monkeypatch):
    """Constrained requests join the running batch at different rounds beside free ones,
    several rows each, at temperature 1: each gets exactly what generate() gives it
    alone (the same guarded speculation, its chunks cut short and read again where a
    draw must be drawn again: tvq/serving/running.py RunningBatch._cut), the cuts happen,
    and the batch's calls take several steps while a constraint is running."""
    from tvq.batching import BatchItem
    from tvq.serving import running
    from tvq.text.constraints import Constraint
    from tvq.text.rows import TextRows

    model = tvq.load(model_dir)
    ids = np.asarray(model.tokenizer.encode("Q: "), np.int32)
    hot = tvq.Sampler(temperature=1.0)
    cases = [  # n, constraint, seed, the round it joins, max_tokens
        (3, Constraint.json_schema(SCHEMA), 2, 0, 120),
        (2, Constraint.json_object(), 2, 1, 40),
        (1, None, 5, 0, 60),
        (2, Constraint.regex(r"[0-9]{2}-[a-z]{3}"), 3, 2, 120),
        (3, Constraint.choice(["yes", "no", "maybe"]), 2, 3, 120),
        (2, Constraint.json_schema(SCHEMA), 9, 5, 50),
    ]  # fmt: skip
    steps, cuts = [], []
    real_run, real_cut = running.RunningBatch._run, running.RunningBatch._cut

    def spy_run(self, d, counts, limits, forced, n_forced):  # steps sampled under a guard
        if any(entry.guards is not None for entry in self.entries):
            steps.append(int((limits - n_forced).max()))
        return real_run(self, d, counts, limits, forced, n_forced)

    monkeypatch.setattr(running.RunningBatch, "_run", spy_run)
    monkeypatch.setattr(running.RunningBatch, "_cut", lambda self, *a: cuts.append(1) or
                        real_cut(self, *a))  # fmt: skip
    batch, done = running.RunningBatch(model, alternatives=0, max_rows=16), {}
    for round_ in range(1000):
        for k, (n, constraint, seed, joins, max_tokens) in enumerate(cases):
            if joins == round_:
                request = BatchItem(ids, max_tokens, seed, n, (), hot, 0, False, constraint)
                rows = TextRows(model.tokenizer, [()] * n, [False] * n, [0] * n)
                batch.admit(request, None, ids, rows, lambda s, k=k: done.__setitem__(k, s))
        if len(done) == len(cases):
            break
        batch.step()
    for k, (n, constraint, seed, _, max_tokens) in enumerate(cases):
        alone = tvq.generate(model, ids.tolist(), max_tokens=max_tokens, seed=seed,
                             num_samples=n, sampler=hot, constraint=constraint)  # fmt: skip
        assert [s.ids for s in done[k]] == [s.ids for s in alone.samples], k
    assert cuts and max(steps) >= 4
