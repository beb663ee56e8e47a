"""The HTTP application of `tvq serve` (docs/DESIGN.md section 13): Starlette routes, run
by uvicorn (tvqcli/serve_cmd.py). On the event loop it checks the API key, reads the
body (413 beyond the limit), parses it (tvq.serving.protocol), hands the job to the
engine (tvq.serving.engine) and answers with the job's events, whole or as server-sent
events. It never touches the model.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tvq.serving.answers import (
    SSE_DONE,
    completion_head,
    completion_response,
    end_chunk,
    models_json,
    session_deleted_json,
    sse_chunk,
    sse_error,
    text_chunk,
    usage_chunk,
)
from tvq.serving.engine import Engine
from tvq.serving.jobs import ChoiceEnd, ChoiceText, Failed, Finished, Job
from tvq.serving.protocol import (
    BASE_MODEL_ONLY,
    ApiError,
    CompletionRequest,
    check_unicode,
    internal_error,
    parse_detokenize,
    parse_tokenize,
    tokenizer_info_json,
)
from tvq.serving.sessions import SESSION_ID
from tvq.serving.structured import parse_request


def build_app(engine: Engine) -> Starlette:
    """The Starlette application: /health, /v1/models, /v1/completions,
    DELETE /v1/sessions/{id}, and vLLM's /tokenizer_info, /tokenize and /detokenize."""
    routes = [
        # open to health probes, as llama-server's is: it tells nothing but "up"
        Route("/health", _checked(_health, open_to_all=True), methods=["GET"]),
        Route("/v1/models", _checked(_models), methods=["GET"]),
        Route("/v1/completions", _checked(_completions), methods=["POST"]),
        Route("/v1/sessions/{name:path}", _checked(_delete_session), methods=["DELETE"]),
        # vLLM's tokenizer endpoints, which lm-evaluation-harness finds on its own
        Route("/tokenizer_info", _checked(_tokenizer_info), methods=["GET"]),
        Route("/tokenize", _checked(_tokenize), methods=["POST"]),
        Route("/detokenize", _checked(_detokenize), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_found})
    app.state.engine, app.state.created = engine, int(time.time())
    return app


def _error(e: ApiError) -> JSONResponse:
    # a busy server says when to try again (the openai client waits that long, then retries)
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _checked(handler, open_to_all: bool = False):
    """handler(request, engine) behind the API key (unless open_to_all) and the error
    boundary."""

    async def wrapped(request: Request) -> Response:
        engine: Engine = request.app.state.engine
        key = engine.settings.api_key
        try:
            if key is not None and not open_to_all:
                given = request.headers.get("authorization", "").encode()
                if not secrets.compare_digest(given, f"Bearer {key}".encode()):
                    raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                   kind="authentication_error")  # fmt: skip
            return await handler(request, engine)
        except ApiError as e:
            return _error(e)
        except Exception as e:  # noqa: BLE001  (never a traceback to the client)
            return _error(internal_error(e))

    return wrapped


async def _health(request: Request, engine: Engine) -> Response:
    return JSONResponse({"status": "ok"} | engine.stats | {"memory": engine.memory()})


async def _models(request: Request, engine: Engine) -> Response:
    return JSONResponse(models_json(engine.settings.model_name, request.app.state.created))


async def _delete_session(request: Request, engine: Engine) -> Response:
    name = request.path_params["name"]
    if not SESSION_ID.fullmatch(name):
        raise ApiError(400, "a session id is a name of letters, digits, '_', '-' and '.'",
                       "session")  # fmt: skip
    if not await asyncio.to_thread(engine.sessions.delete, name):  # it may wait for a save
        raise ApiError(404, f"no session {name}", "session", "not_found_error")
    return JSONResponse(session_deleted_json(name))


async def _completions(request: Request, engine: Engine) -> Response:
    """A completion: parsed off the event loop (tokenizing a long prompt takes a while),
    handed to the engine, answered as server-sent events or whole."""
    settings = engine.settings
    body = await read_json(request, settings.max_body_bytes)
    r = await asyncio.to_thread(parse_request, body, engine.tokenizer,
                                engine.model.config.n_vocab, settings)  # fmt: skip
    job = Job(r, asyncio.get_running_loop(), asyncio.Queue())
    engine.submit(job)
    head = completion_head(settings.model_name, r.session)
    if r.stream:
        return StreamingResponse(_stream(job, head, r), media_type="text/event-stream")
    watching = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        texts = [""] * (len(r.prompts) * r.n)
        choices: list[dict | None] = [None] * len(texts)
        while True:
            match await job.events.get():
                case ChoiceText(choice, text):
                    texts[choice] += text
                case ChoiceEnd(choice, end):
                    choices[choice] = end
                case Failed(error):
                    raise error
                case Finished(usage):
                    break
    finally:
        watching.cancel()
        job.cancelled.set()  # a no-op once done
    answer = completion_response(head, texts, choices, usage)
    data = await asyncio.to_thread(
        json.dumps, answer, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )  # JSONResponse's, off the loop
    return Response(data, media_type="application/json")


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancels a whole (not streamed) answer's job when its client goes away, and ends
    the wait for it: the body is read, so what comes next is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancelled.set()
    job.events.put_nowait(Failed(ApiError(499, "the client went away")))


async def _tokenizer_info(request: Request, engine: Engine) -> Response:
    return JSONResponse(tokenizer_info_json(engine.tokenizer, engine.model.config.n_vocab))


async def _tokenize(request: Request, engine: Engine) -> Response:
    body = await read_json(request, engine.settings.max_body_bytes)
    answer = await asyncio.to_thread(parse_tokenize, body, engine.tokenizer, engine.settings)
    return JSONResponse(answer)


async def _detokenize(request: Request, engine: Engine) -> Response:
    body = await read_json(request, engine.settings.max_body_bytes)
    n_vocab = engine.model.config.n_vocab
    answer = await asyncio.to_thread(parse_detokenize, body, engine.tokenizer, n_vocab)
    return JSONResponse(answer)


async def _not_found(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = exc.detail or "not found"
    if exc.status_code == 404 and request.url.path.startswith("/v1/"):
        # chat, embeddings, ...: what clients try first; say what there is instead
        message = f"{request.url.path} is not served: {BASE_MODEL_ONLY}"
    return _error(ApiError(exc.status_code, message, kind=kind))


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 beyond `limit` bytes, 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is larger than {limit} bytes", kind="request_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes", kind="request_too_large")
    return await asyncio.to_thread(_parse_body, bytes(data))  # megabytes: off the event loop


def _parse_body(data: bytes) -> Any:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    except RecursionError:
        raise ApiError(400, "the body's JSON is nested too deeply") from None
    check_unicode(body)
    return body


async def _stream(job: Job, head: dict, r: CompletionRequest) -> AsyncIterator[str]:
    """The job's events as server-sent events (tvq.serving.protocol's chunks), then
    [DONE]. Leaving early (the client went away) cancels the job at once."""
    try:
        while True:
            match await job.events.get():
                case ChoiceText(choice, text, logprobs):
                    yield sse_chunk(head, text_chunk(choice, text, logprobs))
                case ChoiceEnd(choice, end):  # its log-probs went with its text pieces
                    yield sse_chunk(head, end_chunk(choice, end | {"logprobs": None}))
                case Failed(error):
                    yield sse_error(error)
                    break
                case Finished(usage):
                    if r.include_usage:
                        yield sse_chunk(head, usage_chunk(usage))
                    break
        yield SSE_DONE
    finally:
        job.cancelled.set()
