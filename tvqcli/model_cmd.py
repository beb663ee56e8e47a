"""`tvq info` and `tvq convert`: look inside a model, import a reference checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tvqcli.app import app, check_output_dir, fail, handle_errors, stderr


@app.command()
@handle_errors
def info(
    model: Annotated[
        Path | None, typer.Argument(help="Model directory.", show_default="built-in")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    devices: Annotated[
        bool, typer.Option("--devices", help="Show the devices JAX sees instead of a model.")
    ] = False,
) -> None:
    """Architecture, parameters, tokenizer, training metadata, state size, block length."""
    import tvq

    if devices:
        from tvq.distributed.devices import describe

        seen = describe()
        if json_output:
            typer.echo(json.dumps(seen, indent=2))
        else:
            for key, value in seen.items():
                typer.echo(f"  {key:<14} {', '.join(value) if isinstance(value, list) else value}")
        return
    loaded = tvq.load(model)
    tok = loaded.tokenizer
    report = {
        "model": str(model) if model else "built-in",
        "config": loaded.config.to_dict(),
        "parameters": loaded.param_count,
        "tokenizer": None if tok is None else {
            "kind": tok.kind, "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint,
        },
        "state_bytes_per_sequence": loaded.state_bytes_per_sequence,
        "block_len": loaded.block_len,
        "metadata": loaded.metadata,
    }  # fmt: skip
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    out = Console(highlight=False)
    out.print(f"[bold]{report['model']}[/bold]")
    rows = dict(loaded.config.to_dict())
    rows["parameters"] = f"{loaded.param_count:,}"
    if tok is not None:
        rows["tokenizer"] = f"{tok.kind}, {tok.vocab_size} ids, {tok.fingerprint[:23]}…"
    rows["state bytes/sequence"] = f"{loaded.state_bytes_per_sequence:,}"
    rows["default block_len"] = loaded.block_len
    for key, value in loaded.metadata.items():
        if key not in ("train_settings", "tokenizer"):  # settings: see --json
            rows[key] = value
    for key, value in rows.items():
        out.print(f"  {key:<22} {value}")


@app.command()
@handle_errors
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Reference checkpoint (dir or file).")],
    flags: Annotated[Path, typer.Option(help="JSON file of the reference launch flags.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    tokenizer: Annotated[
        Path | None, typer.Option(help="Sentencepiece .model the checkpoint was trained with.")
    ] = None,
    use_bytes: Annotated[bool, typer.Option("--bytes", help="Byte-level vocabulary.")] = False,
) -> None:
    """Turn a checkpoint of the reference implementation into a tvq model directory."""
    import tvq
    from tvq.text.tokenizer import open_tokenizer

    if tokenizer is None and not use_bytes:
        raise fail("give the checkpoint's vocabulary: --tokenizer FILE or --bytes", 2)
    if tokenizer is not None and use_bytes:
        raise fail("give one vocabulary: --tokenizer FILE or --bytes, not both", 2)
    check_output_dir(out, "--out")
    if out.exists() and any(out.iterdir()):
        raise fail(f"--out {out} exists and is not empty")
    tok = open_tokenizer(tokenizer, use_bytes=use_bytes)
    model = tvq.Model.from_reference(checkpoint, flags)
    model = dataclasses.replace(
        model, tokenizer=tok, metadata={"converted_from": str(checkpoint), "flags": str(flags)}
    )
    model.save(out)
    stderr.print(f"wrote {out} ({model.param_count:,} parameters)", highlight=False)
