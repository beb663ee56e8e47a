"""`tvq generate`: stream a continuation of a prompt to stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tvq.text.settings import TERMINAL
from tvqcli.app import (
    ChoiceOption,
    DevicesOption,
    DtypeOption,
    GrammarOption,
    JsonObjectOption,
    JsonSchemaOption,
    ModelOption,
    NoCacheOption,
    RegexOption,
    app,
    check_output_file,
    constraint_of,
    fail,
    finite,
    handle_errors,
    run_settings,
    setting_error,
    state_cache,
    stderr,
)


def read_prompt(prompt: str | None, file: Path | None) -> str:
    """Piped stdin first, then -f FILE or the argument; '-' reads stdin explicitly."""
    parts = []
    explicit_stdin = prompt == "-"
    has_stdin = sys.stdin is not None
    if has_stdin and (explicit_stdin or not sys.stdin.isatty()):
        try:
            data = sys.stdin.buffer.read()
        except (OSError, ValueError):  # closed or unreadable: no prompt from there
            data = b""
        if data:
            parts.append(data.decode("utf-8", errors="replace"))
    if file is not None:
        try:
            parts.append(file.read_bytes().decode("utf-8", errors="replace"))
        except IsADirectoryError:
            raise fail(f"{file} is a directory") from None
        except OSError as e:
            raise fail(f"{file} cannot be read: {e.strerror}") from None
    if prompt and not explicit_stdin:
        parts.append(prompt)
    text = ""
    for part in parts:
        text = text + ("\n" if text and not text.endswith("\n") else "") + part
    return text


@app.command()
@handle_errors
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Prompt text ('-' reads stdin).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read the prompt from FILE.")
    ] = None,
    model: ModelOption = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", "-n", help="Tokens to generate.")
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
    seed: Annotated[int | None, typer.Option(help="Random seed.", show_default="random")] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop before this text (repeatable).")
    ] = None,
    presence_penalty: Annotated[
        float,
        typer.Option(
            help="Subtract from a token's log-prob once it was sampled (OpenAI's).", callback=finite
        ),
    ] = 0.0,
    frequency_penalty: Annotated[
        float,
        typer.Option(
            help="Subtract × times sampled from a token's log-prob (OpenAI's).", callback=finite
        ),
    ] = TERMINAL.sampler.frequency_penalty,
    repeat_penalty: Annotated[
        float,
        typer.Option(
            help="Multiply the log-probs of the last --repeat-last-n tokens "
            "(llama.cpp's; 1 = off).",
            callback=finite,
        ),
    ] = TERMINAL.sampler.repetition_penalty,
    repeat_last_n: Annotated[
        int, typer.Option(help="Tokens --repeat-penalty looks back over (prompt included).")
    ] = TERMINAL.sampler.repeat_last_n,
    logit_bias: Annotated[
        list[str] | None,
        typer.Option(help="ID=BIAS: add BIAS to token ID's log-prob (repeatable; -100 bans)."),
    ] = None,
    num_samples: Annotated[int, typer.Option(help="Samples, generated as one batch.")] = 1,
    ignore_eos: Annotated[
        bool, typer.Option(help="Go on past end-of-document tokens (they print nothing).")
    ] = False,
    echo: Annotated[bool, typer.Option(help="Print the prompt first.")] = False,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are sampled.")] = True,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per sample.")
    ] = False,
    logprobs: Annotated[
        int,
        typer.Option(
            help="With --json: per generated token, its log-prob and the K most likely "
            "tokens (top_logprobs), the model's own before sampling.",
        ),
    ] = 0,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Seed and speed on stderr.")
    ] = False,
    load_state: Annotated[Path | None, typer.Option(help="Continue from a saved state.")] = None,
    save_state: Annotated[Path | None, typer.Option(help="Save the state after the text.")] = None,
    devices: DevicesOption = None,
    dtype: DtypeOption = None,
    no_cache: NoCacheOption = False,
    json_schema: JsonSchemaOption = None,
    json_object: JsonObjectOption = False,
    regex: RegexOption = None,
    grammar: GrammarOption = None,
    choice: ChoiceOption = None,
    interactive: Annotated[
        bool,
        typer.Option(
            "--interactive",
            "-i",
            help="Turn by turn, as `tvq chat`: each line of stdin is appended and the "
            "model continues (-n per turn; the state carries over).",
        ),
    ] = False,
) -> None:
    """Generate text; tokens stream to stdout as they are sampled.

    Several samples (--num-samples) are split over the devices."""
    if interactive:
        _refuse_with_interactive(num_samples, json_output, logprobs, stream)
        from tvqcli.chat import run_chat  # the session of `tvq chat`

        run_chat(prompt=prompt, file=file, model=model, max_tokens=max_tokens,
                 temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                 stop=stop, ignore_eos=ignore_eos, verbose=verbose, load_state=load_state,
                 save_state=save_state, dtype=dtype, no_cache=no_cache)  # fmt: skip
        return
    import tvq
    from tvq.text.settings import check_all, check_stops, random_seed

    if logprobs and not json_output:
        raise fail("--logprobs needs --json (they are written into each sample's object)", 2)
    if save_state is not None and num_samples != 1:
        raise fail("--save-state needs --num-samples 1 (one text, one state)", 2)
    seed = random_seed() if seed is None else seed
    try:
        check_all(max_tokens=max_tokens, num_samples=num_samples, seed=seed, logprobs=logprobs)
        check_stops(stop or [])
        sampler = tvq.Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty,
                              repetition_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                              logit_bias=parse_logit_bias(logit_bias or []))  # fmt: skip
    except tvq.SettingError as e:
        raise setting_error(e) from None
    constraint = constraint_of(json_schema, json_object, regex, grammar, choice)
    check_output_file(save_state, "--save-state")
    text = read_prompt(prompt, file)
    base = tvq.load(model)  # state files belong to its parameters, whatever the dtype
    _check_for_model(base, sampler, logprobs)
    context = tvq.load_state(load_state, base) if load_state is not None else None
    live = stream and num_samples == 1 and not json_output
    if echo and not json_output:
        _write(text)
    result = _run(tvq.stream_generate(
        run_settings(base, dtype=dtype), text, max_tokens=max_tokens, sampler=sampler,
        seed=seed, num_samples=num_samples, stop=stop or [], context=context,
        ignore_eos=ignore_eos, devices=devices, logprobs=logprobs,
        alternatives=_alternatives(logprobs, base.config.n_vocab),
        cache=state_cache(not no_cache), constraint=constraint,
    ), live)  # fmt: skip
    _print_samples(result, base.tokenizer, json_output, live, echo, logprobs)
    if save_state is not None:
        tvq.save_state(save_state, base, result.context)
    if verbose:
        _report(result)


def _alternatives(logprobs: int, n_vocab: int) -> int:
    """How many alternatives the loop finds per token: as many for any --logprobs up to
    LOGPROB_ALTERNATIVES, so a new value compiles nothing (none without --logprobs)."""
    from tvq.text.settings import LOGPROB_ALTERNATIVES

    return max(logprobs, min(LOGPROB_ALTERNATIVES, n_vocab)) if logprobs else 0


def _refuse_with_interactive(num_samples: int, json_output: bool, logprobs: int,
                             stream: bool) -> None:  # fmt: skip
    refused = [name for name, used in (
        ("--num-samples", num_samples != 1), ("--json", json_output), ("--logprobs", logprobs),
        ("--no-stream", not stream),
    ) if used]  # fmt: skip
    if refused:
        raise fail(f"{refused[0]} does not go with --interactive (one text, streamed)", 2)


def _check_for_model(model, sampler, logprobs: int) -> None:
    """The settings that depend on the model: usage errors."""
    import tvq
    from tvq import require_tokenizer

    require_tokenizer(model)
    try:
        sampler.check_vocabulary(model.config.n_vocab)
    except tvq.SettingError as e:
        raise setting_error(e) from None
    if logprobs > model.config.n_vocab:
        raise fail(f"--logprobs must be at most the vocabulary size {model.config.n_vocab}, "
                   f"got {logprobs}", 2)  # fmt: skip


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run(stream, live: bool):
    """The stream to its end, each piece written as it comes when live → the
    Generation."""
    import tvq

    with stream:
        for event in stream:
            if isinstance(event, tvq.Generation):
                return event
            if live and event.text:
                _write(event.text)
    raise AssertionError("a generation stream ends with its Generation")


def _timings(result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "cached_tokens": result.cached_tokens,
        "prompt_seconds": round(result.prompt_seconds, 4),
        "prompt_tokens_per_second": round(
            result.prompt_tokens / max(result.prompt_seconds, 1e-9), 1
        ),
        "generated_tokens": result.generated_tokens,
        "generate_seconds": round(result.generate_seconds, 4),
        "tokens_per_second": round(result.generated_tokens / result.generate_seconds, 1),
    }


def _print_samples(result, tokenizer, json_output: bool, live: bool, echo: bool,
                   logprobs: int) -> None:  # fmt: skip
    """The samples not streamed already: as JSON objects, or text apart."""
    from tvq.text.tokenizer import top_entries

    out = sys.stdout
    timings = _timings(result)
    for i, sample in enumerate(result.samples):
        if json_output:
            record = {"text": sample.text, "tokens": sample.ids,
                      "logprobs": [round(x, 6) for x in sample.log_probs],
                      "finish_reason": sample.finish_reason, "seed": result.seed, "sample": i,
                      "timings": timings}  # fmt: skip
            if logprobs:
                record["top_logprobs"] = [
                    top_entries(tokenizer, *zip(*top, strict=True)) for top in sample.top_logprobs
                ]
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif not live:
            out.write(("\n\n" if i else "") + sample.text)
    if not json_output and (result.samples[-1].text or echo) and out.isatty():
        out.write("\n")
    out.flush()


def _report(result) -> None:
    timings = _timings(result)
    stderr.print(
        f"seed {result.seed} · prompt {result.prompt_tokens} tokens "
        f"({result.cached_tokens} from the state cache), "
        f"{timings['prompt_tokens_per_second']:.0f} tok/s · generated "
        f"{result.generated_tokens} tokens, {timings['tokens_per_second']:.0f} tok/s"
        f" · {result.devices} device{'s' if result.devices > 1 else ''}",
        highlight=False,
    )


def parse_logit_bias(items: list[str]) -> tuple[tuple[int, float], ...]:
    """--logit-bias ID=BIAS values → ((id, bias), ...); a usage error names the bad one."""
    pairs = []
    for item in items:
        token, _, bias = item.partition("=")
        try:
            pairs.append((int(token), float(bias)))
        except ValueError:
            raise fail(f"--logit-bias takes ID=BIAS (e.g. 13=-100), got {item!r}", 2) from None
    return tuple(pairs)
