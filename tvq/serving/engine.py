"""`tvq serve`: an OpenAI-compatible completions server with constant-size sessions
(docs/DESIGN.md section 13).

The HTTP side (Starlette, run by uvicorn) parses and checks requests on the event loop;
the model runs on one worker thread that takes jobs from a bounded queue, first come
first served (a full queue answers 429). A job is one request: for each prompt, one
batch of `n` rows through tvq.decoding.generate, whose text is streamed back to the
event loop as it is sampled. Sessions keep the attention state (fixed size, whatever
the length) after each request under an id, in memory (least recently used dropped)
and, with a session folder, as tvq state files.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from tvq.errors import StateError, TvqError
from tvq.runtime.context import Context, require_tokenizer, score_ids
from tvq.runtime.model import Model

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


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


class ApiError(Exception):
    """An OpenAI-style error answer: status, message, the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}  # fmt: skip


# -- requests ---------------------------------------------------------------------------


@dataclasses.dataclass
class CompletionRequest:
    """A checked /v1/completions body."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = dataclasses.field(default_factory=list)
    n: int = 1
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    session: str | None = None
    ignore_eos: bool = False  # an extension (llama.cpp's, vLLM's): sample past end-of-document


def _field(body: dict, name: str, kinds, default, check=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({int: "an integer", float: "a number", bool: "a boolean",
                             str: "a string", list: "a list", dict: "an object"}[k]
                            for k in kinds)  # fmt: skip
        raise ApiError(400, f"'{name}' must be {names}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", name)
    return value


def parse_completion(body: Any, tokenizer, n_vocab: int, settings: ServerSettings
                     ) -> CompletionRequest:  # fmt: skip
    """Checks a completions body field by field → CompletionRequest, or ApiError 400
    naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    prompt = body.get("prompt", "")
    prompts, texts = _prompts(prompt, tokenizer, n_vocab, settings)
    limit = settings.max_tokens_limit
    request = CompletionRequest(
        prompts=prompts,
        prompt_texts=texts,
        max_tokens=_field(body, "max_tokens", (int,), 16, lambda v: 0 <= v <= limit,
                          f"between 0 and {limit} (--max-tokens-limit)"),
        temperature=float(_field(body, "temperature", (int, float), 1.0,
                                 lambda v: math.isfinite(v) and 0 <= v <= 100,
                                 "between 0 and 100")),
        top_p=float(_field(body, "top_p", (int, float), 1.0,
                           lambda v: 0 < v <= 1, "in (0, 1]")),
        top_k=_field(body, "top_k", (int,), 0, lambda v: v >= 0, ">= 0"),
        min_p=float(_field(body, "min_p", (int, float), 0.0,
                           lambda v: 0 <= v < 1, "in [0, 1)")),
        stop=_stop(body.get("stop")),
        n=_field(body, "n", (int,), 1, lambda v: 1 <= v <= settings.max_n,
                 f"between 1 and {settings.max_n}"),
        seed=_field(body, "seed", (int,), None, lambda v: abs(v) < 2**63, "a 64-bit integer"),
        stream=_field(body, "stream", (bool,), False),
        include_usage=_field(_field(body, "stream_options", (dict,), {}), "include_usage",
                             (bool,), False),
        logprobs=_field(body, "logprobs", (int,), None, lambda v: 0 <= v <= min(20, n_vocab),
                        f"between 0 and {min(20, n_vocab)}"),
        echo=_field(body, "echo", (bool,), False),
        ignore_eos=_field(body, "ignore_eos", (bool,), False),
        session=_field(body, "session", (str,), None, lambda v: bool(SESSION_ID.fullmatch(v)),
                       "a name of letters, digits, '_', '-' and '.' (not starting with '.'), "
                       "at most 128 characters"),
    )  # fmt: skip
    _field(body, "model", (str,), None)
    for name in ("best_of", "suffix", "logit_bias"):
        if body.get(name) not in (None, 1, "", {}):
            raise ApiError(400, f"'{name}' is not supported by tvq", name)
    if request.session is not None and len(prompts) != 1:
        raise ApiError(400, "a session continues one text: give one prompt", "prompt")
    if request.session is not None and request.n != 1:
        raise ApiError(400, "a session continues one text: n must be 1", "n")
    return request


def _prompts(prompt, tokenizer, n_vocab: int, settings: ServerSettings):
    """prompt: a string, a list of strings, a list of token ids or a list of such lists."""

    def ids_of(item) -> tuple[list[int], str]:
        if isinstance(item, str):
            ids = list(tokenizer.encode(item))
            text = item
        elif isinstance(item, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in item):  # fmt: skip
            if any(not 0 <= i < n_vocab for i in item):
                raise ApiError(400, f"'prompt' holds token ids outside [0, {n_vocab})", "prompt")
            ids = list(item)
            text = tokenizer.decode(ids)
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of "
                           "token ids or a list of lists of token ids", "prompt")  # fmt: skip
        if len(ids) > settings.max_prompt_tokens:
            limit = settings.max_prompt_tokens
            raise ApiError(400, f"a prompt has {len(ids)} tokens, more than the limit {limit} "
                           "(--max-prompt-tokens)", "prompt")  # fmt: skip
        return ids, text

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
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _stop(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value) or \
            len(value) > 4:  # fmt: skip
        raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return [s for s in value if s]


# -- sessions ---------------------------------------------------------------------------


class Sessions:
    """Contexts by session id: the most recent `limit` in memory, and all of them as
    state files in `folder` when there is one (they survive a restart)."""

    def __init__(self, model: Model, limit: int, folder: Path | None) -> None:
        self.model, self.limit, self.folder = model, limit, folder
        self.memory: collections.OrderedDict[str, Context] = collections.OrderedDict()
        self.lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.state"

    def get(self, name: str) -> Context | None:
        from tvq.runtime.statefile import load_state

        with self.lock:
            if name in self.memory:
                self.memory.move_to_end(name)
                return self.memory[name]
        if self.folder is not None and self._path(name).is_file():
            try:
                return load_state(self._path(name), self.model)
            except StateError as e:
                raise ApiError(409, f"session {name}: {e}", "session", "session_error") from None
        return None

    def put(self, name: str, context: Context) -> None:
        from tvq.runtime.statefile import save_state

        with self.lock:
            self.memory[name] = context
            self.memory.move_to_end(name)
            while len(self.memory) > self.limit:
                self.memory.popitem(last=False)
        if self.folder is not None:
            save_state(self._path(name), self.model, context)

    def delete(self, name: str) -> bool:
        with self.lock:
            found = self.memory.pop(name, None) is not None
        if self.folder is not None and self._path(name).is_file():
            self._path(name).unlink()
            found = True
        return found


# -- the worker -------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """One request on its way through the worker; events go back to the event loop:
    ("text", choice, text), ("choice", choice, dict) when a choice ends, ("done",
    usage), ("error", ApiError)."""

    request: CompletionRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def batch_key(self) -> tuple | None:
        """Requests with equal keys share a batch; None: this one runs alone (it
        continues a session, or has several prompts)."""
        r = self.request
        if r.session is not None or len(r.prompts) != 1:
            return None
        return (r.temperature, r.top_k, r.top_p, r.min_p, r.logprobs or 0, r.ignore_eos)


class JobQueue:
    """Jobs waiting for the model, oldest first, at most `limit`. take() returns the
    oldest job with the waiting jobs that can share its batch."""

    def __init__(self, limit: int) -> None:
        self.limit, self.jobs, self.closed = limit, collections.deque(), False
        self.ready = threading.Condition()

    def put(self, job: Job) -> None:
        with self.ready:
            if len(self.jobs) >= self.limit:
                raise ApiError(429, f"the server is busy: {self.limit} requests are waiting; "
                               "try again shortly", kind="rate_limit_error")  # fmt: skip
            self.jobs.append(job)
            self.ready.notify()

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()

    def take(self, max_rows: int) -> list[Job] | None:
        """The oldest job and, when it can be batched, every waiting job with the same
        batch key, up to max_rows rows in all; None once closed."""
        with self.ready:
            while not self.jobs and not self.closed:
                self.ready.wait()
            if self.closed:
                return None
            first = self.jobs.popleft()
            key = first.batch_key()
            if key is None:
                return [first]
            batch, rows, kept = [first], first.request.n, collections.deque()
            while self.jobs:
                job = self.jobs.popleft()
                if job.batch_key() == key and rows + job.request.n <= max_rows:
                    batch.append(job)
                    rows += job.request.n
                else:
                    kept.append(job)
            self.jobs = kept
            return batch


class Engine:
    """The model behind the server: one worker thread takes the oldest waiting request
    and every waiting request that can share its batch, and runs them together."""

    def __init__(self, model: Model, settings: ServerSettings, base: Model | None = None
                 ) -> None:  # fmt: skip
        """base: the model as loaded, whose fingerprint names the state files (model
        may compute in another dtype: the same parameters)."""
        self.model, self.settings = model, settings
        self.tokenizer = require_tokenizer(model)
        self.sessions = Sessions(base or model, settings.max_sessions, settings.session_dir)
        self.jobs = JobQueue(settings.queue_size)
        # served requests, the model's runs (batches and lone requests), the largest batch
        self.stats = {"requests": 0, "runs": 0, "largest_batch": 0}
        self.worker = threading.Thread(target=self._work, name="tvq-model", daemon=True)
        self.worker.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.close()
        self.worker.join()

    def _work(self) -> None:
        while True:
            batch = self.jobs.take(self.settings.max_batch_rows)
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled.is_set()]
            if not batch:
                continue
            self.stats["requests"] += len(batch)
            self.stats["runs"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            try:
                if batch[0].batch_key() is None:
                    self._run(batch[0])
                else:
                    self._run_batch(batch)
            except Exception as e:  # noqa: BLE001  (answered, never raised)
                if isinstance(e, ApiError):
                    error = e
                elif isinstance(e, TvqError):
                    error = ApiError(400, str(e))
                else:
                    error = ApiError(500, f"internal error: {type(e).__name__}",
                                     kind="server_error")  # fmt: skip
                for job in batch:
                    job.send("error", error)

    def _run_batch(self, jobs: list[Job]) -> None:
        """Requests of one prompt each, no session and the same sampler: one batch."""
        from tvq.decoding import Request, generate_batch

        first = jobs[0].request
        requests, echoed = [], []
        for job in jobs:
            r = job.request
            echoed.append(self._prompt_logprobs(r.prompts[0], None, r)
                          if r.echo and r.logprobs is not None else None)  # fmt: skip
            if r.echo:
                for row in range(r.n):
                    job.send("text", row, r.prompt_texts[0])
            requests.append(Request(r.prompts[0], r.max_tokens, _seed(r), r.n, r.stop))
        samples = generate_batch(
            self.model, requests, sampler=_sampler(first), logprobs=first.logprobs or 0,
            ignore_eos=first.ignore_eos,
            on_text=lambda i, row, text: jobs[i].send("text", row, text),
            should_stop=lambda: [job.cancelled.is_set() for job in jobs],
        )  # fmt: skip
        for job, mine, prompt_lp in zip(jobs, samples, echoed, strict=True):
            r = job.request
            for row, sample in enumerate(mine):
                job.send("choice", row, self._choice(r, sample, prompt_lp, r.prompt_texts[0]))
            usage = {"prompt_tokens": len(r.prompts[0]),
                     "completion_tokens": sum(len(s.ids) for s in mine)}  # fmt: skip
            job.send("done", usage | {"total_tokens": sum(usage.values())})

    def _run(self, job: Job) -> None:
        from tvq.decoding import generate

        r = job.request
        sampler, seed = _sampler(r), _seed(r)
        usage, held = {"prompt_tokens": 0, "completion_tokens": 0}, {}
        for p, (ids, text) in enumerate(zip(r.prompts, r.prompt_texts, strict=True)):
            if job.cancelled.is_set():
                return
            start = self.sessions.get(r.session) if r.session is not None else None
            echoed = self._prompt_logprobs(ids, start, r) if r.echo and r.logprobs is not None \
                else None  # fmt: skip

            def on_text(row: int, piece: str, base=p * r.n) -> None:
                job.send("text", base + row, piece)

            if r.echo:
                for row in range(r.n):
                    job.send("text", p * r.n + row, text)
            result = generate(
                self.model, ids, max_tokens=r.max_tokens, sampler=sampler, seed=seed,
                num_samples=r.n, stop=r.stop, context=start, on_text=on_text,
                logprobs=r.logprobs or 0, should_stop=job.cancelled.is_set,
                ignore_eos=r.ignore_eos,
            )  # fmt: skip
            usage["prompt_tokens"] += len(ids)
            usage["completion_tokens"] += sum(len(s.ids) for s in result.samples)
            if r.session is not None and not job.cancelled.is_set():
                self.sessions.put(r.session, result.context)
                held = {"session_tokens": int(result.context.tokens)}  # an extension
            for row, sample in enumerate(result.samples):
                job.send("choice", p * r.n + row, self._choice(r, sample, echoed, text))
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        job.send("done", usage | held)

    def _choice(self, r: CompletionRequest, sample, echoed, prompt_text: str) -> dict:
        """A choice's finish_reason and logprobs (its text has been sent); text offsets
        count from the start of the prompt."""
        start = 0 if r.echo else len(prompt_text)
        return {
            "finish_reason": "length" if sample.finish_reason == "length" else "stop",
            "logprobs": None if r.logprobs is None else self._logprobs(sample, echoed, start),
        }

    def _prompt_logprobs(self, ids: list[int], start: Context | None, r: CompletionRequest):
        """The prompt's tokens with their log-probs and top log-probs (echo)."""
        if not ids:
            return [], np.zeros([0]), np.zeros([0, 0]), np.zeros([0, 0], np.int32)
        k = r.logprobs or 0
        scored, _ = score_ids(self.model, ids, start, keep_log_probs=True, top_k=k)
        if not k:
            return ids, scored.log_probs[0], np.zeros([len(ids), 0]), np.zeros([len(ids), 0], int)
        return ids, scored.log_probs[0], scored.top_log_probs[0], scored.top_ids[0]

    def _logprobs(self, sample, echoed, start: int) -> dict:
        """The OpenAI shape: tokens, token_logprobs, top_logprobs, text_offset; and the
        tokens' ids (token_ids, a tvq extension)."""
        tokens, values, tops = [], [], []
        if echoed is not None:
            ids, lps, top_values, top_ids = echoed
            for t, (token, lp) in enumerate(zip(ids, lps, strict=True)):
                tokens.append(token)
                values.append(float(lp))
                tops.append(list(zip(top_ids[t].tolist(), top_values[t].tolist(), strict=True)))
        sampled_tops = sample.top_logprobs or [[]] * len(sample.ids)
        for token, lp, top in zip(sample.ids, sample.log_probs, sampled_tops, strict=True):
            tokens.append(token)
            values.append(float(lp))
            tops.append(top)
        texts = [token_text(self.tokenizer, t) for t in tokens]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(self.tokenizer.token_bytes(t).decode("utf-8", errors="replace"))
        return {
            "tokens": texts,
            "token_logprobs": [round(v, 6) for v in values],
            "top_logprobs": [
                {token_text(self.tokenizer, i): round(v, 6) for i, v in top} for top in tops
            ],
            "text_offset": offsets,
            "token_ids": [int(t) for t in tokens],  # a tvq extension
        }


def _sampler(r: CompletionRequest):
    from tvq.text.sampling import Sampler

    return Sampler(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p)


def _seed(r: CompletionRequest) -> int:
    """The request's seed (a random one when it gives none), as generate takes it."""
    return secrets.randbits(31) if r.seed is None else r.seed % (1 << 31)


def token_text(tokenizer, token: int) -> str:
    """A token's text; a token that is not whole UTF-8 as "bytes:\\xNN…" (OpenAI's way)."""
    data = tokenizer.token_bytes(int(token))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


# -- the HTTP application -----------------------------------------------------------------


def build_app(engine: Engine):
    """The Starlette application: /health, /v1/models, /v1/completions,
    DELETE /v1/sessions/{id}."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    settings = engine.settings
    created = int(time.time())

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    def checked(handler):
        async def wrapped(request: Request) -> Response:
            try:
                if settings.api_key is not None:
                    given = request.headers.get("authorization", "").encode()
                    if not secrets.compare_digest(given, f"Bearer {settings.api_key}".encode()):
                        raise ApiError(401, "a valid API key is needed: Authorization: "
                                       "Bearer KEY", kind="authentication_error")  # fmt: skip
                return await handler(request)
            except ApiError as e:
                return error(e)
            except Exception as e:  # noqa: BLE001  (never a traceback to the client)
                return error(ApiError(500, f"internal error: {type(e).__name__}",
                                      kind="server_error"))  # fmt: skip

        return wrapped

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"} | engine.stats)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": created, "owned_by": "tvq"}
        ]})  # fmt: skip

    async def delete_session(request: Request) -> Response:
        name = request.path_params["name"]
        if not SESSION_ID.fullmatch(name):
            raise ApiError(400, "a session id is a name of letters, digits, '_', '-' and '.'",
                           "session")  # fmt: skip
        if not engine.sessions.delete(name):
            raise ApiError(404, f"no session {name}", "session", "not_found_error")
        return JSONResponse({"id": name, "object": "session", "deleted": True})

    async def completions(request: Request) -> Response:
        body = await read_json(request, settings.max_body_bytes)
        r = parse_completion(body, engine.tokenizer, engine.model.config.n_vocab, settings)
        loop = asyncio.get_running_loop()
        job = Job(r, loop, asyncio.Queue())
        engine.submit(job)
        ident = f"cmpl-{secrets.token_hex(12)}"
        head = {"id": ident, "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name}  # fmt: skip
        if r.session is not None:
            head["session"] = r.session
        if r.stream:
            return StreamingResponse(_stream(job, head, r), media_type="text/event-stream")
        try:
            texts = [""] * (len(r.prompts) * r.n)
            choices: list[dict | None] = [None] * len(texts)
            while True:
                kind, *rest = await job.events.get()
                if kind == "text":
                    texts[rest[0]] += rest[1]
                elif kind == "choice":
                    choices[rest[0]] = rest[1]
                elif kind == "error":
                    raise rest[0]
                else:
                    usage = rest[0]
                    break
        finally:
            job.cancelled.set()  # a no-op once done; frees the worker if the client left
        out = [{"text": texts[i], "index": i, **choices[i]} for i in range(len(texts))]
        return JSONResponse(head | {"choices": out, "usage": usage})

    async def not_found(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(ApiError(exc.status_code, exc.detail or "not found", kind=kind))

    routes = [
        Route("/health", checked(health), methods=["GET"]),
        Route("/v1/models", checked(models), methods=["GET"]),
        Route("/v1/completions", checked(completions), methods=["POST"]),
        Route("/v1/sessions/{name:path}", checked(delete_session), methods=["DELETE"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


async def read_json(request, limit: int) -> Any:
    """The request body as JSON: 413 beyond `limit` bytes, 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is larger than {limit} bytes", kind="request_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes", kind="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None


async def _stream(job: Job, head: dict, r: CompletionRequest) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a last chunk per choice with its
    finish_reason (and logprobs), the usage when asked, then [DONE]. Leaving early
    (the client went away) cancels the job at once."""

    def event(payload: dict) -> str:
        return f"data: {json.dumps(head | payload, ensure_ascii=False)}\n\n"

    try:
        while True:
            kind, *rest = await job.events.get()
            if kind == "text":
                yield event({"choices": [{"text": rest[1], "index": rest[0], "logprobs": None,
                                          "finish_reason": None}]})  # fmt: skip
            elif kind == "choice":
                yield event({"choices": [{"text": "", "index": rest[0], **rest[1]}]})
            elif kind == "error":
                yield f"data: {json.dumps(rest[0].body())}\n\n"
                break
            else:
                if r.include_usage:
                    yield event({"choices": [], "usage": rest[0]})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
