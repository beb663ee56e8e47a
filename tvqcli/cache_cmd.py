"""`tvq cache info` and `tvq cache clear`: the state cache the commands keep (the state
after each prompt, so a second run on the same text reads only what is new)."""

from __future__ import annotations

from typing import Annotated

import typer

from tvqcli.app import app, handle_errors, state_cache, stderr

cache_app = typer.Typer(help="The state cache: what is kept, where, how big.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(cache_app, name="cache")


@cache_app.command()
@handle_errors
def info(
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Where the state cache is, its entries and bytes, and its bound."""
    import json

    details = state_cache().info()
    shown = {"folder": details["folder"], "entries": details["disk_entries"],
             "bytes": details["disk_bytes"], "limit": details["disk_limit"]}  # fmt: skip
    if json_output:
        print(json.dumps(shown))
        return
    print(f"{shown['folder']}: {shown['entries']} states, {_size(shown['bytes'])} "
          f"of at most {_size(shown['limit'])}")  # fmt: skip


@cache_app.command()
@handle_errors
def clear() -> None:
    """Empty the state cache."""
    removed = state_cache().clear()
    stderr.print(f"removed {removed} state{'s' if removed != 1 else ''}", highlight=False)


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"
