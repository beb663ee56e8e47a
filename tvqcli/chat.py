"""The session of `tvq chat` and `tvq generate --interactive` (tvqcli/chat_cmd.py holds
the command): continue one text turn by turn. (Over 300 lines: a terminal session's
parts, commands, Ctrl-C, prompts and streaming, all share the Session's state.)

Each line typed (its newline included) is appended to the text, and the model continues
it. The attention state carries over from turn to turn and only the new tokens are fed,
so a turn costs its own tokens whatever came before (the state has a fixed size,
docs/DESIGN.md section 7): turn 1,000 of a conversation costs what turn 1 costs.

stdout is the text itself: the generated text, and the typed lines where the terminal
does not already show them (stdin or stdout is not a terminal). Prompts, help, notes and
errors go to stderr. Ctrl-C during a generation stops it (what was generated stays in
the text); Ctrl-C at the prompt does not quit; Ctrl-D (end of input) or /quit does.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
from pathlib import Path

from tvqcli.app import (
    Dtype,
    check_output_file,
    fail,
    run_settings,
    setting_error,
    state_cache,
    stderr,
)

CONSTRAINTS = ("schema", "regex", "grammar", "choice", "json")
HELP = """\
Type a line and press Enter: it is appended to the text (with its newline) and the model
continues it. A line that starts with / is a command (start it with // to type a /):
  /set NAME VALUE  temperature, top_p, top_k, min_p, max_tokens, or seed (a number, or
                   random: a new one each turn); /set alone shows them
  /set schema FILE|JSON, /set regex RE, /set grammar FILE, /set choice A|B|C,
  /set json object  each turn's text must match it (structured output)
  /unset           turns free again
  /save FILE       save the state (`tvq chat --load-state FILE` continues from it)
  /load FILE       continue from a saved state instead
  /reset           start a new document (the text so far is forgotten)
  /help            this help
  /quit            end the session (so does Ctrl-D)
Ctrl-C stops a generation; what was generated stays in the text."""


@dataclasses.dataclass
class Settings:
    """What /set changes: the sampler, the tokens per turn and the seed."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None  # None: a new random seed each turn

    def sampler(self):
        """The Sampler of these settings; SettingError for a value out of range."""
        import tvq

        return tvq.Sampler(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       min_p=self.min_p)  # fmt: skip

    def check(self) -> None:
        """SettingError (a TvqError) for a value out of range (tvq.text.settings)."""
        from tvq.text.settings import check_all

        check_all(max_tokens=self.max_tokens, seed=self.seed or 0)
        self.sampler()

    def changed(self, name: str, value: str) -> Settings:
        """A copy with `name` set from the text `value`; ValueError saying why not."""
        name = name.replace("-", "_")
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        if name not in kinds:
            raise ValueError(f"unknown setting {name!r} (one of {', '.join(kinds)})")
        if name == "seed" and value == "random":
            return dataclasses.replace(self, seed=None)
        try:
            parsed = float(value) if kinds[name] == "float" else int(value)
        except ValueError:
            kind = "a number" if kinds[name] == "float" else "an integer"
            extra = " or random" if name == "seed" else ""
            raise ValueError(f"{name} must be {kind}{extra}, got {value!r}") from None
        if not math.isfinite(parsed):
            raise ValueError(f"{name} must be a finite number, got {value}")
        return dataclasses.replace(self, **{name: parsed})

    def show(self) -> str:
        seed = "random" if self.seed is None else self.seed
        return (f"max_tokens {self.max_tokens} · temperature {self.temperature} · "
                f"top_p {self.top_p} · top_k {self.top_k} · min_p {self.min_p} · "
                f"seed {seed}")  # fmt: skip


def note(message: str) -> None:
    stderr.print(f"[dim]{message}[/dim]", markup=True, highlight=False, soft_wrap=True)


def complain(message: str) -> None:
    """One red line on stderr; the session goes on."""
    stderr.print(f"[red]error:[/red] {message}", markup=True, highlight=False, soft_wrap=True)


class Session:
    """The text so far as a context (attention state + pending token), the settings, and
    the terminal around them."""

    def __init__(self, base, loaded, settings: Settings, stop: list[str], ignore_eos: bool,
                 verbose: bool, context=None, cache=None):  # fmt: skip
        self.base = base  # state files belong to its parameters, whatever the dtype
        self.loaded = loaded  # the model that runs (the --dtype of the command line)
        self.tokenizer = base.tokenizer
        self.settings = settings
        self.stop = stop
        self.ignore_eos = ignore_eos
        self.verbose = verbose
        self.context = context  # None: the start of a document
        self.cache = cache  # where a turn from the start of a document looks first
        self.constraint = None  # what each turn's text must match (/set schema, /unset)
        self.terminal = sys.stdin.isatty()
        # The terminal shows what is typed; elsewhere stdout carries it, so that stdout
        # is always the whole text.
        self.echo_input = not (self.terminal and sys.stdout.isatty())
        self.line_open = False  # the text on stdout does not end with a newline
        self.after_text = False  # the terminal's cursor is where the text left off
        self.turns = 0
        self.stream = None  # the generation running now (Ctrl-C stops it)

    @property
    def generating(self) -> bool:
        return self.stream is not None

    def on_sigint(self, signum, frame) -> None:
        """Ctrl-C: during a generation, ends it at the next chunk (a second one quits,
        exit 130); anywhere else, KeyboardInterrupt (caught at the prompt)."""
        if self.stream is not None and not self.stream.stopping:
            self.stream.stop()
            return
        raise KeyboardInterrupt

    # -- output ---------------------------------------------------------------------------

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.line_open = not text.endswith("\n")
            self.after_text = self.line_open and sys.stdout.isatty()

    def note(self, message: str, newline: bool = False) -> None:
        """A note on its own line of stderr (a new line first where the terminal's cursor
        is after the text, or `newline`)."""
        if self.terminal and (self.after_text or newline):
            sys.stderr.write("\n")
        self.after_text = False
        note(message)

    # -- input ----------------------------------------------------------------------------

    def read_line(self) -> str | None:
        """The next line with its newline (the last one may have none); None at the end.
        On a terminal, a prompt on stderr, except right after a line the model left
        open: what is typed continues it there (as in llama.cpp's interactive mode)."""
        if self.terminal:
            sys.stderr.write("" if self.after_text else "> ")
            sys.stderr.flush()
            try:
                line = input() + "\n"  # line editing and history when readline is there
            except EOFError:
                return None
            self.after_text = False
            return line
        data = sys.stdin.buffer.readline()
        return data.decode("utf-8", errors="replace") if data else None

    # -- turns ----------------------------------------------------------------------------

    def turn(self, text: str) -> None:
        """Feeds `text` after the text so far, then streams the model's continuation
        until max_tokens, a stop string, the end of the document or Ctrl-C."""
        import tvq
        from tvq.text.settings import random_seed

        settings = self.settings
        seed = random_seed() if settings.seed is None else settings.seed
        # stays set if a second Ctrl-C breaks off the turn: the session then ends
        self.stream = tvq.stream_generate(
            self.loaded, text, max_tokens=settings.max_tokens, sampler=settings.sampler(),
            seed=seed, stop=self.stop, context=self.context, ignore_eos=self.ignore_eos,
            cache=self.cache, constraint=self.constraint,
        )  # fmt: skip
        for event in self.stream:
            if isinstance(event, tvq.Generation):
                result = event
            else:
                self.write(event.text)
        stopped = self.stream.stopping
        self.context = result.context
        self.stream = None
        self.turns += 1
        sample = result.samples[0]
        if sample.finish_reason == "stop":
            # The model has read the stop string (and the rest of its last token): it is
            # part of the text, so it is shown too.
            self.write(self.tokenizer.decode(sample.ids)[len(sample.text) :])
        if sample.finish_reason == "cancelled" or stopped:
            self.note(f"(stopped after {len(sample.ids)} tokens)")
        elif sample.finish_reason == "eos" and self.terminal:
            self.note("(end of document)")
        if self.verbose:
            rate = result.generated_tokens / result.generate_seconds
            cached = f" ({result.cached_tokens} from the state cache)" if result.cached_tokens \
                else ""  # fmt: skip
            self.note(f"turn {self.turns}: fed {result.prompt_tokens} tokens{cached}, generated "
                      f"{result.generated_tokens} ({rate:.0f} tok/s, first after "
                      f"{result.prompt_seconds:.3f} s) · {self.context.tokens} tokens in the "
                      f"state · seed {seed}")  # fmt: skip

    # -- commands -------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Runs a /command; False to end the session. A mistake is one line on stderr."""
        import tvq

        name, _, arg = line[1:].strip().partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return False
        if name == "help":
            print(HELP, file=sys.stderr)
        elif name == "reset":
            self.context = None
            self.note("(new document)")
        elif name == "set" and arg.partition(" ")[0] in CONSTRAINTS:
            self.constrain(*arg.partition(" ")[::2])
        elif name == "set":
            self.set(arg)
        elif name == "unset":
            self.constraint = None
            self.note("(free text)")
        elif name in ("save", "load"):
            if not arg:
                complain(f"/{name} needs a file: /{name} FILE")
                return True
            path = Path(arg).expanduser()
            try:
                if name == "save":
                    context = self.context or tvq.Context.start(self.base)
                    tvq.save_state(path, self.base, context)
                    self.note(f"(saved {context.tokens} tokens' state to {path})")
                else:
                    self.context = tvq.load_state(path, self.base)
                    self.note(f"(loaded the state of {self.context.tokens} tokens from {path})")
            except tvq.TvqError as e:
                complain(str(e))
        else:
            complain(f"unknown command /{name} (/help lists them; start a line with // "
                     f"to type a /)")  # fmt: skip
        return True

    def constrain(self, kind: str, value: str) -> None:
        """/set schema|regex|grammar|choice|json VALUE: each turn's text must match it."""
        from tvq.text.constraints import Constraint, ConstraintError

        value = value.strip()
        if not value:
            complain(f"/set {kind} needs a value (/help)")
            return
        try:
            if kind == "schema":
                text = value if value.startswith("{") else Path(value).expanduser().read_text()
                constraint = Constraint.json_schema(text)
            elif kind == "grammar":
                text = Path(value).expanduser().read_text()
                constraint = Constraint.gbnf(text) if "::=" in text else Constraint.grammar(text)
            elif kind == "regex":
                constraint = Constraint.regex(value)
            elif kind == "choice":
                constraint = Constraint.choice([c for c in value.split("|") if c])
            elif value == "object":
                constraint = Constraint.json_object()
            else:
                raise ConstraintError("/set json object")
        except (OSError, UnicodeDecodeError, ConstraintError) as e:
            complain(f"/set {kind}: {getattr(e, 'strerror', None) or e}")
            return
        self.constraint = constraint
        self.note(f"(each turn's text matches the {kind}; /unset frees it)")

    def set(self, arg: str) -> None:
        import tvq

        if not arg:
            self.note(self.settings.show())
            return
        name, _, value = arg.partition(" ")
        if not value.strip():
            complain(f"/set {name} needs a value: /set NAME VALUE")
            return
        try:
            settings = self.settings.changed(name, value.strip())
            settings.check()
        except (ValueError, tvq.TvqError) as e:
            complain(str(e))
            return
        self.settings = settings
        self.note(f"({settings.show()})")

    # -- the loop -------------------------------------------------------------------------

    def run(self, start: str) -> None:
        """The session: the start text's turn, then a turn or a command per line."""
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self.on_sigint) if in_main else None
        try:
            if self.terminal:
                try:
                    import readline  # noqa: F401  (line editing and history for input())
                except ImportError:
                    pass
                note("Type text and press Enter: the model continues it. /help lists the "
                     "commands; Ctrl-C stops a generation; Ctrl-D quits.")  # fmt: skip
            if start:
                self.write(start)  # not typed at the terminal: shown here
                self.turn(start)
            while True:
                try:
                    if not self.step():
                        break
                except KeyboardInterrupt:
                    if self.generating:  # Ctrl-C twice: the turn was broken off
                        raise
                    self.note("(Ctrl-D or /quit ends the session)", newline=True)
            if self.line_open and sys.stdout.isatty():
                self.write("\n")
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def step(self) -> bool:
        """Reads a line and runs it (a command or a turn); False at the end."""
        line = self.read_line()
        if line is None:
            return False
        if line.startswith("/") and not line.startswith("//"):
            return self.command(line.rstrip("\n"))
        text = line[1:] if line.startswith("//") else line
        if self.echo_input:
            self.write(text)
        self.turn(text)
        return True


def start_text(prompt: str | None, file: Path | None) -> str:
    """The text the session starts with: -f FILE, then the argument (stdin holds the
    turns, so it is never read for this)."""
    if prompt == "-":
        raise fail("stdin holds the turns here: give the start as an argument or with -f", 2)
    parts = []
    if file is not None:
        try:
            parts.append(file.read_bytes().decode("utf-8", errors="replace"))
        except IsADirectoryError:
            raise fail(f"{file} is a directory") from None
        except OSError as e:
            raise fail(f"{file} cannot be read: {e.strerror}") from None
    if prompt:
        parts.append(prompt)
    text = ""
    for part in parts:
        text = text + ("\n" if text and not text.endswith("\n") else "") + part
    return text


def run_chat(*, prompt: str | None, file: Path | None, model: Path | None, max_tokens: int,
             temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None,
             stop: list[str] | None, ignore_eos: bool, verbose: bool, load_state: Path | None,
             save_state: Path | None, dtype: Dtype | None, no_cache: bool = False
             ) -> None:  # fmt: skip
    """The session of `tvq chat` and `tvq generate --interactive`: checks, model, loop."""
    import tvq
    from tvq import require_tokenizer
    from tvq.text.settings import check_stops

    settings = Settings(max_tokens, temperature, top_p, top_k, min_p, seed)
    try:
        settings.check()
        check_stops(stop or [])
    except tvq.SettingError as e:
        raise setting_error(e) from None
    check_output_file(save_state, "--save-state")
    start = start_text(prompt, file)
    base = tvq.load(model)
    require_tokenizer(base)
    context = tvq.load_state(load_state, base) if load_state is not None else None
    session = Session(base, run_settings(base, dtype=dtype), settings, list(stop or []),
                      ignore_eos, verbose, context, state_cache(not no_cache))  # fmt: skip
    session.run(start)
    if save_state is not None:
        tvq.save_state(save_state, base, session.context or tvq.Context.start(base))
