"""The Typer app, the error boundary and what every command shares.

The library raises typed errors (tvq/errors.py); here they become one red line on
stderr and an exit code (docs/DESIGN.md section 9): 0 success, 1 an error in the input,
model, state or checkpoint (or the system, e.g. a full disk), 2 a usage error (bad
option value), 130 interrupted. No traceback reaches a user; TVQ_DEBUG=1 shows one for
an error tvq did not expect.
"""

from __future__ import annotations

import enum
import functools
import math
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

ModelOption = Annotated[
    Path | None, typer.Option("--model", "-m", help="Model directory.", show_default="built-in")
]


DevicesOption = Annotated[
    int | None,
    typer.Option(help="Devices to use, per process (default: all that JAX sees).", min=1),
]
CLUSTER = "Cluster (several processes or hosts)"
CLUSTER_OPTIONS = ("coordinator", "num_processes", "process_id", "distributed")
CoordinatorOption = Annotated[
    str | None,
    typer.Option(envvar="TVQ_COORDINATOR", rich_help_panel=CLUSTER,
                 help="HOST:PORT of process 0; every process runs the same command."),
]  # fmt: skip
NumProcessesOption = Annotated[
    int | None,
    typer.Option(envvar="TVQ_NUM_PROCESSES", rich_help_panel=CLUSTER, help="Processes in all."),
]
ProcessIdOption = Annotated[
    int | None,
    typer.Option(envvar="TVQ_PROCESS_ID", rich_help_panel=CLUSTER,
                 help="This process's index, 0 to --num-processes - 1."),
]  # fmt: skip


class Detect(enum.StrEnum):
    auto = "auto"


DistributedOption = Annotated[
    Detect | None,
    typer.Option(rich_help_panel=CLUSTER,
                 help="auto: JAX finds the cluster (Slurm, Open MPI) instead of the three above."),
]  # fmt: skip


class Algorithm(enum.StrEnum):
    serial = "serial"
    parallel = "parallel"


AlgorithmOption = Annotated[
    Algorithm | None,
    typer.Option(help="serial: one block after another; parallel: a chunk of blocks at "
                      "once (same numbers) (default: serial on a CPU, parallel on a GPU)."),
]  # fmt: skip


class Dtype(enum.StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


DtypeOption = Annotated[
    Dtype | None,
    typer.Option(help="Compute dtype: bfloat16 runs the matrix products in bfloat16, sums, "
                      "softmax and state in float32 (default: the model's, float32)."),
]  # fmt: skip


def run_settings(model, algorithm: Algorithm | None = None, dtype: Dtype | None = None):
    """The model with the speed settings of the command line (same parameters)."""
    import dataclasses

    if algorithm is not None:
        model = dataclasses.replace(model, algorithm=algorithm.value)
    if dtype is not None:
        model = model.with_dtype(dtype.value)
    return model


_last_error = ""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Prints one red line on stderr; returns the Exit to raise."""
    global _last_error
    _last_error = message
    stderr.print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code=code)


# The options that set a generation setting (tvq.text.settings), where the name differs
OPTION_OF_SETTING = {"repetition_penalty": "--repeat-penalty", "logit_bias_id": "--logit-bias",
                     "logit_bias": "--logit-bias"}  # fmt: skip


def setting_error(error) -> typer.Exit:
    """A tvq.text.settings.SettingError as a usage error naming the option."""
    option = OPTION_OF_SETTING.get(error.name, "--" + error.name.replace("_", "-"))
    return fail(error.message(option), 2)


def state_cache(enabled: bool = True):
    """The command line's state cache (docs/DESIGN.md section 10): state files under the
    tvq cache folder's states/, bounded by DEFAULT_DISK_BYTES, so a second run on the
    same prompt reads only what is new; None with --no-cache."""
    if not enabled:
        return None
    from tvq.files.cache import cache_dir
    from tvq.runtime.state_cache import StateCache

    return StateCache(memory_bytes=0, folder=cache_dir("states"), completions=False,
                      every_chunk=False)  # fmt: skip


NoCacheOption = Annotated[
    bool,
    typer.Option("--no-cache", help="Neither read nor keep the prompt's state in the "
                 "state cache (`tvq cache info`)."),
]  # fmt: skip


def join_cluster(coordinator, num_processes, process_id, distributed) -> None:
    """Joins the cluster the options describe (nothing when none is given)."""
    from tvq.distributed.cluster import ClusterSpec, join

    join(ClusterSpec(coordinator, num_processes, process_id, auto=distributed is not None))


def quiet_stdout() -> None:
    """Points stdout at /dev/null, so the exit's final flush cannot raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def handle_errors(func):
    """The error boundary of a command: tvq errors → one line and exit 1 (130 for an
    interruption that saved its work); Ctrl-C → 130; a reader that went away
    (`tvq ... | head`) → a quiet exit 0, like any Unix tool (click would make the broken
    pipe exit 1); an OS error (disk full, permissions) → one line and exit 1; anything
    else → one line naming it as an internal error, exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from tvq.distributed import cluster

        try:
            result = boundary(*args, **kwargs)
        except typer.Exit as e:
            if e.exit_code:  # the peers in a cluster stop too, and hear why
                cluster.leave(error=_last_error or f"exit {e.exit_code}", code=e.exit_code)
            raise
        cluster.leave()
        return result

    def boundary(*args, **kwargs):
        from tvq.distributed import cluster
        from tvq.errors import Interrupted, TvqError

        try:
            return func(*args, **kwargs)
        except Interrupted as e:
            raise fail(str(e), 130) from None
        except TvqError as e:
            raise fail(str(e), 1) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except BrokenPipeError:
            quiet_stdout()
            raise typer.Exit(0) from None
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise fail(f"{e.strerror or e}{where}", 1) from None
        except Exception as e:
            if _is_cli_signal(e) or os.environ.get("TVQ_DEBUG"):
                raise
            lost = cluster.peer_failure(e)
            if lost is not None:
                raise fail(lost, 1) from None
            raise fail(
                f"internal error: {type(e).__name__}: {e} (TVQ_DEBUG=1 shows the traceback)", 1
            ) from None

    return wrapper


def _is_cli_signal(error: Exception) -> bool:
    """Typer's own exits and usage errors (click's in older Typer) pass through."""
    return type(error).__module__.split(".")[0] in ("typer", "click")


def finite(value: float | None) -> float | None:
    """Option callback: inf and nan are usage errors."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


# The corpus options that tvq prepare and tvq train share (tvq/corpus/prepare.py).
TokenizerFileOption = Annotated[
    Path | None,
    typer.Option(
        "--tokenizer", help="Use this sentencepiece .model instead of training one."
    ),  # fmt: skip
]
BytesOption = Annotated[bool, typer.Option("--bytes", help="Byte-level tokenizer.")]
ValOption = Annotated[
    list[Path] | None,
    typer.Option("--val", help="Hold out this file for evaluation (repeatable)."),
]
ValFractionOption = Annotated[
    float, typer.Option("--val-fraction", help="Fraction of documents held out.", callback=finite)
]
TextFieldOption = Annotated[
    str, typer.Option("--text-field", help="The text field of JSONL objects.")
]
SkipBadLinesOption = Annotated[
    bool,
    typer.Option(
        "--skip-bad-lines/--no-skip-bad-lines",
        help="Skip (and count) JSONL lines that are not documents.",
    ),  # fmt: skip
]


def check_output_file(path: Path | None, option: str) -> None:
    """Before any work: `path` can be created or replaced (its folder exists and is
    writable, and it is not a directory)."""
    if path is None:
        return
    if path.is_dir():
        raise fail(f"{option} {path} is a directory")
    folder = path.absolute().parent
    if not folder.is_dir():
        raise fail(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise fail(f"{option} {path} cannot be written (permission denied)")


def check_output_dir(path: Path, option: str) -> None:
    """Before any work: `path` is a directory or can be made one."""
    if path.exists() and not path.is_dir():
        raise fail(f"{option} {path} exists and is not a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise fail(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise fail(f"{option} {path} cannot be written (permission denied)")


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


STRUCTURE = "Structured output (one at a time)"
JsonSchemaOption = Annotated[
    str | None,
    typer.Option("--json-schema", metavar="FILE|JSON", rich_help_panel=STRUCTURE,
                 help="The text is JSON that this schema (a file, or the JSON itself) "
                 "accepts."),
]  # fmt: skip
JsonObjectOption = Annotated[
    bool,
    typer.Option("--json-object", rich_help_panel=STRUCTURE, help="The text is a JSON object."),
]
RegexOption = Annotated[
    str | None,
    typer.Option("--regex", metavar="RE", rich_help_panel=STRUCTURE,
                 help="The text matches this regular expression (Rust's syntax)."),
]  # fmt: skip
GrammarOption = Annotated[
    Path | None,
    typer.Option("--grammar", metavar="FILE", rich_help_panel=STRUCTURE,
                 help="The text follows this grammar: Lark's syntax (llguidance's), or "
                 "llama.cpp's GBNF (a file with '::=' rules)."),
]  # fmt: skip
ChoiceOption = Annotated[
    list[str] | None,
    typer.Option("--choice", rich_help_panel=STRUCTURE,
                 help="The text is one of these strings (repeat the option)."),
]  # fmt: skip


def constraint_of(json_schema: str | None = None, json_object: bool = False,
                  regex: str | None = None, grammar: Path | None = None,
                  choice: list[str] | None = None):  # fmt: skip
    """The constraint the options ask for (tvq.text.constraints), None for none; a usage
    error (exit 2) for more than one, or one the grammar engine refuses (its message)."""
    given = {"--json-schema": json_schema is not None, "--json-object": json_object,
             "--regex": regex is not None, "--grammar": grammar is not None,
             "--choice": bool(choice)}  # fmt: skip
    named = [option for option, on in given.items() if on]
    if len(named) > 1:
        raise fail(f"{' and '.join(named)}: give one constraint at a time", 2)
    if not named:
        return None
    from tvq.text.constraints import Constraint, ConstraintError

    try:
        if json_schema is not None:
            path = Path(json_schema)
            source = json_schema if json_schema.lstrip().startswith("{") else read_text(path)
            return Constraint.json_schema(source)
        if json_object:
            return Constraint.json_object()
        if regex is not None:
            return Constraint.regex(regex)
        if grammar is not None:
            text = read_text(grammar)
            return Constraint.gbnf(text) if "::=" in text else Constraint.grammar(text)
        return Constraint.choice(choice)
    except ConstraintError as e:
        raise fail(f"{named[0]}: {e}", 2) from None


def read_text(path: Path) -> str:
    """A small text file's contents; a usage error if it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}", 2) from None
