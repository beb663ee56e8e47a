"""`tvq chat`: continue one text turn by turn, each turn feeding only its own tokens.
The session itself is tvqcli/chat.py (`tvq generate --interactive` runs it too)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tvq.text.settings import TERMINAL
from tvqcli.app import DtypeOption, ModelOption, NoCacheOption, app, finite, handle_errors
from tvqcli.chat import run_chat


@app.command()
@handle_errors
def chat(
    prompt: Annotated[
        str | None, typer.Argument(help="Text to start with (the model continues it first).")
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Start with the text of FILE.")
    ] = None,
    model: ModelOption = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Tokens to generate per turn.")
    ] = TERMINAL.max_tokens,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0 = greedy.", callback=finite)
    ] = TERMINAL.sampler.temperature,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling mass, in (0, 1].", callback=finite)
    ] = TERMINAL.sampler.top_p,
    top_k: Annotated[
        int, typer.Option(help="Sample among the k likeliest (0 = off).")
    ] = TERMINAL.sampler.top_k,
    min_p: Annotated[
        float, typer.Option(help="Drop tokens below min-p × the top one.", callback=finite)
    ] = TERMINAL.sampler.min_p,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Random seed of every turn (a turn's text then depends only on the "
            "text before it).",
            show_default="a new one each turn",
        ),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(help="End a turn at this text, which stays in the text (repeatable)."),
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option(help="Go on past end-of-document tokens (they print nothing).")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Per turn: tokens, speed, seed on stderr.")
    ] = False,
    load_state: Annotated[Path | None, typer.Option(help="Continue from a saved state.")] = None,
    save_state: Annotated[
        Path | None, typer.Option(help="Save the state when the session ends.")
    ] = None,
    dtype: DtypeOption = None,
    no_cache: NoCacheOption = False,
) -> None:
    """Continue a text turn by turn: each line typed is appended and the model continues.

    The attention state carries over, so every turn costs only its own tokens.
    At the prompt, /help lists the commands (/set, /save, /load, /reset, /quit)."""
    run_chat(prompt=prompt, file=file, model=model, max_tokens=max_tokens,
             temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
             stop=stop, ignore_eos=ignore_eos, verbose=verbose, load_state=load_state,
             save_state=save_state, dtype=dtype, no_cache=no_cache)  # fmt: skip
