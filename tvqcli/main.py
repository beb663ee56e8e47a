"""Entry point of the `tvq` command: the app of tvqcli/app.py with every command."""

from __future__ import annotations

import sys
import warnings

from tvqcli import (  # noqa: F401
    cache_cmd,
    chat_cmd,
    compress_cmd,
    generate_cmd,
    model_cmd,
    prepare_cmd,
    score_cmd,
    serve_cmd,
    train_cmd,
)
from tvqcli.app import app, quiet_stdout

__all__ = ["app", "main"]


def main() -> None:
    from tvq.files import warm

    warm.enable_caches()  # JAX's compilation cache and tvq's warm starts (DESIGN section 14)
    warnings.showwarning = _one_line  # the library's warnings (a dropped cache entry)
    try:
        app()
    except BrokenPipeError:  # raised outside a command, e.g. by `--help | head`
        quiet_stdout()
        sys.exit(0)


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one dim line on stderr, as the CLI's notes are."""
    from tvqcli.app import stderr

    stderr.print(f"[yellow]warning:[/yellow] {message}", markup=True, soft_wrap=True)
