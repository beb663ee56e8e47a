"""`tvq train`'s recipes and plan (docs/DESIGN.md section 11): `--config FILE.toml` gives
any of its options (the command line overrides them), the run's resolved settings are
kept in the model directory as recipe.toml (itself a --config file; written by
tvq.train when the run starts), and `--dry-run` prints the run's plan.

A recipe is TOML: `name = value` with the options' names (`d_model` or `d-model`),
optionally grouped in tables (`[model]`, `[optimizer]`: the table names are for the
reader). The text files and --out stay on the command line.
"""

from __future__ import annotations

import enum
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from tvqcli.app import fail

NOT_IN_RECIPES = ("texts", "out", "config", "dry_run", "verbose", "coordinator",
                  "num_processes", "process_id", "distributed")  # fmt: skip


def load_config(ctx: typer.Context, param, path: Path | None) -> Path | None:
    """--config's callback (eager: before the other options): the file's settings become
    the defaults of the options not given on the command line."""
    if path is None or ctx.resilient_parsing:
        return path
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise fail(f"--config {path} cannot be read: {e.strerror or e}", 2) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise fail(f"--config {path} is not TOML: {e}", 2) from None
    names = {p.name for p in ctx.command.params} - set(NOT_IN_RECIPES)
    values: dict[str, Any] = {}
    for key, value in data.items():
        for name, item in value.items() if isinstance(value, dict) else [(key, value)]:
            option = name.replace("-", "_")
            if option not in names:
                raise fail(f"--config {path}: {name!r} is not a setting of tvq train "
                           "(tvq train --help lists them)", 2)  # fmt: skip
            values[option] = item
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return path


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", metavar="FILE.toml", is_eager=True, callback=load_config,
                 help="Settings from a TOML recipe (recipes/, or a model's recipe.toml); "
                 "the command line overrides them."),
]  # fmt: skip
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="Print the run's plan (parameters, FLOPs per token, "
                 "tokens per step, steps per epoch, memory per device, time per step from "
                 "a few timed steps) and exit; no checkpoint is written."),
]  # fmt: skip


def resolved(ctx: typer.Context) -> dict[str, Any]:
    """Every setting of this run, as a recipe holds it (None: left out)."""
    out = {}
    for param in ctx.command.params:
        if param.name in NOT_IN_RECIPES:
            continue
        value = ctx.params.get(param.name)
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[param.name] = value
    return out


def recipe_text(settings: dict[str, Any], command: str) -> str:
    """The settings as TOML (a None is a comment: the option's default applies)."""
    lines = [f"# tvq train's resolved settings: {command}"]
    for name, value in settings.items():
        if value is None:
            lines.append(f"# {name} = (none)")
        elif isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{name} = {value!r}")
        else:  # strings and lists of strings: JSON's quoting is TOML's basic string
            lines.append(f"{name} = {json.dumps(value, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def print_plan(plan: dict[str, Any]) -> None:
    """The dry run's plan, one setting a line, on stdout."""
    memory = plan["memory_per_device"]
    hours = plan["total_seconds"] / 3600
    rows = [
        ("parameters", f"{plan['parameters']:,}"),
        ("FLOPs per token (forward)", f"{plan['flops_per_token']:.4g}"),
        ("tokens per step", f"{plan['tokens_per_step']:,}"),
        ("steps per epoch", f"{plan['steps_per_epoch']:,} ({plan['epochs']:.2f} epochs "
                            f"in {plan['steps']:,} steps)"),
        ("devices", f"{plan['devices']} × {plan['device_kind']}"),
        ("memory per device", "not reported by this backend" if memory is None else
         f"{_size(memory['total'])} (arguments {_size(memory['arguments'])}, "
         f"temporaries {_size(memory['temporaries'])})"),
        ("time per step", f"{plan['seconds_per_step']:.3f} s (compiling: "
                          f"{plan['compile_seconds']:.1f} s)"),
        ("tokens per second", f"{plan['tokens_per_second']:,.0f}"),
        ("MFU", f"{plan['mfu']:.1%}"),
        ("the whole run", f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
