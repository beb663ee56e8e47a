"""Entry point of the `tvq` command.

Exit codes: 0 success, 1 a tvq error (bad input, model, state or checkpoint),
2 a usage error (bad option), 130 interrupted.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="tvq",
    help="Run linear-time Transformer-VQ language models from the terminal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Prints one red line on stderr; returns the Exit to raise."""
    stderr.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code=code)


def quiet_stdout() -> None:
    """Points stdout at /dev/null, so the exit's final flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def handle_errors(func):
    """Turns tvq errors into one line on stderr and exit code 1; Ctrl-C into 130;
    a reader that went away (`tvq ... | head`) into a quiet exit 0, like any Unix tool
    (click would otherwise turn the broken pipe into exit code 1)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from tvq.errors import TvqError

        try:
            return func(*args, **kwargs)
        except TvqError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except BrokenPipeError:
            quiet_stdout()
            raise typer.Exit(0) from None

    return wrapper


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in a per-user directory: warm starts are fast."""
    import jax

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache_dir = os.environ.get("TVQ_CACHE_DIR") or str(Path(base) / "tvq" / "jax")
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable cache only costs speed
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def show_version(value: bool) -> None:
    if value:
        from tvq import __version__

        typer.echo(f"tvq {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=show_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Run linear-time Transformer-VQ language models from the terminal.

    Exit codes: 0 success, 1 error (bad input, model, state or checkpoint),
    2 usage error (bad option), 130 interrupted.
    """


def register_commands() -> None:
    """Commands live in their own modules; importing them adds them to `app`."""
    from tvqcli import generate_cmd, model_cmd, score_cmd, train_cmd  # noqa: F401


def main() -> None:
    enable_compilation_cache()
    register_commands()
    try:
        app()
    except BrokenPipeError:  # raised outside a command, e.g. by `--help | head`
        quiet_stdout()
        sys.exit(0)
