"""`tvq prepare`: tokenize a corpus once into memory-mapped shards that `tvq train DATA`
reads (docs/DESIGN.md section 11); and the progress display both commands share."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tvq.corpus import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE
from tvqcli.app import (
    BytesOption,
    SkipBadLinesOption,
    TextFieldOption,
    TokenizerFileOption,
    ValFractionOption,
    ValOption,
    app,
    check_output_dir,
    fail,
    handle_errors,
    stderr,
)
from tvqcli.prepare_output import PrepareProgress


@app.command()
@handle_errors
def prepare(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Text files (one document each), JSONL files (one per line), "
            "either also .gz, or directories of them."
        ),
    ],  # fmt: skip
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the prepared dataset.")],
    tokenizer: TokenizerFileOption = None,
    use_bytes: BytesOption = False,
    vocab_size: Annotated[
        int, typer.Option(help="Vocabulary of a new tokenizer.", min=1)
    ] = DEFAULT_VOCAB_SIZE,
    val: ValOption = None,
    val_fraction: ValFractionOption = DEFAULT_VAL_FRACTION,
    seed: Annotated[int, typer.Option(help="Seed of the held-out choice (tvq train's).")] = 0,
    text_field: TextFieldOption = "text",
    skip_bad_lines: SkipBadLinesOption = False,
    workers: Annotated[
        int | None, typer.Option(help="Processes (default: one per core).", min=1)
    ] = None,
) -> None:
    """Tokenize text once into memory-mapped token shards for `tvq train DATA`.

    Run again on the same inputs, it finds the dataset up to date and does nothing."""
    from tvq.corpus import prepare as preparing
    from tvq.corpus.shards import INFO_FILE, TRAIN, VAL
    from tvq.text.tokenizer import ByteTokenizer, SentencePieceTokenizer

    check_output_dir(out, "--out")
    if tokenizer is not None and use_bytes:
        raise fail("give one tokenizer: --tokenizer FILE or --bytes, not both", 2)
    if out.is_dir() and any(out.iterdir()) and not (out / INFO_FILE).is_file():
        raise fail(f"--out {out} holds other files; use an empty or new folder")
    chosen = ByteTokenizer() if use_bytes else (
        SentencePieceTokenizer(tokenizer) if tokenizer is not None else None)  # fmt: skip
    req = preparing.request(inputs, tokenizer=chosen, vocab_size=vocab_size, held_out=val or [],
                            val_fraction=val_fraction, seed=seed, text_field=text_field,
                            skip_bad_lines=skip_bad_lines)  # fmt: skip
    with PrepareProgress() as report:
        data = preparing.prepare(req, out=out, workers=workers, on_event=report)
    train, held = data.info["splits"][TRAIN], data.info["splits"][VAL]
    stderr.print(
        f"{out}: {train['documents']} training documents ({train['tokens']} tokens), "
        f"{held['documents']} held out ({held['tokens']} tokens); "
        f"train with: tvq train {out} --out MODEL",
        highlight=False,
        soft_wrap=True,
    )
