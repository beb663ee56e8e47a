"""Generation settings, each default, range and message stated once (docs/DESIGN.md
section 7): the `Sampler`, a request's sampling settings, and the ranges of every
numeric setting (`RANGES`), with what a person at a terminal gets by default
(`TERMINAL`). No JAX here: a CLI's options read it before JAX starts.

The Sampler checks its fields here, `tvq.generate` its own (max_tokens, num_samples,
seed, logprobs, the stop strings' lengths), and every front end reads the same
table: `tvq generate` and `tvq chat` turn a `SettingError` into a usage error naming
the option, `tvq serve` into a 400 naming the field (tightened by its own limits with
`Range.capped`), and the llm plugin declares its options' bounds from it. A value is
checked before any array is made, so no setting can overflow one.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

from tvq.errors import InputError, is_int

INT32_MAX = 2**31 - 1  # what an int32 array of the compiled loop holds
# A loop that keeps log-probs finds this many alternatives per token (or logprobs, if
# more): any logprobs up to it runs one compiled program (tvq generate's, a server's).
LOGPROB_ALTERNATIVES = 20
BANNED = -1e9  # the logit bias of a token a constraint does not allow: exp → 0
REPEAT_WINDOW = 256  # the most recent tokens a repetition penalty can look back over


class SettingError(InputError):
    """A setting out of its range: its name (as `Range` knows it), what it must be, and
    the value given. str() names it with dashes (top-p); front ends name it their way
    (`message`)."""

    def __init__(self, name: str, requirement: str, value: Any) -> None:
        self.name, self.requirement, self.value = name, requirement, value
        super().__init__(self.message(name.replace("_", "-")))

    def message(self, label: str) -> str:
        return f"{label} must be {self.requirement}, got {self.value!r}"


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric setting: an int or a finite float, within [low, high] (either end open,
    or absent). `note` follows the bound in messages (the option that sets it)."""

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def check(self, name: str, value: Any) -> Any:
        """The value (a float setting as a float), or SettingError."""
        if self.kind is int and not is_int(value):
            raise SettingError(name, "an integer", value)
        if self.kind is float:
            if not (is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise SettingError(name, "a finite number", value)
            value = float(value)
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and (
            value >= self.high if self.open_high else value > self.high
        )
        if below or above:
            raise SettingError(name, self.requirement(above), value)
        return value

    def requirement(self, above: bool = False) -> str:
        """What a value must be: an interval where an end is open ("in (0, 1]"), else the
        bound it crossed (">= 0", "<= 256")."""
        if self.low is not None and self.high is not None and (self.open_low or self.open_high):
            text = (f"in {'(' if self.open_low else '['}{_number(self.low)}, "
                    f"{_number(self.high)}{')' if self.open_high else ']'}")  # fmt: skip
        elif above or self.low is None:
            text = f"{'<' if self.open_high else '<='} {_number(self.high)}"
        else:
            text = f"{'>' if self.open_low else '>='} {_number(self.low)}"
        return f"{text} {self.note}".rstrip()

    def capped(self, high: float, note: str) -> Range:
        """The range with a lower upper bound (a server's limit, named by `note`)."""
        if self.high is not None and self.high <= high:
            return self
        return dataclasses.replace(self, high=high, open_high=False, note=note)

    def pydantic(self) -> dict[str, float]:
        """The bounds as pydantic Field arguments (ge, gt, le, lt)."""
        bounds = {}
        if self.low is not None:
            bounds["gt" if self.open_low else "ge"] = self.low
        if self.high is not None:
            bounds["lt" if self.open_high else "le"] = self.high
        return bounds


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


RANGES: dict[str, Range] = {
    # the sampler (tvq.text.sampling.Sampler)
    "temperature": Range(float, 0),  # 0 = greedy; large is near uniform
    "top_k": Range(int, 0, INT32_MAX),  # 0 = off; beyond the vocabulary: all of it
    "top_p": Range(float, 0, 1, open_low=True),
    "min_p": Range(float, 0, 1, open_high=True),
    "presence_penalty": Range(float, -2, 2),  # OpenAI's range
    "frequency_penalty": Range(float, -2, 2),
    "repetition_penalty": Range(float, 0, 10, open_low=True),
    "repeat_last_n": Range(int, 0, REPEAT_WINDOW),
    "logit_bias_id": Range(int, 0, INT32_MAX),  # and below the model's vocabulary
    "logit_bias": Range(float, -100, 100),  # OpenAI's: -100 bans a token
    # a generation (tvq.decoding.stream_generate)
    "max_tokens": Range(int, 0, INT32_MAX),
    "num_samples": Range(int, 1, 1 << 16),
    "seed": Range(int, 0, 2**63 - 1),
    "logprobs": Range(int, 0, INT32_MAX),  # and at most the model's vocabulary
    # a stop string's length: the text that may begin one is held back, so it stays short
    "stop": Range(int, 0, 256, note="characters"),
}


def check(name: str, value: Any) -> Any:
    """RANGES[name].check(name, value)."""
    return RANGES[name].check(name, value)


def check_all(**settings: Any) -> None:
    """Each named setting within its range (SettingError for the first that is not)."""
    for name, value in settings.items():
        check(name, value)


def check_stops(stops: Any) -> None:
    """Each stop string within its length, RANGES["stop"] (SettingError naming it)."""
    for stop in stops:
        check("stop", len(stop))


def random_seed() -> int:
    """A seed for a run that names none (31 bits: any front end can show and take it)."""
    return secrets.randbits(31)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A request's sampling settings: the defaults are the library's and OpenAI's
    (plain sampling from the model); each field's range is RANGES's."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    # OpenAI's: log-prob − frequency × count − presence × (count > 0), count = how often
    # the token was sampled before in this text (0 = off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # llama.cpp's --repeat-penalty over the last repeat_last_n tokens of the request
    # (prompt and sampled): their log-probs (≤ 0) × the penalty (1 = off)
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its log-prob)

    def __post_init__(self) -> None:
        """Each field within its range (RANGES), or SettingError."""
        for field in dataclasses.fields(self):
            if field.name != "logit_bias":
                check(field.name, getattr(self, field.name))
        for pair in self.logit_bias:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise SettingError("logit_bias", "(token id, bias) pairs", pair)
            check("logit_bias_id", pair[0])
            check("logit_bias", pair[1])

    def check_vocabulary(self, n_vocab: int) -> Sampler:
        """The sampler, if every logit-bias id is a token of a vocabulary of n_vocab, else
        SettingError."""
        for token, _ in self.logit_bias:
            if token >= n_vocab:
                raise SettingError("logit_bias_id", f"a token id below {n_vocab}", token)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalizing(self) -> bool:
        """Whether a penalty or a bias changes any log-prob."""
        repeats = self.repetition_penalty != 1 and self.repeat_last_n > 0
        return bool(self.presence_penalty or self.frequency_penalty or repeats
                    or any(bias for _, bias in self.logit_bias))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What a person at a terminal gets unless they say otherwise."""

    sampler: Sampler
    max_tokens: int


# `tvq generate`, `tvq chat` and the llm plugin: a little cooler than the model and
# without its unlikeliest tail (llama.cpp and mlx-lm's front ends do the same).
TERMINAL = Defaults(Sampler(temperature=0.8, top_p=0.95), max_tokens=200)
