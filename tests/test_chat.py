"""`tvq chat` and `tvq generate --interactive`: turns through real pipes and signals.

The contract: a conversation is one text. What a turn prints is what `tvq.generate` gives
run once over every token fed before it (the typed lines and the earlier continuations),
so the state carried from turn to turn is exact; a saved state continues as the process
that saved it would have. stdout holds the whole text (typed lines included, since no
terminal shows them here), each turn's continuation being the text of its sampled ids.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import save_byte_model
from tvqcli.main import app

# The child takes SIGINT as a terminal delivers it, whatever the test worker that starts
# it inherited (as in tests/test_cli.py).
INTERRUPTIBLE = (
    "import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'tvq'; "
    "runpy.run_module('tvqcli', run_name='__main__')"
)
# The CLI's sampler defaults (-t 0.8, --top-p 0.95)
DEFAULT_SAMPLER = dict(temperature=0.8, top_p=0.95)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_byte_model(tmp_path_factory.mktemp("chat") / "model", seed=0)


@pytest.fixture(scope="module")
def model(model_dir):
    return tvq.load(model_dir)


def env() -> dict:
    return dict(os.environ, TVQ_CACHE_DIR=os.environ.get("TVQ_TEST_CACHE", "/tmp/tvq-test-cache"))


def chat(*args, input: bytes, timeout: int = 300) -> subprocess.CompletedProcess:
    """`tvq ARGS` with `input` piped in; checks exit 0 and no traceback."""
    done = subprocess.run([sys.executable, "-m", "tvqcli", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, env=env())  # fmt: skip
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    assert b"Traceback" not in done.stderr
    return done


def turn(model, ids, max_tokens, seed, stop=(), ignore_eos=False, **sampler):
    """One continuation of the token ids, by the library → (its ids, the text a turn
    shows: the text of every sampled id)."""
    sampler = tvq.Sampler(**(sampler or DEFAULT_SAMPLER))
    sample = tvq.generate(model, ids, max_tokens=max_tokens, sampler=sampler, seed=seed,
                          stop=list(stop), ignore_eos=ignore_eos).samples[0]  # fmt: skip
    return sample.ids, model.tokenizer.decode(sample.ids)


def test_turns_carry_the_text_exactly(model_dir, model):
    """Two turns print what one generate over everything fed before each prints; chat
    and generate --interactive run the same session."""
    encode = model.tokenizer.encode
    first_ids, first = turn(model, encode("ROMEO.\n"), 20, seed=1)
    _, second = turn(model, encode("ROMEO.\n") + first_ids + encode("JULIET.\n"), 20, seed=1)
    assert first and second and first != second
    expected = "ROMEO.\n" + first + "JULIET.\n" + second
    lines = b"ROMEO.\nJULIET.\n"
    assert chat("chat", "-m", model_dir, "-n", 20, "--seed", 1, input=lines).stdout.decode() == (
        expected
    )
    done = chat("generate", "-i", "-m", model_dir, "-n", 20, "--seed", 1, input=lines)
    assert done.stdout.decode() == expected


def test_save_then_load_continues_as_one_process(model_dir, model, tmp_path):
    state = tmp_path / "romeo.state"
    whole = chat("chat", "-m", model_dir, "-n", 16, "--seed", 3,
                 input=f"ROMEO.\n/save {state}\nJULIET.\n".encode()).stdout.decode()  # fmt: skip
    assert state.exists()
    later = chat("chat", "-m", model_dir, "-n", 16, "--seed", 3,
                 input=f"/load {state}\nJULIET.\n".encode()).stdout.decode()  # fmt: skip
    _, first = turn(model, model.tokenizer.encode("ROMEO.\n"), 16, seed=3)
    assert later.startswith("JULIET.\n") and len(later) > len("JULIET.\n")
    assert whole == "ROMEO.\n" + first + later


def test_commands_and_mistakes(model_dir, model):
    """/set temperature 0 makes the turn greedy; a bad command or value is one line on
    stderr and the session goes on; /set top_k and max_tokens take effect too."""
    encode = model.tokenizer.encode
    lines = b"/frobnicate now\n/set temperature hot\n/set top_p 2\n/set temperature 0\nROMEO.\n"
    lines += b"/set temperature 1\n/set top_k 3\n/set max_tokens 5\nJULIET.\n/help\n"
    done = chat("chat", "-m", model_dir, "-n", 12, "--seed", 5, input=lines)
    greedy_ids, greedy = turn(model, encode("ROMEO.\n"), 12, seed=5, temperature=0)
    _, sampled = turn(model, encode("ROMEO.\n"), 12, seed=5)
    assert greedy != sampled  # the setting made a difference
    ids = encode("ROMEO.\n") + greedy_ids + encode("JULIET.\n")
    _, top3 = turn(model, ids, 5, seed=5, temperature=1, top_k=3, top_p=0.95)
    assert done.stdout.decode() == "ROMEO.\n" + greedy + "JULIET.\n" + top3
    errors = [line for line in done.stderr.decode().splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert "/frobnicate" in errors[0]
    assert errors[1] == "error: temperature must be a number, got 'hot'"
    assert errors[2] == "error: top-p must be in (0, 1], got 2.0"
    assert "/save FILE" in done.stderr.decode()  # /help, on stderr


def test_stop_string_stays_in_the_text(model_dir, model):
    """A stop string ends the turn; the model has read it, so it is shown and the next
    turn continues after it."""
    encode = model.tokenizer.encode
    _, text = turn(model, encode("ROMEO.\n"), 40, seed=2)
    stop = next(c for c in text[3:] if c != "\ufffd")
    first_ids, first = turn(model, encode("ROMEO.\n"), 40, seed=2, stop=[stop])
    assert first.endswith(stop) and len(first_ids) < 40
    _, second = turn(model, encode("ROMEO.\n") + first_ids + encode("JULIET.\n"), 40, seed=2,
                     stop=[stop])  # fmt: skip
    done = chat("chat", "-m", model_dir, "-n", 40, "--seed", 2, "--stop", stop,
                input=b"ROMEO.\nJULIET.\n")  # fmt: skip
    assert done.stdout.decode() == "ROMEO.\n" + first + "JULIET.\n" + second


class Pipe:
    """Everything a child writes to one pipe, collected by a thread (so it never blocks)."""

    def __init__(self, stream) -> None:
        self.data = b""
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(65536):
            self.data += chunk

    def wait_for(self, test, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while not test(self.data):
            assert time.time() < deadline, self.data[-2000:]
            time.sleep(0.05)


def test_ctrl_c_stops_the_generation_not_the_session(model_dir, model):
    """SIGINT during a (near endless) generation stops it at the next chunk; the text
    keeps what was generated; SIGINT at the prompt says how to quit; the next lines go
    on from exactly there, and the end of input exits 0."""
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTIBLE, "chat", "-m", str(model_dir), "-n", "1000000",
         "--seed", "4", "--ignore-eos"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
    )  # fmt: skip
    try:
        out, err = Pipe(proc.stdout), Pipe(proc.stderr)
        proc.stdin.write(b"ROMEO.\n")
        proc.stdin.flush()
        out.wait_for(lambda data: len(data) > len(b"ROMEO.\n"))  # generating
        proc.send_signal(signal.SIGINT)
        err.wait_for(lambda data: b"(stopped after" in data)
        proc.send_signal(signal.SIGINT)  # now at the prompt
        err.wait_for(lambda data: b"/quit ends the session" in data)
        proc.stdin.write(b"/set max_tokens 6\nJULIET.\n")
        proc.stdin.close()
        assert proc.wait(timeout=240) == 0, err.data
        out.thread.join(10)
        err.thread.join(10)
    finally:
        proc.kill()
    count = int(re.search(rb"\(stopped after (\d+) tokens\)", err.data).group(1))
    assert 0 < count < 1_000_000
    encode = model.tokenizer.encode
    first_ids, first = turn(model, encode("ROMEO.\n"), count, seed=4, ignore_eos=True)
    ids = encode("ROMEO.\n") + first_ids + encode("JULIET.\n")
    _, second = turn(model, ids, 6, seed=4, ignore_eos=True)
    assert out.data.decode() == "ROMEO.\n" + first + "JULIET.\n" + second
    assert b"Traceback" not in err.data


runner = CliRunner()


def test_end_of_input_and_bad_options(model_dir):
    """No input: exit 0 and nothing on stdout. Bad options: one line, exit 2."""
    done = runner.invoke(app, ["chat", "-m", str(model_dir)], input="")
    assert done.exit_code == 0 and done.stdout == ""
    for args, message in [
        (["chat", "-n", "-1"], "--max-tokens must be >= 0"),
        (["chat", "-t", "-1"], "temperature must be >= 0"),
        (["chat", "--top-p", "0"], "top-p must be in (0, 1]"),
        (["chat", "-"], "stdin holds the turns"),
        (["generate", "-i", "--json"], "--json does not go with --interactive"),
        (["generate", "-i", "--num-samples", "2"], "--num-samples does not go with"),
    ]:
        done = runner.invoke(app, [*args, "-m", str(model_dir)], input="")
        assert done.exit_code == 2, (args, done.output)
        assert message in done.stderr and "Traceback" not in done.output


def test_structured_turns(model_dir, model):
    """/set choice and /set regex constrain each turn's text until /unset; a bad one is
    one line and the session goes on."""
    import re

    lines = (
        b"/set regex [a-\n/set choice yes|no\nQ1\n/set regex [0-9]{3}\nQ2\n/unset\nQ3\n"
        b'/set schema {"type": "object", "properties": {"a": {"type": "integer", '
        b'"maximum": 9}}, "required": ["a"], "additionalProperties": false}\nQ4\n'
    )
    done = chat("chat", "-m", model_dir, "-n", 40, "--seed", 2, input=lines)
    text = done.stdout.decode()
    match = re.fullmatch(r"Q1\n(yes|no)Q2\n([0-9]{3})Q3\n(.*)Q4\n(\{\"a\": [0-9]\})",
                         text, re.S)  # fmt: skip
    assert match, text
    errors = [line for line in done.stderr.decode().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: /set regex: invalid regex")
