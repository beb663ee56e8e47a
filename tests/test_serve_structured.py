"""Structured output over HTTP (tvq/serving/structured.py), with the official openai
client: response_format (json_object, json_schema), vLLM's guided_* fields in
extra_body, llama.cpp's grammar; one constraint at a time; a bad one is a 400 naming its
field; constrained and free requests share the running batch, the free one getting
exactly what it gets alone."""

import json
import re
import threading

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
