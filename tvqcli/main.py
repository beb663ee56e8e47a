"""Entry point of the `tvq` command: the app of tvqcli/app.py with every command."""

from __future__ import annotations

import sys

from tvqcli import (  # noqa: F401
    chat_cmd,
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
    try:
        app()
    except BrokenPipeError:  # raised outside a command, e.g. by `--help | head`
        quiet_stdout()
        sys.exit(0)
