"""Structured output's cost (issue 35's targets), side by side in one run, the built-in
model unless --model:

  1. batch 1, in this process: tokens/s of `tvq.generate` under a JSON schema (an object
     with a long free string) and under a regular expression, against the same without
     a constraint (ignore_eos, --tokens each; rounds alternate, the median of the
     rounds' ratios);
  2. a server, 16 concurrent streaming clients (bench/serve_load.py's mixed clients),
     half of them asking for JSON (guided_json), against all of them free: generated
     tokens/s, rounds alternating on one server, the median ratio;
  3. the same warm server: the first request with a schema never seen before (grammar
     compilation included) against the same request repeated (median of 3);
  4. validity: 12 JSON schemas (nested objects, arrays with bounds, enums, numbers with
     ranges, strings with patterns and formats, optional fields, anyOf), 5 regular
     expressions and 2 grammars, 20 seeds each at temperature 1 (max_tokens 400): every
     output must parse and validate (jsonschema's validator) or match in full.

    python bench/structured.py [--tokens 200] [--rounds 3] [--model DIR] [--only validity]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from serve_load import MIXED, level, post, start_server, stop_server  # noqa: E402

SPEECH = {"type": "object", "properties": {"speaker": {"type": "string", "maxLength": 12},
                                           "speech": {"type": "string"}},
          "required": ["speaker", "speech"]}  # fmt: skip
PROMPT = "HAMLET. To be, or not to be, that is the question:"


def batch_one(args: argparse.Namespace) -> dict:
    import tvq
    from tvq.text.constraints import Constraint

    model = tvq.load(args.model)
    kinds = {"free": None, "schema": Constraint.json_schema(SPEECH),
             "regex": Constraint.regex(r"[A-Za-z ,.;:'!?\n-]+")}  # fmt: skip
    sampler = tvq.Sampler(temperature=0.8, top_p=0.95)

    def rate(constraint) -> float:
        started = time.perf_counter()
        result = tvq.generate(model, PROMPT, max_tokens=args.tokens, seed=1, sampler=sampler,
                              constraint=constraint, ignore_eos=True)  # fmt: skip
        return result.generated_tokens / (time.perf_counter() - started)

    for constraint in kinds.values():  # compiles, and makes the engine's vocabulary
        rate(constraint)
    rounds = [{name: rate(c) for name, c in kinds.items()} for _ in range(args.rounds)]
    out = {name: statistics.median(r[name] for r in rounds) for name in kinds}
    for name in ("schema", "regex"):
        out[f"{name}_ratio"] = statistics.median(r[name] / r["free"] for r in rounds)
    return out


NAME = {"type": "string", "minLength": 1, "maxLength": 16}
AGE = {"type": "integer", "minimum": 0, "maximum": 120}
SCHEMAS = {
    "flat object": {
        "type": "object",
        "properties": {"name": NAME, "age": AGE},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested objects": {
        "type": "object",
        "properties": {
            "scene": {
                "type": "object",
                "properties": {
                    "place": NAME,
                    "time": {
                        "type": "object",
                        "properties": {"act": AGE},
                        "required": ["act"],
                    },
                },
                "required": ["place", "time"],
            }
        },
        "required": ["scene"],
    },
    "array with bounds": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4},
    "enum": {
        "type": "object",
        "properties": {"mood": {"enum": ["merry", "sad", "wroth"]}},
        "required": ["mood"],
    },
    "numbers with ranges": {
        "type": "object",
        "properties": {
            "act": {"type": "integer", "minimum": 1, "maximum": 5},
            "weight": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5},
        },
        "required": ["act", "weight"],
    },
    "string with a pattern": {
        "type": "object",
        "properties": {"line": {"type": "string", "pattern": "^[A-Z][a-z]{2,8}$"}},
        "required": ["line"],
    },
    "string formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "mail": {"type": "string", "format": "email", "maxLength": 40},
        },
        "required": ["day", "mail"],
    },
    "optional fields": {
        "type": "object",
        "properties": {"who": NAME, "aside": NAME, "exit": {"type": "boolean"}},
        "required": ["who"],
    },
    "anyOf": {
        "type": "object",
        "properties": {
            "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, NAME]}
        },
        "required": ["value"],
    },
    "array of objects": {
        "type": "array",
        "minItems": 1,
        "maxItems": 3,
        "items": {
            "type": "object",
            "properties": {"speaker": NAME, "words": AGE},
            "required": ["speaker", "words"],
        },
    },
    "boolean and null": {
        "type": "object",
        "properties": {"alive": {"type": "boolean"}, "ghost": {"type": "null"}},
        "required": ["alive", "ghost"],
    },
    "const and list of enums": {
        "type": "object",
        "properties": {
            "play": {"const": "Hamlet"},
            "acts": {"type": "array", "items": {"enum": [1, 2, 3, 4, 5]}, "maxItems": 5},
        },
        "required": ["play", "acts"],
    },
}
REGEXES = [
    r"[A-Z][a-z]+, [a-z]+\.",
    r"Act [1-5], scene [1-9]",
    r"[0-9]{3}-[0-9]{4}",
    r"(yes|no|perhaps), my lord",
    r"[a-z]+( [a-z]+){2,5}[.!?]",
]
GRAMMARS = {
    "lark": 'start: "To " VERB " or not to " VERB\nVERB: "be" | "sleep" | "dream"',
    "gbnf": 'root ::= "Act " [1-5] ", " name\nname ::= [A-Z] [a-z] [a-z]?',
}


def closed(schema):
    """The schema with no properties beyond those it names, in every object (JSON
    schema's default allows any, which a small model fills with free strings that never
    end): as an application asks for a fixed shape."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [closed(v) for v in schema]
    return schema


def validity(args: argparse.Namespace) -> dict:
    """Every output of every constraint, 20 seeds at temperature 1, checked."""
    import re

    import jsonschema

    import tvq
    from tvq.batching import BatchItem
    from tvq.text.constraints import Constraint

    model = tvq.load(args.model)
    ids = model.tokenizer.encode(PROMPT)
    hot = tvq.Sampler(temperature=1.0)
    schemas = {name: closed(schema) for name, schema in SCHEMAS.items()}
    cases = [(f"schema: {name}", Constraint.json_schema(schema),
              lambda text, schema=schema: jsonschema.validate(json.loads(text), schema) is None)
             for name, schema in schemas.items()]  # fmt: skip
    cases += [(f"regex: {r}", Constraint.regex(r), re.compile(r).fullmatch) for r in REGEXES]
    cases += [("grammar (Lark)", Constraint.grammar(GRAMMARS["lark"]),
               re.compile(r"To (be|sleep|dream) or not to (be|sleep|dream)").fullmatch),
              ("grammar (GBNF)", Constraint.gbnf(GRAMMARS["gbnf"]),
               re.compile(r"Act [1-5], [A-Z][a-z][a-z]?").fullmatch)]  # fmt: skip
    out = {}
    for name, constraint, valid in cases:
        items = [BatchItem(ids, 400, seed, 1, (), hot, 0, False, constraint) for seed in range(20)]
        passed = 0
        for (sample,) in tvq.generate_batch(model, items):
            try:
                passed += bool(valid(sample.text)) and sample.finish_reason in ("stop", "eos")
            except (ValueError, jsonschema.ValidationError):
                pass
        out[name] = passed
    return out


def served(args: argparse.Namespace) -> dict:
    process, port = start_server(args.model)
    half = [s | ({"guided_json": SPEECH} if i % 2 else {}) for i, s in enumerate(MIXED)]
    try:
        level(port, 16, 4, 32, MIXED)  # warm-up of both loads
        level(port, 16, 4, 32, half)
        rounds = []
        for _ in range(args.rounds):
            free = level(port, 16, 4, 32, MIXED)["tokens_per_second"]
            bound = level(port, 16, 4, 32, half)["tokens_per_second"]
            rounds.append((free, bound))
        body = {"prompt": PROMPT, "max_tokens": 24, "seed": 1}
        firsts, repeats = [], []
        for i in range(3):  # a schema never seen: another field name each time
            schema = {"type": "object", "properties": {f"line{i}": {"type": "string"}}}
            firsts.append(post(port, body | {"guided_json": schema})[1])
            repeats.append(statistics.median(post(port, body | {"guided_json": schema})[1]
                                             for _ in range(3)))  # fmt: skip
    finally:
        stop_server(process)
    return {"free": statistics.median(f for f, _ in rounds),
            "half": statistics.median(b for _, b in rounds),
            "ratio": statistics.median(b / f for f, b in rounds),
            "first_over_repeated": statistics.median(f / r for f, r in zip(firsts, repeats,
                                                                           strict=True)),
            "first": firsts, "repeated": repeats}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", help="a model directory (default: the built-in model)")
    parser.add_argument("--only", choices=["validity"], help="only the validity check")
    args = parser.parse_args()
    valid = validity(args)
    print(f"# validity, 20 seeds each at temperature 1: {machine()}; model "
          f"{args.model or 'built-in'}")  # fmt: skip
    print("| constraint | valid of 20 |\n| --- | ---: |")
    for name, passed in valid.items():
        print(f"| {name} | {passed} |")
    print(f"all valid: {sum(valid.values())} of {20 * len(valid)} (target: every one)")
    if args.only:
        return
    one = batch_one(args)
    two = served(args)
    print(f"# bench/structured.py --tokens {args.tokens} --rounds {args.rounds}: {machine()}; "
          f"model {args.model or 'built-in'}")  # fmt: skip
    print("| measurement | free | constrained | ratio | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in ("schema", "regex"):
        print(f"| batch 1, {name}, tokens/s | {one['free']:.0f} | {one[name]:.0f} | "
              f"{one[f'{name}_ratio']:.2f} | ≥ 0.7 |")  # fmt: skip
    print(f"| 16 mixed clients, half with guided_json, tokens/s | {two['free']:.0f} | "
          f"{two['half']:.0f} | {two['ratio']:.2f} | ≥ 0.8 |")  # fmt: skip
    pairs = ", ".join(f"{f:.2f}/{r:.2f}" for f, r in zip(two["first"], two["repeated"],
                                                          strict=True))  # fmt: skip
    print(f"| a never-seen schema's request ÷ the same repeated (s: {pairs}) | | | "
          f"{two['first_over_repeated']:.2f} | ≤ 1.2 |")  # fmt: skip


if __name__ == "__main__":
    main()
