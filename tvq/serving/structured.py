"""The fields of a completions request that constrain its text (docs/DESIGN.md section
13): OpenAI's `response_format`, vLLM's `guided_json`, `guided_regex`, `guided_choice`
and `guided_grammar`, llama.cpp's `json_schema` and `grammar` (GBNF), each turned into a
tvq.text.constraints.Constraint. At most one of them; a bad one is a 400 naming its field
with the grammar engine's own message.
"""

from __future__ import annotations

from typing import Any

from tvq.serving.protocol import ApiError, CompletionRequest, parse_completion
from tvq.text.constraints import Constraint, ConstraintError

FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
          "json_schema", "grammar")  # fmt: skip


def parse_request(body: Any, tokenizer, n_vocab: int, settings) -> CompletionRequest:
    """parse_completion, with the request's constraint (ApiError 400 naming a field)."""
    request = parse_completion(body, tokenizer, n_vocab, settings)
    request.constraint = constraint_of(body)
    return request


def constraint_of(body: dict) -> Constraint | None:
    """The request's constraint, None for none (or response_format text)."""
    given = [f for f in FIELDS if body.get(f) is not None]
    if given == ["response_format"] and _format_type(body["response_format"]) == "text":
        return None
    if len(given) > 1:
        raise ApiError(400, f"give one constraint at a time: {', '.join(map(repr, given))}",
                       given[1])  # fmt: skip
    if not given:
        return None
    field = given[0]
    try:
        return _parse(field, body[field])
    except ConstraintError as e:
        raise ApiError(400, f"'{field}': {e}", field) from None


def _parse(field: str, value: Any) -> Constraint:
    if field == "response_format":
        kind = _format_type(value)
        if kind == "json_object":
            return Constraint.json_object()
        schema = value.get("json_schema")
        if kind != "json_schema" or not isinstance(schema, dict) or "schema" not in schema:
            raise ConstraintError("'type' is text, json_object, or json_schema with "
                                  "'json_schema': {'schema': ...}")  # fmt: skip
        return Constraint.json_schema(_schema(schema["schema"]))
    if field in ("guided_json", "json_schema"):
        return Constraint.json_schema(_schema(value))
    if field == "guided_choice":
        if not isinstance(value, list):
            raise ConstraintError("a list of strings")
        return Constraint.choice(value)
    if not isinstance(value, str):
        raise ConstraintError("a string")
    if field == "guided_regex":
        return Constraint.regex(value)
    if field == "grammar" or "::=" in value:  # llama.cpp's GBNF
        return Constraint.gbnf(value)
    return Constraint.grammar(value)  # Lark's syntax, llguidance's


def _format_type(value: Any) -> str:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object",
                                                                "json_schema"):  # fmt: skip
        raise ApiError(400, "'response_format': an object whose 'type' is text, json_object "
                       "or json_schema", "response_format")  # fmt: skip
    return value["type"]


def _schema(value: Any) -> dict | str:
    if not isinstance(value, (dict, str, bool)):
        raise ConstraintError("a JSON schema is an object (or its JSON text)")
    return value if not isinstance(value, bool) else ({} if value else {"not": {}})
