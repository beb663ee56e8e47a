"""Structured output (docs/DESIGN.md section 7, "Constraints"): a JSON schema, any JSON
object, a regular expression, a grammar (Lark's syntax, or llama.cpp's GBNF) or a choice
among strings, which the sampled text must match.

The grammar engine is llguidance (Rust, the engine of vLLM's and SGLang's guided
decoding): it takes the model's vocabulary as bytes per token, so a sentencepiece or
byte vocabulary needs no conversion of its own, and gives the tokens allowed next as a
bitmask in tens of microseconds. A row with a constraint samples one token per call of
the compiled loop: before each call the host turns the row's mask into a logit bias of
−1e9 on every token not allowed (the loop already adds a bias [B, N] as a value, so a
new schema compiles nothing and rows without a constraint run as they always did), and
after it the matcher takes the sampled token. An end of document is allowed only where
the grammar may end; a row whose grammar is complete ends with finish_reason "stop".

No JAX here: the CLI and the server check a constraint before anything loads.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np

from tvq.errors import InputError
from tvq.text.settings import BANNED

KINDS = ("json_schema", "json_object", "regex", "grammar", "gbnf", "choice")
MAX_SOURCE_BYTES = 64 * 1024  # the longest schema, expression or grammar accepted
MAX_CHOICES = 1024
# JSON laid out as json.dumps lays it out, no other whitespace: a free layout lets a small
# model fill its answer with blanks (a schema's "x-guidance" may ask for one)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(InputError):
    """A constraint the engine refuses (its own message) or beyond the bounds; the CLI
    exits 2 with it, the server answers 400 naming the field."""


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What the text must match: `kind` (one of KINDS) and its source text (a schema's
    JSON, an expression, a grammar, the choices as a JSON list)."""

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict | str) -> Constraint:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", text).checked()

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object").checked()

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern).checked()

    @classmethod
    def grammar(cls, lark: str) -> Constraint:
        return cls("grammar", lark).checked()

    @classmethod
    def gbnf(cls, text: str) -> Constraint:
        return cls("gbnf", text).checked()

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        return cls("choice", json.dumps(list(options))).checked()

    def checked(self) -> Constraint:
        """self, once the engine accepts it; ConstraintError with its message if not."""
        message = _validate(self.kind, self.source)
        if message:
            raise ConstraintError(message)
        return self

    def grammar_text(self) -> str:
        return _grammar(self.kind, self.source)


@functools.lru_cache(maxsize=256)
def _grammar(kind: str, source: str) -> str:
    """The llguidance grammar of a constraint (ConstraintError if it cannot be one)."""
    from llguidance import LLMatcher

    if kind not in KINDS:
        raise ConstraintError(f"unknown constraint {kind!r}: one of {', '.join(KINDS)}")
    if len(source.encode()) > MAX_SOURCE_BYTES:
        raise ConstraintError(f"the {kind.replace('_', ' ')} is longer than "
                              f"{MAX_SOURCE_BYTES} bytes")  # fmt: skip
    try:
        if kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(_schema(source), defaults=JSON_LAYOUT)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_LAYOUT)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(source)
        if kind == "choice":
            return LLMatcher.grammar_from_lark(_choice_grammar(source))
        if kind == "gbnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark

            source = gbnf_to_lark(source)
        return LLMatcher.grammar_from_lark(source)
    except ConstraintError:
        raise
    except Exception as e:  # noqa: BLE001  (the engine's own message, in one line)
        raise ConstraintError(_one_line(f"invalid {kind.replace('_', ' ')}: {e}")) from None


def _schema(source: str) -> str:
    try:
        schema = json.loads(source)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConstraintError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError("a JSON schema is an object")
    return source


def _choice_grammar(source: str) -> str:
    options = json.loads(source)
    if not options or len(options) > MAX_CHOICES:
        raise ConstraintError(f"a choice takes 1 to {MAX_CHOICES} strings")
    if not all(isinstance(o, str) and o for o in options):
        raise ConstraintError("each choice is a non-empty string")
    # Lark string literals take JSON's escapes
    return "start: " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))


def _validate(kind: str, source: str) -> str:
    """'' if the engine accepts the constraint, else its message (one line)."""
    from llguidance import LLMatcher

    try:
        grammar = _grammar(kind, source)
    except ConstraintError as e:
        return str(e)
    message = LLMatcher.validate_grammar(grammar)
    return _one_line(f"invalid {kind.replace('_', ' ')}: {message}") if message else ""


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())[:500]


@functools.lru_cache(maxsize=4)
def _engine_tokenizer(tokenizer, n_vocab: int):
    """The model's vocabulary for llguidance: each token's bytes (the tokens with none,
    its specials, named as the engine expects), made once per tokenizer."""
    import llguidance

    class Vocabulary:  # what llguidance.TokenizerWrapper reads
        def __init__(self) -> None:
            self.tokens = [tokenizer.token_bytes(i) for i in range(n_vocab)]
            self.special_token_ids = [i for i, b in enumerate(self.tokens) if not b]
            for i in self.special_token_ids:
                self.tokens[i] = b"\xff<special_%d>" % i
            self.eos_token_id, self.bos_token_id = tokenizer.eos_id, None

        def __call__(self, text):
            if isinstance(text, bytes):
                raise TypeError("text, not bytes")
            return tokenizer.encode(text)

    wrapper = llguidance.TokenizerWrapper(Vocabulary())
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=tokenizer.eos_id)


class Guides:
    """The matchers of a batch's rows (None: a row without a constraint), advanced on
    the host: `bias` gives each call's logit bias, `take` each call's sampled tokens."""

    def __init__(self, tokenizer, n_vocab: int, constraints: list[Constraint | None]) -> None:
        self.n_vocab = n_vocab
        self.matchers = [None] * len(constraints)
        if any(constraints):  # (a generation without one never imports the engine)
            from llguidance import LLMatcher

            engine = _engine_tokenizer(tokenizer, n_vocab)
            self.matchers = [None if c is None else LLMatcher(engine, c.grammar_text())
                             for c in constraints]  # fmt: skip

    def __bool__(self) -> bool:
        return any(m is not None for m in self.matchers)

    def mask(self, row: int, matcher=None) -> np.ndarray | None:
        """What the row's constraint (or `matcher`, a copy of its) allows next, [N] bool
        (None: it has none, or it is complete)."""
        matcher = matcher or self.matchers[row]
        if matcher is None or matcher.is_stopped():
            return None
        bits = np.frombuffer(matcher.compute_bitmask(), np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def forced(self, row: int, room: int) -> tuple[list[int], np.ndarray | None]:
        """The tokens the row's grammar forces next (the engine's fast-forward tokens, at
        most `room`), which a speculating row takes without drawing them, and its mask
        after them (its guard); nothing is consumed."""
        matcher = self.matchers[row]
        if matcher is None or matcher.is_stopped() or room <= 0:
            return [], self.mask(row)
        tokens = matcher.compute_ff_tokens()[:room]
        if not tokens:
            return [], self.mask(row)
        after = matcher.deep_copy()
        after.consume_tokens(tokens)
        return tokens, self.mask(row, after)

    def bias(self, base: np.ndarray) -> np.ndarray:
        """base [B, N] (the rows' own logit bias) with BANNED on every token a row's
        constraint does not allow next."""
        out = np.array(base, np.float32, copy=True)
        for row in range(len(self.matchers)):
            allowed = self.mask(row)
            if allowed is not None:
                out[row, ~allowed] = BANNED
        return out

    def masks(self) -> list[np.ndarray | None]:
        """Each row's mask (tvq.decoding.SampleLoop's speculation: a chunk's guard)."""
        return [self.mask(row) for row in range(len(self.matchers))]

    def kept(self, guards: list) -> bool:
        """Whether every row still running has the mask it had at the chunk's start
        (its guard): then a longer chunk is worth speculating."""
        return all(np.array_equal(self.mask(row), guard) for row, guard in enumerate(guards)
                   if guard is not None)  # fmt: skip

    def refused(self, tokens: np.ndarray, live: list[bool]) -> np.ndarray:
        """[B] bool: the live constrained rows whose constraint does not allow their token
        next (nothing is consumed)."""
        out = np.zeros(len(self.matchers), bool)
        for row, matcher in enumerate(self.matchers):
            if matcher is not None and live[row] and not matcher.is_stopped():
                out[row] = matcher.validate_tokens([int(tokens[row])]) != 1
        return out

    def speculated(self, tokens: np.ndarray, drafts: np.ndarray, guards: list,
                   live: list[bool]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """One step of a speculated chunk (docs/DESIGN.md section 7): each row's token
        [B] and first draw [B], drawn again (then they differ) where the draw was
        outside the row's guard (its mask at the chunk's start) → (refused [B]: the row
        draws again under its mask now; cut [B]: the chunk must run again up to here,
        where tokens, changed in place, holds what the allowed rows take). A token drawn
        again under a guard that is still the row's mask is taken; where the mask has
        moved since, the first draw decides, as in a step without a guard."""
        refused = self.refused(drafts, live)
        cut = refused.copy()
        for row in np.flatnonzero((tokens != drafts) & np.asarray(live, bool)):
            if np.array_equal(self.mask(int(row)), guards[row]):
                refused[row] = cut[row] = False  # drawn again under the mask it has
            elif not refused[row]:
                tokens[row], cut[row] = drafts[row], True  # the first draw stands
        return refused, cut

    def take(self, row: int, token: int) -> bool:
        """The row's matcher takes its sampled token → True once its grammar is complete
        (the row ends there). A token it refuses is an error of the engine's."""
        matcher = self.matchers[row]
        if matcher is None:
            return False
        if not matcher.consume_token(token):
            raise ConstraintError(_one_line(f"the constraint refused token {token}: "
                                            f"{matcher.get_error()}"))  # fmt: skip
        return matcher.is_stopped()
