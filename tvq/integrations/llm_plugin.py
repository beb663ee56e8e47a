"""A plugin for Simon Willison's `llm` (https://llm.datasette.io): tvq models run inside
the `llm` process, no server, as llm-gpt4all and llm-mlx run theirs.

    pip install 'tvq[llm]'        # from a checkout: pip install -e '.[llm]'
    llm -m tvq-builtin "To be, or not" -o max_tokens 60 -o seed 1
    llm -m tvq-builtin "ROMEO." -o model my-model      # any `tvq train` model directory
    llm chat -m tvq-builtin -o stop '["\\n\\n"]'

llm finds the plugin through the `llm` entry-point group (pyproject.toml); `llm models`
lists `tvq-builtin`, the model shipped inside tvq (`tvq.load()`).

Other models: `-o model DIR` runs the model directory DIR instead of the built-in one.
An option, not one registered id per directory, because llm registers its models before
it reads any argument, while options are validated, logged and kept per prompt by llm
itself; `llm models options set tvq-builtin model DIR` makes DIR the default.

Options (llm checks them before anything runs, within the ranges `tvq generate` and
`tvq serve` check, tvq.text.settings.RANGES; the defaults are `tvq generate`'s,
tvq.text.settings.TERMINAL): temperature (0 is greedy), top_p, top_k (0, off), min_p
(0, off), max_tokens, seed (random; the one used is in the logged response JSON, so
`llm logs --json` tells how to repeat a turn), stop (one string, or a JSON list of
strings such as '["\\n\\n", "EXIT"]': generation stops before the first one; the JSON
form is how to write a newline), model (a tvq model directory). Text streams as it is
sampled (`--no-stream` prints it at the end).

Conversations (`llm chat`, `llm -c`): tvq models continue text, so a conversation is one
document: the system prompt and a newline (when there is one), then each turn's prompt
followed directly by the model's response, turns joined by one newline:

    system + "\\n" + prompt1 + response1 + "\\n" + prompt2 + response2 + "\\n" + prompt3

and the model continues it. The attention state has a fixed size, so the plugin keeps,
per llm conversation id, the `tvq.Context` after the last turn (in memory, for the most
recent KEEP_CONVERSATIONS conversations, as `tvq serve` keeps sessions: docs/DESIGN.md
section 13) and a turn feeds only its new tokens ("\n" + its prompt); by block-length
invariance (section 6) it samples what one generation over the whole document's tokens
would. A conversation not in memory (`llm -c` in a new process) is rebuilt from the
whole document, tokenized as one text, read from the longest prefix of its tokens that
the state cache holds (`tvq cache info`: the folder `tvq generate` keeps, where the
plugin also keeps the state after each response), so only what is new is fed. The
earlier responses may then split into other tokens than those that were sampled
(sentencepiece; or bytes that were not UTF-8 and were logged as U+FFFD), so a rebuilt
continuation can differ from the one the first process would have given. A turn that
ended on a stop string keeps its state too: the model has read the stop string (as in
`tvq chat`), though llm logs the response without it, so an in-memory conversation goes
on from what the model really read, and a rebuilt one from what llm logged. History
comes from `prompt.messages`, the whole chain llm (0.36) hands a model; system, user and
assistant text parts are used."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import llm
from llm.parts import TextPart
from pydantic import Field, field_validator

import tvq  # its names load on first use: `llm models` does not import JAX
from tvq.text.constraints import Constraint
from tvq.text.settings import RANGES, TERMINAL, random_seed

MODEL_ID = "tvq-builtin"
SEPARATOR = "\n"  # between a response and the next turn's prompt
KEEP_CONVERSATIONS = 16  # states kept in memory (each a fixed size), least recent dropped
SAMPLER_OPTIONS = ("temperature", "top_p", "top_k", "min_p")  # the Sampler's, as options


@llm.hookimpl
def register_models(register: Callable) -> None:
    register(_shared_model())


def _bounded(name: str, description: str) -> Any:
    """An option whose bounds are the setting's range (tvq.text.settings.RANGES), so llm
    checks it as tvq generate and tvq serve do; the default is tvq generate's."""
    limits = RANGES[name]
    extra = {"allow_inf_nan": False} if limits.kind is float else {}
    return Field(None, description=description, **limits.pydantic(), **extra)


def make_options() -> type[llm.Options]:
    """The options class, its bounds read from the ranges as they are now."""
    terminal = TERMINAL.sampler

    class TvqOptions(llm.Options):
        temperature: float | None = _bounded(
            "temperature", f"0 = greedy (default {terminal.temperature})"
        )
        top_p: float | None = _bounded("top_p", f"Nucleus mass, in (0, 1] ({terminal.top_p})")
        top_k: int | None = _bounded("top_k", "Sample among the k likeliest (0 = off)")
        min_p: float | None = _bounded("min_p", "Drop tokens below min_p × the top one")
        max_tokens: int | None = _bounded(
            "max_tokens", f"Tokens to generate ({TERMINAL.max_tokens})"
        )
        seed: int | None = _bounded("seed", "Random seed (random)")
        stop: list[str] | None = Field(
            None, description='Stop before this text: one string, or a JSON list ["\\n\\n", "END"]'
        )
        model: str | None = Field(None, description="A tvq model directory (default: built-in)")

        @field_validator("stop", mode="before")
        @classmethod
        def _one_or_list(cls, value: object) -> object:
            """One string is one stop string, unless it is a JSON list (`-o stop` gives
            text)."""
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    parsed = None
                value = parsed if isinstance(parsed, list) else [value]
            if value is None:
                return None
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise ValueError("stop must be a string or a list of strings")
            if not all(value):
                raise ValueError("a stop string must not be empty")
            return value

        @field_validator("model")
        @classmethod
        def _directory(cls, value: str | None) -> str | None:
            if value is not None and not Path(value).expanduser().is_dir():
                raise ValueError(f"{value!r} is not a directory (a tvq model directory)")
            return value

    return TvqOptions


TvqOptions = make_options()


@dataclasses.dataclass
class _Conversation:
    """Where a conversation stands: its document so far and the state after it."""

    model_key: str | None  # the resolved model directory; None: the built-in model
    text: str
    context: tvq.Context


class TvqModel(llm.Model):
    model_id = MODEL_ID
    can_stream = True
    supports_schema = True  # `llm --schema`: the text is JSON the schema accepts
    Options = TvqOptions

    def __init__(self) -> None:
        self._models: dict[str | None, tvq.Model] = {}
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()
        self._cache = None  # made on first use: `llm models` imports no JAX

    def execute(
        self,
        prompt: llm.Prompt,
        stream: bool,
        response: llm.Response,
        conversation: llm.Conversation | None,
    ) -> Iterator[str]:
        options = prompt.options
        history, text = document(prompt.messages)
        key = None if options.model is None else str(Path(options.model).expanduser().resolve())
        kept = self._conversations.pop(conversation.id, None) if conversation else None
        resume = kept is not None and kept.model_key == key and kept.text == history
        seed = random_seed() if options.seed is None else options.seed
        fed = text[len(history) :] if resume else text  # resumed: "\n" + the new prompt
        given = {name: getattr(options, name) for name in SAMPLER_OPTIONS}
        sampler = dataclasses.replace(
            TERMINAL.sampler, **{k: v for k, v in given.items() if v is not None}
        )
        max_tokens = TERMINAL.max_tokens if options.max_tokens is None else options.max_tokens
        try:
            constraint = Constraint.json_schema(prompt.schema) if prompt.schema else None
            events = tvq.stream_generate(
                self._load(key), fed, max_tokens=max_tokens, sampler=sampler, seed=seed,
                stop=options.stop or [], context=kept.context if resume else None,
                cache=self._state_cache(), constraint=constraint,
            )  # fmt: skip
            with events:  # closed early (Ctrl-C, a reader that stops): cancelled there
                generation, pieces = None, []
                for event in events:
                    if isinstance(event, tvq.Generation):
                        generation = event
                    elif stream:
                        yield event.text
                    else:
                        pieces.append(event.text)
                if not stream and "".join(pieces):
                    yield "".join(pieces)
        except tvq.TvqError as e:
            raise llm.ModelError(str(e)) from None
        sample = generation.samples[0]
        response.set_usage(input=generation.prompt_tokens, output=generation.generated_tokens)
        response.response_json = {"seed": seed, "finish_reason": sample.finish_reason,
                                  "resumed": resume}  # fmt: skip
        if conversation is not None and sample.finish_reason != "cancelled":
            state = _Conversation(key, text + sample.text, generation.context)
            response.response_json["document_tokens"] = state.context.tokens
            self._remember(conversation.id, state)

    def _state_cache(self):
        """The state cache of `tvq generate` (its folder under the tvq cache folder), also
        keeping the context after each response: a conversation continued in a new
        process (`llm -c`) reads from there what it shares with the last turn."""
        if self._cache is None:
            from tvq.files.cache import cache_dir
            from tvq.runtime.state_cache import StateCache

            self._cache = StateCache(folder=cache_dir("states"), every_chunk=False)
        return self._cache

    def _load(self, key: str | None) -> tvq.Model:
        """The model of a resolved directory (None: the built-in one), loaded once."""
        if key not in self._models:
            _enable_compilation_cache()
            self._models[key] = tvq.load(key)
        return self._models[key]

    def _remember(self, conversation_id: str, state: _Conversation) -> None:
        self._conversations[conversation_id] = state
        while len(self._conversations) > KEEP_CONVERSATIONS:
            self._conversations.popitem(last=False)


def document(messages: list[llm.Message]) -> tuple[str, str]:
    """llm's message chain → (the document up to the last prompt's separator, the whole
    document the model continues), by the convention of the module docstring."""
    before, text, prompts = "", "", 0
    for message in messages:
        body = "".join(part.text for part in message.parts if isinstance(part, TextPart))
        if message.role == "system":
            text += (body + SEPARATOR) if body else ""
        elif message.role == "user":
            before = text
            text += (SEPARATOR if prompts else "") + body
            prompts += 1
        elif message.role == "assistant":
            text += body
    return before, text


def _enable_compilation_cache() -> None:
    """The per-user compilation cache and warm-start files of the `tvq` command, so that
    `llm` starts as fast as `tvq generate` does (README: about 2 s to the first token)."""
    from tvq.files import warm

    warm.enable_caches()


@functools.cache
def _shared_model() -> TvqModel:
    """One instance per process: llm calls register_models on every `get_model`, and the
    loaded models and conversation states live in the instance."""
    return TvqModel()
