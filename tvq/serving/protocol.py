"""The OpenAI completions protocol of `tvq serve` (docs/DESIGN.md section 13): the
server's options and limits (`ServerSettings`), request parsing and checks
(`parse_completion` → `CompletionRequest`, a 400 naming the field), OpenAI-shaped errors
(`ApiError`) and vLLM's tokenizer endpoints; the JSON of answers is
tvq/serving/answers.py.

Nothing here runs the model or touches HTTP; the engine and the app build on it.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from tvq.errors import TvqError, is_int
from tvq.serving.sessions import SESSION_ID
from tvq.text.settings import (
    LOGPROB_ALTERNATIVES,
    RANGES,
    Range,
    Sampler,
    SettingError,
    check_stops,
    random_seed,
)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Limits and options of a server (each a `tvq serve` option)."""

    model_name: str = "tvq"
    api_key: str | None = None
    max_sessions: int = 64
    session_dir: Path | None = None
    max_tokens_limit: int = 4096  # max_tokens of one request
    max_n: int = 16  # completions per prompt
    max_prompts: int = 64  # prompts in one request
    max_prompt_tokens: int = 1 << 20  # tokens of one prompt
    max_body_bytes: int = 16 << 20
    queue_size: int = 64  # requests waiting for the model
    max_batch_rows: int = 64  # rows of concurrent requests decoded together
    cache_bytes: int = 1 << 30  # the state cache in memory (tvq.runtime.state_cache)
    cache_dir: Path | None = None  # and its folder, if any
    cache_dir_bytes: int = 2 << 30


# -- errors -------------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI-style error answer: status, message, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}  # fmt: skip


def internal_error(e: BaseException) -> ApiError:
    """A 500 that names the exception's type only (never a traceback to the client);
    the traceback goes to the server's stderr, for whoever runs it."""
    traceback.print_exception(e, file=sys.stderr)
    return ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")


def api_error(e: Exception) -> ApiError:
    """An exception raised while running a request, as its answer: an ApiError as it
    is, a TvqError (a bad input the model refused) a 400, anything else a 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, TvqError):
        return ApiError(400, str(e))
    return internal_error(e)


# -- requests -----------------------------------------------------------------------------


@dataclasses.dataclass
class CompletionRequest:
    """A checked /v1/completions body."""

    prompts: list[list[int]]  # without a leading end-of-document marker
    prompt_texts: list[str]
    # per prompt: it began with the end-of-document token (as id or as the tokenizer's
    # eos_text), so it starts a document there: from the start state, even in a session
    fresh: list[bool] = dataclasses.field(default_factory=list)
    max_tokens: int = 16
    # temperature, top_p, top_k, min_p, the penalties (presence_penalty,
    # frequency_penalty, and llama.cpp's repetition_penalty, repeat_last_n) and logit_bias
    sampler: Sampler = dataclasses.field(default_factory=Sampler)
    stop: list[str] = dataclasses.field(default_factory=list)
    n: int = 1
    seed: int = 0  # a random one when the body gives none
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    session: str | None = None
    ignore_eos: bool = False  # an extension (llama.cpp's, vLLM's): sample past end-of-document
    constraint: Any = None  # what the text must match (set by tvq.serving.structured)


# The body's fields that set tvq.text.settings's settings, where their names differ.
FIELD_OF_SETTING = {"num_samples": "n", "logit_bias_id": "logit_bias"}
SAMPLER_FIELDS = tuple(f.name for f in dataclasses.fields(Sampler) if f.name != "logit_bias")


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean", str: "a string",
               list: "a list", dict: "an object"}  # fmt: skip


MAX_STOPS = 16
MAX_LOGPROBS = LOGPROB_ALTERNATIVES  # OpenAI's bound: the loop always finds as many
BASE_MODEL_ONLY = "tvq serves a base model: use /v1/completions"


def check_unicode(body: Any) -> None:
    """ApiError 400 naming the top-level field whose text holds a lone surrogate ("\\ud800"
    is valid JSON but no Unicode text: a tokenizer cannot take it)."""
    stack = [(None, body)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                where = f"'{field}'" if field else "the body"
                raise ApiError(400, f"{where} holds a lone surrogate: not Unicode text",
                               field) from None  # fmt: skip
        elif isinstance(value, dict):
            stack.extend((field or key, item) for key, item in value.items())
            stack.extend((field or key, key) for key in value)
        elif isinstance(value, list):
            stack.extend((field, item) for item in value)


def _is_kind(value, kind: type) -> bool:
    """isinstance, except that a bool is no int (JSON's true is not 1)."""
    return is_int(value) if kind is int else isinstance(value, kind)


def _field(body: dict, name: str, kinds, default, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if not any(_is_kind(value, kind) for kind in kinds):
        names = " or ".join(_KIND_NAMES[k] for k in kinds)
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", name)
    return value


def parse_completion(body: Any, tokenizer, n_vocab: int, settings: ServerSettings
                     ) -> CompletionRequest:  # fmt: skip
    """Checks a completions body field by field → CompletionRequest, or ApiError 400
    naming the field. Each setting's range is tvq.text.settings's (tightened by the
    server's limits); the sampler's are checked by the Sampler itself."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    prompts, texts, fresh = _prompts(body.get("prompt", ""), tokenizer, n_vocab, settings)
    limit = settings.max_tokens_limit
    try:
        request = CompletionRequest(
            prompts=prompts, prompt_texts=texts, fresh=fresh,
            max_tokens=_setting(body, "max_tokens", 16,
                                RANGES["max_tokens"].capped(limit, "(--max-tokens-limit)")),
            sampler=_sampler(body, n_vocab),
            stop=_stop(body.get("stop")),
            n=_setting(body, "n", 1, _n_range(settings)),
            seed=_setting(body, "seed", None, RANGES["seed"]),
            stream=_field(body, "stream", (bool,), False),
            include_usage=_field(_field(body, "stream_options", (dict,), {}), "include_usage",
                                 (bool,), False),
            logprobs=_setting(body, "logprobs", None, RANGES["logprobs"].capped(
                min(MAX_LOGPROBS, n_vocab), "(OpenAI's bound)")),
            echo=_field(body, "echo", (bool,), False),
            ignore_eos=_field(body, "ignore_eos", (bool,), False),
            session=_field(body, "session", (str,), None, lambda v: bool(SESSION_ID.fullmatch(v)),
                           "a name of letters, digits, '_', '-' and '.' (not starting with "
                           "'.'), at most 128 characters"),
        )  # fmt: skip
    except SettingError as e:
        field = FIELD_OF_SETTING.get(e.name, e.name)
        raise ApiError(400, e.message(f"'{field}'"), field) from None
    if request.seed is None:
        request.seed = random_seed()
    _field(body, "model", (str,), None)
    for name in ("best_of", "suffix"):
        if body.get(name) not in (None, 1, "", {}):
            raise ApiError(400, f"'{name}' is not supported by tvq", name)
    if request.session is not None and len(prompts) != 1:
        raise ApiError(400, "a session continues one text: give one prompt", "prompt")
    if request.session is not None and request.n != 1:
        raise ApiError(400, "a session continues one text: n must be 1", "n")
    return request


def _n_range(settings: ServerSettings) -> Range:
    """n's range: at most --max-n, and at most --batch-rows (a request's rows decode
    together)."""
    if settings.max_batch_rows < settings.max_n:
        return RANGES["num_samples"].capped(settings.max_batch_rows, "(--batch-rows)")
    return RANGES["num_samples"].capped(settings.max_n, "(--max-n)")


def _setting(body: dict, field: str, default, limits: Range):
    """A numeric field (null or absent: the default) within its range: SettingError."""
    value = body.get(field)
    return default if value is None else limits.check(field, value)


def _sampler(body: dict, n_vocab: int) -> Sampler:
    """The request's Sampler, from the fields named as its own are (SettingError)."""
    given = {name: body[name] for name in SAMPLER_FIELDS if body.get(name) is not None}
    bias = _logit_bias(body.get("logit_bias"))
    return Sampler(**given, logit_bias=bias).check_vocabulary(n_vocab)


def _prompts(prompt, tokenizer, n_vocab: int, settings: ServerSettings):
    """prompt: a string, a list of strings, a list of token ids or a list of such lists."""

    def ids_of(item) -> tuple[list[int], str, bool]:
        if isinstance(item, str):
            ids = encode_marked(tokenizer, item)
            text = item
        elif isinstance(item, list) and all(is_int(i) for i in item):
            if any(not 0 <= i < n_vocab for i in item):
                raise ApiError(400, f"'prompt' holds token ids outside [0, {n_vocab})", "prompt")
            ids = list(item)
            text = decode_marked(tokenizer, ids)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of "
                           "token ids or a list of lists of token ids", "prompt")  # fmt: skip
        if len(ids) > settings.max_prompt_tokens:
            limit = settings.max_prompt_tokens
            raise ApiError(400, f"a prompt has {len(ids)} tokens, more than the limit {limit} "
                           "(--max-prompt-tokens)", "prompt")  # fmt: skip
        fresh = bool(ids) and ids[0] == tokenizer.eos_id
        return ids[1:] if fresh else ids, text, fresh

    # A list of ints (bools included, which ids_of then refuses) is one prompt of token ids.
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(i, int) for i in prompt)):  # fmt: skip
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise ApiError(400, "'prompt' must be a string or a non-empty list", "prompt")
    if len(items) > settings.max_prompts:
        raise ApiError(400, f"at most {settings.max_prompts} prompts in one request", "prompt")
    pairs = [ids_of(item) for item in items]
    return [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]


def encode_marked(tokenizer, text: str) -> list[int]:
    """A text's ids, where a leading `tokenizer.eos_text` is the end-of-document token
    (what /tokenizer_info calls eos_token: lm-evaluation-harness prefixes a document with
    it); elsewhere the same characters are plain text."""
    if text.startswith(tokenizer.eos_text):
        return [tokenizer.eos_id, *tokenizer.encode(text[len(tokenizer.eos_text) :])]
    return list(tokenizer.encode(text))


ID_CHUNK = 1 << 16  # ids converted per call from a list to an array (see id_array)


def id_array(ids) -> np.ndarray:
    """Token ids (a list or an array) as int32, a chunk at a time for a long list:
    numpy converts a list in one call holding the interpreter lock (260 ms for 4M ids),
    which would stall the event loop's thread as long."""
    if isinstance(ids, np.ndarray) or len(ids) <= ID_CHUNK:
        return np.asarray(ids, np.int32)
    return np.concatenate([np.asarray(ids[start : start + ID_CHUNK], np.int32)
                           for start in range(0, len(ids), ID_CHUNK)])  # fmt: skip


def decode_marked(tokenizer, ids: list[int]) -> str:
    """The inverse of encode_marked: a leading end-of-document id as eos_text."""
    if ids and ids[0] == tokenizer.eos_id:
        return tokenizer.eos_text + tokenizer.decode(ids[1:])
    return tokenizer.decode(ids)


# -- vLLM's tokenizer endpoints (what lm-evaluation-harness's remote tokenizer reads) ------


def tokenizer_info_json(tokenizer, n_vocab: int) -> dict:
    """GET /tokenizer_info. No beginning-of-text token: a document starts after the
    end-of-document token, so clients (lm-evaluation-harness) prefix eos_token."""
    return {
        "tokenizer_class": f"tvq-{tokenizer.kind}",
        "eos_token": tokenizer.eos_text,
        "eos_token_id": int(tokenizer.eos_id),
        "bos_token": None,
        "pad_token": None,
        "vocab_size": n_vocab,
        "model_max_length": None,  # no limit: the state has a fixed size
    }


def parse_tokenize(body: Any, tokenizer, settings: ServerSettings) -> dict:
    """POST /tokenize {"prompt": text, "add_special_tokens": bool} → {"tokens", "count",
    "max_model_len"}. Special tokens are never added: a document start is implicit."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    text = _field(body, "prompt", (str,), None)
    if text is None:
        raise ApiError(400, "'prompt' must be a string", "prompt")
    _field(body, "add_special_tokens", (bool,), False)
    ids = encode_marked(tokenizer, text)
    return {"tokens": ids, "count": len(ids), "max_model_len": settings.max_prompt_tokens}


def parse_detokenize(body: Any, tokenizer, n_vocab: int) -> dict:
    """POST /detokenize {"tokens": [ids]} → {"prompt": text}."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(is_int(i) and 0 <= i < n_vocab for i in ids):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {n_vocab})", "tokens")
    return {"prompt": decode_marked(tokenizer, ids)}


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias}, added to the log-prob (the Sampler checks
    the ids and the biases)."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object of token id: bias", "logit_bias")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.strip().isdigit()):
            raise ApiError(400, f"'logit_bias' keys must be token ids, got {key!r}",
                           "logit_bias")  # fmt: skip
        pairs.append((int(key), bias))
    return tuple(pairs)


def _stop(value) -> list[str]:
    """The stop strings, each within its length (SettingError)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    # OpenAI allows 4; lm-evaluation-harness adds the end-of-document text to a task's own
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or \
            len(value) > MAX_STOPS:  # fmt: skip
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings",
                       "stop")  # fmt: skip
    check_stops(value)
    return [s for s in value if s]
