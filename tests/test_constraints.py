"""Structured output (tvq/text/constraints.py, docs/DESIGN.md section 7): generated text
matches a JSON schema, a JSON object, a regular expression, a grammar or a choice; a row
ends with "stop" where its grammar is complete and with "length" where max_tokens cuts
it; a new constraint compiles nothing; a bad one is a one-line error naming the option."""

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import save_byte_model
from tvq import decoding
from tvq.batching import BatchItem
from tvq.runtime import decode_loop
from tvq.text.constraints import Constraint, ConstraintError
from tvq.text.sampling import SamplerRows
from tvqcli.main import app

GREEDY = tvq.Sampler(temperature=0)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_byte_model(tmp_path_factory.mktemp("constraints") / "tiny", seed=5)


@pytest.fixture(scope="module")
def model(model_dir):
    return tvq.load(model_dir)


def test_samples_match_their_constraint_and_end_where_it_is_complete(model):
    cases = [
        (Constraint.json_schema(SCHEMA), lambda t: _is_person(json.loads(t))),
        (Constraint.regex(r"[0-9]{3}-[a-z]{2,4}"), re.compile(r"[0-9]{3}-[a-z]{2,4}").fullmatch),
        (Constraint.choice(["Hamlet", "Ophelia", "the King"]),
         lambda t: t in ("Hamlet", "Ophelia", "the King")),
        (Constraint.grammar('start: "to " VERB " or not to " VERB\nVERB: "be" | "sleep"'),
         re.compile(r"to (be|sleep) or not to (be|sleep)").fullmatch),
        (Constraint.gbnf('root ::= "ay" | "nay" " " [0-9]'),
         lambda t: t == "ay" or re.fullmatch(r"nay [0-9]", t)),
    ]  # fmt: skip
    for constraint, valid in cases:
        result = tvq.generate(model, "Q: ", max_tokens=200, seed=3, num_samples=3,
                              sampler=tvq.Sampler(temperature=1.0),
                              constraint=constraint)  # fmt: skip
        for sample in result.samples:
            assert valid(sample.text), (constraint.kind, sample.text)
            assert sample.finish_reason in ("stop", "eos"), (constraint.kind, sample.text)


def _is_person(value) -> bool:
    return (set(value) == {"name", "age"} and isinstance(value["name"], str)
            and len(value["name"]) <= 8 and 0 <= value["age"] <= 120)  # fmt: skip


def test_max_tokens_cuts_a_constraint_short_as_length(model):
    result = tvq.generate(model, "Q: ", max_tokens=4, seed=1, constraint=Constraint.json_object(),
                          sampler=tvq.Sampler(temperature=1.0))  # fmt: skip
    sample = result.samples[0]
    assert sample.finish_reason == "length" and len(sample.ids) == 4
    assert sample.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):  # cut short: not JSON (documented)
        json.loads(sample.text)


def test_an_end_of_document_only_where_the_grammar_may_end(model):
    """A free row of this model samples its end-of-document token early (biased here);
    under a constraint it cannot until the text is complete."""
    eos = model.tokenizer.eos_id
    eager = tvq.Sampler(temperature=1.0, logit_bias=((eos, 8.0),))
    free = tvq.generate(model, "Q: ", max_tokens=40, seed=2, num_samples=4, sampler=eager)
    assert any(s.finish_reason == "eos" and len(s.ids) < 10 for s in free.samples)
    bound = tvq.generate(model, "Q: ", max_tokens=40, seed=2, num_samples=4, sampler=eager,
                         constraint=Constraint.regex(r"[a-z]{5,}"))  # fmt: skip
    for sample in bound.samples:
        assert re.fullmatch(r"[a-z]{5,}", sample.text), sample.text


def test_a_new_constraint_compiles_nothing(model):
    tvq.generate(model, "Q: ", max_tokens=5, seed=1, constraint=Constraint.regex("[a-z]+"))
    compiled = decode_loop.decode_chunk.jitted._cache_size()
    for constraint in (Constraint.json_schema(SCHEMA), Constraint.choice(["a", "b"]),
                       Constraint.regex("[0-9]+x")):  # fmt: skip
        tvq.generate(model, "Q: ", max_tokens=5, seed=1, constraint=constraint)
    assert decode_loop.decode_chunk.jitted._cache_size() == compiled


def test_a_constraint_that_allows_the_text_changes_nothing():
    """The built-in model's greedy text under a constraint its free text already meets
    (any text: the bias is 0 wherever it samples) is the free text, token for token,
    with the same log-probs: the bias is the only change, and only where it bans."""
    model = tvq.load()
    plain = tvq.generate(model, "HAMLET. To be", max_tokens=12, sampler=GREEDY)
    bound = tvq.generate(model, "HAMLET. To be", max_tokens=12, sampler=GREEDY,
                         constraint=Constraint.regex(r"(?s:.*)"))  # fmt: skip
    assert plain.samples[0].ids == bound.samples[0].ids
    np.testing.assert_allclose(plain.samples[0].log_probs, bound.samples[0].log_probs,
                               atol=1e-6)  # fmt: skip


def test_bad_constraints_are_refused_with_the_engines_message():
    for make, text in [
        (lambda: Constraint.regex("[a-"), "unclosed character class"),
        (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
        (lambda: Constraint.json_schema({"type": "nonsense"}), "nonsense"),
        (lambda: Constraint.choice([]), "1 to"),
        (lambda: Constraint.grammar("start: ("), "invalid grammar"),
        (lambda: Constraint.json_schema({"enum": ["x" * 70_000]}), "longer"),
    ]:
        with pytest.raises(ConstraintError) as info:
            make()
        assert text in str(info.value) and "\n" not in str(info.value)


def test_the_command_line(model_dir, tmp_path):
    runner = CliRunner()
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["generate", "Q: ", "-m", str(model_dir), "--seed", "1", "-n", "200", "--no-cache"]
    result = runner.invoke(app, [*base, "--json-schema", str(schema), "--json"])
    assert result.exit_code == 0, result.output
    assert _is_person(json.loads(json.loads(result.stdout.splitlines()[0])["text"]))
    result = runner.invoke(app, [*base, "--choice", "yes", "--choice", "no"])
    assert result.exit_code == 0 and result.stdout in ("yes", "no", "yes\n", "no\n")
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= "ab" [0-9]')
    result = runner.invoke(app, [*base, "--grammar", str(grammar)])
    assert result.exit_code == 0 and re.fullmatch(r"ab[0-9]\n?", result.stdout)
    for options, message in [
        (["--regex", "a", "--choice", "b"], "one constraint at a time"),
        (["--regex", "[a-"], "--regex: invalid regex"),
        (["--json-schema", "{nope"], "--json-schema: the JSON schema"),
        (["--json-schema", str(tmp_path / "none.json")], "cannot be read"),
    ]:
        result = runner.invoke(app, [*base, *options])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output


CONSTRAINTS = [Constraint.json_schema(SCHEMA), Constraint.regex(r"[a-z ]{3,30}\."),
               Constraint.choice(["Hamlet", "Ophelia"])]  # fmt: skip


def test_speculation_keeps_the_greedy_text_of_one_masked_step_at_a_time(model, monkeypatch):
    """Constrained rows sample a chunk unmasked and keep what the constraint allows
    (tvq/decoding.py SampleLoop): greedy, that is the masked argmax at every step."""
    speculated = [tvq.generate(model, prompt, max_tokens=60, sampler=GREEDY, constraint=c)
                  for prompt in ("Q: ", "A: ") for c in CONSTRAINTS]  # fmt: skip
    monkeypatch.setattr(SamplerRows, "counting", lambda rows: True)  # no speculation
    stepped = [tvq.generate(model, prompt, max_tokens=60, sampler=GREEDY, constraint=c)
               for prompt in ("Q: ", "A: ") for c in CONSTRAINTS]  # fmt: skip
    for fast, slow in zip(speculated, stepped, strict=True):
        assert fast.samples[0].ids == slow.samples[0].ids
        np.testing.assert_allclose(fast.samples[0].log_probs, slow.samples[0].log_probs,
                                   atol=1e-6)  # fmt: skip


def test_speculating_rows_are_each_what_they_are_alone(model):
    """Under speculation a refused row draws again with a fresh key while its
    neighbours keep their tokens: every row's text is its own, as alone."""
    prompt = model.tokenizer.encode("Q: ")
    hot = tvq.Sampler(temperature=1.0)
    items = [BatchItem(prompt, max_tokens=40, seed=seed, constraint=c, sampler=hot)
             for seed, c in enumerate([*CONSTRAINTS, None])]  # fmt: skip
    together = tvq.generate_batch(model, items)
    for item, samples in zip(items, together, strict=True):
        assert [s.ids for s in tvq.generate_batch(model, [item])[0]] == [s.ids for s in samples]


def test_a_guard_and_forced_tokens_change_the_calls_not_the_samples(model, monkeypatch):
    """A chunk's guard (each row's mask at its start) draws a refused token again inside
    the loop (tvq.text.sampling.guarded_tokens), a chunk cut short runs again up to where
    a token must be drawn again, and the tokens a grammar forces are fed without a draw
    (Guides.forced; one tokenization of each byte here): the samples are exactly those
    of one step a call under the row's mask then, with no token fed, in far fewer
    calls. Bytes 0-127 only: a random model then writes a newline (refused in a JSON
    string) every few tokens."""
    from tvq.text.constraints import Guides

    calls, cuts = [], []
    real, speculated = decoding.run_chunk, Guides.speculated
    monkeypatch.setattr(decoding, "run_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(Guides, "speculated", lambda *a: cuts.append(speculated(*a)[1].any())
                        or (None, np.asarray([cuts[-1]])))  # fmt: skip
    hot = tvq.Sampler(temperature=1.0, logit_bias=tuple((3 + b, -100.0) for b in range(128, 256)))
    speech = {"type": "object", "properties": {"who": {"type": "string", "maxLength": 6},
                                               "speech": {"type": "string"}},
              "required": ["who", "speech"]}  # fmt: skip
    cases = [(Constraint.json_schema(speech), seed) for seed in range(3)]
    cases += [(c, 7) for c in CONSTRAINTS] + [(Constraint.regex(r"[a-z ]{3,30}[.!?]"), 8)]

    def run() -> list:
        calls.clear()
        out = [tvq.generate(model, "Q: ", max_tokens=80, seed=seed, sampler=hot, num_samples=2,
                            constraint=c) for c, seed in cases]  # fmt: skip
        return out, len(calls)

    (fast, fast_calls) = run()
    assert any(cuts)
    monkeypatch.setattr(Guides, "forced", lambda guides, row, room: ([], guides.mask(row)))
    monkeypatch.setattr(Guides, "kept", lambda guides, guards: False)  # one step a call
    (stepped, stepped_calls) = run()
    for a_run, b_run in zip(fast, stepped, strict=True):
        for a, b in zip(a_run.samples, b_run.samples, strict=True):
            assert a.ids == b.ids
            np.testing.assert_allclose(a.log_probs, b.log_probs, atol=1e-6)
    assert fast_calls < 0.5 * stepped_calls, (fast_calls, stepped_calls)


def test_speculation_samples_several_tokens_per_call(model, monkeypatch):
    """Text the constraint mostly allows (ASCII but newlines) takes a few calls, where
    one masked step at a time took one a token."""
    calls = []
    real = decoding.run_chunk
    monkeypatch.setattr(decoding, "run_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    ascii_only = tuple((3 + b, -100.0) for b in range(128, 256))  # bytes are ids b + 3
    result = tvq.generate(model, "Q: ", max_tokens=64, seed=1, ignore_eos=True,
                          sampler=tvq.Sampler(temperature=1.0, logit_bias=ascii_only),
                          constraint=Constraint.regex(r"[^\n]*"))  # fmt: skip
    assert len(result.samples[0].ids) == 64 and re.fullmatch(r"[^\n]*", result.samples[0].text)
    assert len(calls) < 64 / 4
