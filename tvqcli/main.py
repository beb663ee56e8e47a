"""Entry point of the `tvq` command: the app of tvqcli/app.py with every command."""

from __future__ import annotations

import sys

from tvqcli import generate_cmd, model_cmd, score_cmd, serve_cmd, train_cmd  # noqa: F401
from tvqcli.app import app, enable_compilation_cache, quiet_stdout

__all__ = ["app", "main"]


def main() -> None:
    enable_compilation_cache()
    try:
        app()
    except BrokenPipeError:  # raised outside a command, e.g. by `--help | head`
        quiet_stdout()
        sys.exit(0)
