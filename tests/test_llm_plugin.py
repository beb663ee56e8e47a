"""The `llm` plugin (tvq/integrations/llm_plugin.py) with a real llm install: the text
`llm` prints is the text tvq.generate gives for the same settings, a conversation feeds
only each turn's new tokens and continues exactly as one generation over the whole
document would, and bad options fail with llm's one-line error."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import llm
import pytest
from click.testing import CliRunner
from llm.cli import cli as llm_cli
from llm.parts import Message, TextPart

import tvq
from tvq.integrations import llm_plugin
from tvq.text.settings import TERMINAL

PROMPT = "To be, or not"


def sampler(temperature: float) -> tvq.Sampler:
    """The plugin's default sampler, at this temperature."""
    return dataclasses.replace(TERMINAL.sampler, temperature=temperature)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random byte-level model, saved: fast, and a text's tokens are its bytes."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    config = tvq.ModelConfig(d_model=16, d_k=8, d_v=8, n_head=2, n_code=4, n_layer=1,
                             n_vocab=259, mem_len=8)  # fmt: skip
    tvq.Model.init(config, seed=0).with_tokenizer(tvq.ByteTokenizer()).save(folder)
    return folder


def run_llm(*args: str, user_path) -> subprocess.CompletedProcess:
    """The `llm` command in a subprocess, its files (logs.db) under user_path."""
    env = dict(os.environ, LLM_USER_PATH=str(user_path),
               TVQ_CACHE_DIR=os.environ.get("TVQ_TEST_CACHE", "/tmp/tvq-test-cache"))  # fmt: skip
    return subprocess.run([sys.executable, "-m", "llm", *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_llm_prints_what_generate_gives(tmp_path):
    done = run_llm("-m", "tvq-builtin", PROMPT, "-o", "max_tokens", "8", "-o", "seed", "1",
                   "-o", "temperature", "0", user_path=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    expected = tvq.generate(tvq.load(), PROMPT, max_tokens=8, seed=1, sampler=sampler(0))
    assert expected.generated_tokens == 8 and expected.samples[0].text
    assert done.stdout == expected.samples[0].text + "\n"  # llm ends the stream with a newline
    assert (tmp_path / "logs.db").exists()  # llm logged there, not in the user's folder


def test_model_directory_option(tiny_dir, tmp_path):
    done = run_llm("-m", "tvq-builtin", "ROMEO.", "-o", "model", str(tiny_dir), "-o",
                   "max_tokens", "10", "-o", "seed", "5", "--no-stream",
                   user_path=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    tiny = tvq.load(tiny_dir)
    expected = tvq.generate(tiny, "ROMEO.", max_tokens=10, seed=5, sampler=sampler(0.8))
    assert done.stdout == expected.samples[0].text + "\n"


def test_conversation_feeds_only_new_tokens(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    model = llm.get_model("tvq-builtin")
    assert isinstance(model, llm_plugin.TvqModel)
    settings = {"max_tokens": 12, "seed": 3, "temperature": 0.9, "model": str(tiny_dir)}
    tiny = tvq.load(tiny_dir)
    encode = tiny.tokenizer.encode

    def alone(prompt: str | list[int]) -> tvq.Generation:
        return tvq.generate(tiny, prompt, max_tokens=12, seed=3, sampler=sampler(0.9))

    conversation = model.conversation()
    first = conversation.prompt("ROMEO.", **settings)
    first_alone = alone("ROMEO.")
    assert first.text() == first_alone.samples[0].text
    assert first.response_json["finish_reason"] == "length"  # so its state is kept
    second = conversation.prompt("JULIET.", **settings)
    # The state holds the sampled tokens (a random model's bytes need not be UTF-8, so
    # its text need not encode back to them): one generation over the same tokens.
    tokens = encode("ROMEO.") + first_alone.samples[0].ids + encode("\nJULIET.")
    assert second.text() == alone(tokens).samples[0].text
    assert second.response_json["resumed"] is True
    assert second.input_tokens == len(encode("\nJULIET."))  # only the new turn was fed
    assert second.response_json["document_tokens"] == len(tokens) + 12

    # A process that does not hold the state (here a new model instance) rebuilds it by
    # feeding the whole document's text once, and continues as one generation would.
    conversation.model = llm_plugin.TvqModel()
    third = conversation.prompt("HAMLET.", **settings)
    document = "ROMEO." + first.text() + "\nJULIET." + second.text() + "\nHAMLET."
    assert third.text() == alone(document).samples[0].text
    assert third.response_json["resumed"] is False
    assert third.input_tokens == len(encode(document))


def test_turn_ended_by_a_stop_string_keeps_its_state(tiny_dir, tmp_path, monkeypatch):
    """The state holds the stop string (llm logs the response without it): the next turn
    still feeds only its own tokens, and goes on from what the model really read."""
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    tiny = tvq.load(tiny_dir)
    sample = tvq.generate(tiny, "ROMEO.", max_tokens=12, seed=4, sampler=sampler(0.9)).samples[0]
    assert len(sample.text) >= 6  # the stop string below is met
    stop = sample.text[4:6]
    settings = {"max_tokens": 12, "seed": 4, "temperature": 0.9, "model": str(tiny_dir)}
    conversation = llm.get_model("tvq-builtin").conversation()
    first = conversation.prompt("ROMEO.", stop=stop, **settings)
    assert first.text() == sample.text[: sample.text.index(stop)]
    assert first.response_json["finish_reason"] == "stop"
    second = conversation.prompt("JULIET.", **settings)
    stopped = tvq.generate(tiny, "ROMEO.", max_tokens=12, seed=4, sampler=sampler(0.9),
                           stop=[stop])  # fmt: skip
    expected = tvq.generate(tiny, "\nJULIET.", max_tokens=12, seed=4, sampler=sampler(0.9),
                            context=stopped.context)  # fmt: skip
    assert second.text() == expected.samples[0].text
    assert second.response_json["resumed"] is True
    assert second.input_tokens == len(tiny.tokenizer.encode("\nJULIET."))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("temperature", "-1", "temperature\n  Input should be greater than or equal to 0"),
        ("temperature", "nan", "temperature\n  Input should be a finite number"),
        ("top_p", "0", "top_p\n  Input should be greater than 0"),
        ("min_p", "1", "min_p\n  Input should be less than 1"),
        ("top_k", "2.5", "top_k\n  Input should be a valid integer"),
        ("max_tokens", "-3", "max_tokens\n  Input should be greater than or equal to 0"),
        ("seed", "-1", "seed\n  Input should be greater than or equal to 0"),
        ("stop", "", "stop\n  Value error, a stop string must not be empty"),
        ("stop", '["a", 1]', "stop\n  Value error, stop must be a string or a list of strings"),
        ("model", "/no/such/dir", "model\n  Value error, '/no/such/dir' is not a directory"),
    ],
)
def test_bad_option_is_one_error(option, value, message, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    result = CliRunner().invoke(llm_cli, ["-m", "tvq-builtin", "x", "-o", option, value])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {message}")
    assert "Traceback" not in result.output


def test_bad_option_in_a_real_process(tmp_path):
    done = run_llm("-m", "tvq-builtin", "x", "-o", "top_p", "2", user_path=tmp_path)
    assert done.returncode == 1
    assert "Error: top_p\n  Input should be less than or equal to 1\n" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_not_a_model_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(llm_cli, ["-m", "tvq-builtin", "x", "-o", "model", str(empty)])
    assert result.exit_code == 1
    assert result.output == f"Error: {empty} is not a tvq model directory: no config.json\n"


def test_stop_is_one_string_or_a_json_list():
    assert llm_plugin.TvqOptions(stop="\\n").stop == ["\\n"]  # taken as it is
    assert llm_plugin.TvqOptions(stop='["\\n\\n", "END"]').stop == ["\n\n", "END"]
    assert llm_plugin.TvqOptions(stop=["a", "b"]).stop == ["a", "b"]


def test_document_joins_turns_with_a_newline():
    def message(role: str, text: str) -> Message:
        return Message(role=role, parts=[TextPart(text=text)])

    chain = [message("system", "Act I."), message("user", "ROMEO."),
             message("assistant", " Hi"), message("user", "JULIET."),
             message("assistant", " Lo"), message("user", "NURSE.")]  # fmt: skip
    assert llm_plugin.document(chain) == (
        "Act I.\nROMEO. Hi\nJULIET. Lo",
        "Act I.\nROMEO. Hi\nJULIET. Lo\nNURSE.",
    )
    assert llm_plugin.document(chain[1:2]) == ("", "ROMEO.")


def test_schemas(tiny_dir, tmp_path, monkeypatch):
    """`llm --schema` (llm's concise syntax) and `--schema-multi`: the text is JSON the
    schema accepts, and llm keeps it as such (in this process: llm's own command)."""
    import json

    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path))
    base = ["-m", "tvq-builtin", "-o", "model", str(tiny_dir), "--no-stream"]
    # llm's concise syntax: a random model's free string may run to max_tokens, so the
    # start shows the schema; a bounded JSON schema is always complete, and parses
    done = CliRunner().invoke(llm_cli, [*base, "A person:", "--schema", "name, age int",
                                        "-o", "max_tokens", "12", "-o", "seed", "3"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert done.output.startswith('{"name": "')
    bounded = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                "age": {"type": "integer", "maximum": 99}},
               "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    for seed in ("3", "4"):
        done = CliRunner().invoke(llm_cli, [*base, "A person:", "--schema", json.dumps(bounded),
                                            "-o", "seed", seed])  # fmt: skip
        assert done.exit_code == 0, done.output
        person = json.loads(done.output)
        assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    # --schema-multi wraps the schema in {"items": [...]} (arrays and additional keys
    # unbounded, so a random model's text is cut by max_tokens: its start shows the schema)
    done = CliRunner().invoke(llm_cli, [*base, "People:", "--schema-multi", "name, age int",
                                        "-o", "max_tokens", "12", "-o", "seed", "4"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert done.output.startswith('{"items": [')
