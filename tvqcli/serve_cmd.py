"""`tvq serve`: an OpenAI-compatible HTTP server (tvq/serving/: protocol, sessions, engine, app)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Annotated

import typer

from tvqcli.app import (
    DtypeOption,
    ModelOption,
    app,
    check_output_dir,
    fail,
    handle_errors,
    run_settings,
    stderr,
)


@app.command()
@handle_errors
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="TVQ_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    max_sessions: Annotated[
        int,
        typer.Option(
            help="Sessions kept in memory, pinned in the state cache (least recently "
            "used dropped, or read back from --session-dir).",
            min=1,
        ),
    ] = 64,
    session_dir: Annotated[
        Path | None,
        typer.Option(help="Also keep every session as a state file here (survives a restart)."),
    ] = None,
    max_tokens_limit: Annotated[
        int, typer.Option(help="Largest max_tokens a request may ask for.", min=1)
    ] = 4096,
    max_n: Annotated[int, typer.Option(help="Largest n (completions per prompt).", min=1)] = 16,
    max_prompt_tokens: Annotated[
        int, typer.Option(help="Longest prompt, in tokens (memory does not grow with it).", min=1)
    ] = 1_048_576,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body (413 beyond).", min=1024)
    ] = 16 << 20,
    queue_size: Annotated[
        int, typer.Option(help="Requests not started that may wait (429 beyond).", min=1)
    ] = 64,
    batch_rows: Annotated[
        int,
        typer.Option(
            help="Rows decoded together: held by the requests started (each its n, "
            "its prompt's reading included), and the largest n.",
            min=1,
        ),
    ] = 64,
    cache_bytes: Annotated[
        int,
        typer.Option(
            help="Memory for the state cache: the state after each prompt and "
            "completion, so no text is read twice (0: off). The sessions in memory "
            "count in it and are never evicted for a prompt.",
            min=0,
        ),
    ] = 1 << 30,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Also keep the state cache in this folder, up to "
            "--cache-dir-bytes (survives a restart)."
        ),
    ] = None,
    cache_dir_bytes: Annotated[
        int, typer.Option(help="Bytes the --cache-dir folder may hold.", min=0)
    ] = 2 << 30,
    dtype: DtypeOption = None,
) -> None:
    """Serve the model over HTTP with the OpenAI completions API.

    GET /health, GET /v1/models, POST /v1/completions (prompt, max_tokens,
    temperature, top_p, top_k, min_p, stop, n, seed, stream, logprobs, echo).
    Sessions: "session": "ID" continues that session's attention state (a fixed
    size, whatever the length) and keeps the state after the request;
    DELETE /v1/sessions/ID forgets one. Concurrent requests are decoded together.
    Listens on 127.0.0.1 unless told otherwise; Ctrl-C or SIGTERM stops it."""
    from tvq.serving.memory import limit_arenas

    limit_arenas()  # before JAX starts its threads (tvq/serving/memory.py)
    import uvicorn

    import tvq
    from tvq import require_tokenizer
    from tvq.serving import Engine, ServerSettings, build_app

    if session_dir is not None:
        check_output_dir(session_dir, "--session-dir")
    if cache_dir is not None:
        check_output_dir(cache_dir, "--cache-dir")
    try:
        listener = socket.create_server((host, port))
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    base = tvq.load(model)
    require_tokenizer(base)
    loaded = run_settings(base, dtype=dtype)
    if session_dir is not None:
        session_dir.mkdir(parents=True, exist_ok=True)
    settings = ServerSettings(
        model_name=Path(model).name if model is not None else "tvq-builtin",
        api_key=api_key, max_sessions=max_sessions, session_dir=session_dir,
        max_tokens_limit=max_tokens_limit, max_n=max_n, max_prompt_tokens=max_prompt_tokens,
        max_body_bytes=max_body_bytes, queue_size=queue_size, max_batch_rows=batch_rows,
        cache_bytes=cache_bytes, cache_dir=cache_dir, cache_dir_bytes=cache_dir_bytes,
    )  # fmt: skip
    engine = Engine(loaded, settings, base)
    engine.warm_up()  # compiles the sampling loop before serving
    config = uvicorn.Config(build_app(engine), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30, lifespan="off")  # fmt: skip
    server = uvicorn.Server(config)
    bound_host, bound_port = listener.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    stderr.print(f"tvq serve: http://{shown}:{bound_port}/v1 (model {settings.model_name}); "
                 "Ctrl-C stops it", highlight=False)  # fmt: skip
    # uvicorn stops gracefully on SIGINT/SIGTERM (requests in flight finish, for up to
    # 30 s), then restores the handlers it found and raises the signal again: these
    # handlers take it, so the worker stops and the sessions are closed here.
    stops = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: stops.append(number))
    try:
        server.run(sockets=[listener])
    finally:
        engine.close()
        listener.close()
    kept = f" (sessions are in {session_dir})" if session_dir is not None else ""
    stderr.print(f"tvq serve: stopped{kept}", highlight=False)
