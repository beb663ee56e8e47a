"""The command line: generate, score, state files, convert, errors; CliRunner and real pipes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import save_byte_model, tiny_config
from tvq.decoding import generate
from tvq.runtime.context import score_ids
from tvq.text.sampling import Sampler
from tvq.text.tokenizer import ByteTokenizer
from tvqcli.main import app

runner = CliRunner()
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_byte_model(tmp_path_factory.mktemp("cli") / "model", seed=0)


def invoke(*args, input=None, code=0):
    """Runs the CLI in-process and checks its exit code (0 unless told otherwise)."""
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == code, (args, result.exit_code, result.output)
    assert "Traceback" not in result.output
    return result


def cli(*args, input=None, timeout=300, **kwargs):
    env = dict(os.environ, TVQ_CACHE_DIR=os.environ.get("TVQ_TEST_CACHE", "/tmp/tvq-test-cache"))
    done = subprocess.run([sys.executable, "-m", "tvqcli", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, env=env, **kwargs)  # fmt: skip
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    return done


# -- generate -----------------------------------------------------------------------------


def test_decoding_equals_scoring(model_dir):
    """docs/DESIGN.md invariant 6: what the sampler saw is what scoring the text gives."""
    model = tvq.load(model_dir)
    prompt = model.tokenizer.encode("Once upon")
    for sampler in (Sampler(temperature=1.0), Sampler(temperature=0.7, top_k=20, top_p=0.9)):
        sample = generate(model, prompt, max_tokens=40, sampler=sampler, seed=5).samples[0]
        scored, _ = score_ids(model, prompt + sample.ids, keep_log_probs=True)
        np.testing.assert_allclose(
            scored.log_probs[0, len(prompt):], sample.log_probs, atol=1e-5
        )  # fmt: skip
        assert sample.text == model.tokenizer.decode(sample.ids)


def test_generate_is_repeatable_and_streams(model_dir):
    args = ("generate", "The king", "-m", model_dir, "-n", 25, "--seed", 7)
    first, second = invoke(*args), invoke(*args)
    assert first.stdout == second.stdout and len(first.stdout) > 0
    other = invoke("generate", "The king", "-m", model_dir, "-n", 25, "--seed", 8)
    assert other.stdout != first.stdout
    record = json.loads(invoke(*args, "--json").stdout)
    assert record["text"] == first.stdout
    assert len(record["tokens"]) == 25 and record["finish_reason"] == "length"
    assert record["seed"] == 7
    assert ByteTokenizer().decode(record["tokens"]) == record["text"]


def test_generate_ignore_eos(model_dir):
    """Seed 13 samples an end of document at once; --ignore-eos samples on to -n."""
    args = ("generate", "-m", model_dir, "-n", 40, "--seed", 13, "-t", 1.5, "--json")
    ended = json.loads(invoke(*args).stdout)
    assert (ended["finish_reason"], len(ended["tokens"])) == ("eos", 1)
    record = json.loads(invoke(*args, "--ignore-eos").stdout)
    assert (record["finish_reason"], len(record["tokens"])) == ("length", 40)


def test_generate_greedy_batch_and_echo(model_dir):
    result = invoke("generate", "ab", "-m", model_dir, "-n", 10, "-t", 0, "--num-samples", 3,
                    "--json")  # fmt: skip
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3
    assert records[0]["tokens"] == records[1]["tokens"] == records[2]["tokens"]  # greedy
    echoed = invoke("generate", "ab", "-m", model_dir, "-n", 5, "-t", 0, "--echo")
    assert echoed.stdout == "ab" + ByteTokenizer().decode(records[0]["tokens"][:5])


def test_stop_string(model_dir):
    full = json.loads(invoke("generate", "x", "-m", model_dir, "-n", 40, "--seed", 3,
                             "--json").stdout)["text"]  # fmt: skip
    stop = full[10:13]
    cut = invoke("generate", "x", "-m", model_dir, "-n", 40, "--seed", 3, "--stop", stop)
    assert cut.stdout == full[: full.find(stop)]
    record = json.loads(invoke("generate", "x", "-m", model_dir, "-n", 40, "--seed", 3,
                               "--stop", stop, "--json").stdout)  # fmt: skip
    assert record["finish_reason"] == "stop"


def test_prompt_sources(model_dir, tmp_path):
    base = ("-m", model_dir, "-n", 8, "-t", 0, "--json")
    by_arg = json.loads(invoke("generate", "hello", *base).stdout)
    (tmp_path / "p.txt").write_text("hello")
    by_file = json.loads(invoke("generate", "-f", tmp_path / "p.txt", *base).stdout)
    by_stdin = json.loads(cli("generate", "-", *base, input=b"hello").stdout)
    assert by_arg["tokens"] == by_file["tokens"] == by_stdin["tokens"]
    both = json.loads(cli("generate", "world", *base, input=b"hello\n").stdout)
    together = json.loads(invoke("generate", "hello\nworld", *base).stdout)
    assert both["tokens"] == together["tokens"]  # piped text first, then the argument
    # closed, empty stdin: no hang, start of a document
    empty = cli("generate", "-m", model_dir, "-n", 8, "--seed", 2, "--json", input=b"")
    record = json.loads(empty.stdout)
    assert empty.returncode == 0 and 1 <= len(record["tokens"]) <= 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-t", "-1"), "temperature must be >= 0"),
        (("--top-p", "0"), "top-p must be in (0, 1]"),
        (("--top-p", "1.5"), "top-p must be in (0, 1]"),
        (("-n", "-3"), "max-tokens must be >= 0"),
        (("--min-p", "1"), "min-p must be in [0, 1)"),
    ],
)
def test_generate_bad_options(model_dir, args, message):
    result = invoke("generate", "hi", "-m", model_dir, *args, code=2)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output


def test_generate_into_closed_pipe_is_quiet(model_dir):
    """`tvq generate | head -c 20`: tvq itself exits 0 with nothing on stderr."""
    tvq_proc = subprocess.Popen(
        [sys.executable, "-m", "tvqcli", "generate", "-m", str(model_dir), "-n", "5000",
         "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    head = subprocess.Popen(["head", "-c", "20"], stdin=tvq_proc.stdout, stdout=subprocess.PIPE)
    tvq_proc.stdout.close()  # head alone holds the read end: its exit breaks the pipe
    out, _ = head.communicate(timeout=300)
    err = tvq_proc.stderr.read()
    assert tvq_proc.wait(timeout=300) == 0, err
    assert len(out) == 20
    assert err == b""


# -- score --------------------------------------------------------------------------------


def test_score_formats_and_totals(model_dir, tmp_path):
    a, b = DATA / "hamlet_head.txt", DATA / "macbeth_head.txt"
    rows = json.loads(invoke("score", a, b, "-m", model_dir, "--format", "json").stdout)
    assert [r["file"] for r in rows] == [str(a), str(b), "TOTAL"]
    keys = {"file", "bytes", "tokens", "nll", "perplexity", "bits_per_token", "bits_per_byte",
            "words", "word_perplexity", "nll_stderr", "perplexity_ci95", "protocol", "window",
            "stride"}  # fmt: skip
    assert set(rows[0]) == keys
    assert rows[0]["words"] == len(a.read_bytes().split())
    # several files scored together report each file's error as scoring it alone does
    alone = json.loads(invoke("score", a, "-m", model_dir, "--format", "json").stdout)[0]
    assert rows[0]["nll_stderr"] == pytest.approx(alone["nll_stderr"], rel=1e-4)
    assert rows[0]["bytes"] == a.stat().st_size == rows[0]["tokens"]  # bytes tokenizer
    total = rows[2]
    assert total["tokens"] == rows[0]["tokens"] + rows[1]["tokens"]
    expected = (rows[0]["nll"] * rows[0]["tokens"] + rows[1]["nll"] * rows[1]["tokens"]) / total[
        "tokens"
    ]
    assert abs(total["nll"] - expected) < 1e-9
    assert (
        abs(total["bits_per_byte"] - total["nll"] * total["tokens"] / np.log(2) / total["bytes"])
        < 1e-9
    )
    csv_text = invoke("score", a, "-m", model_dir, "--format", "csv").stdout
    assert csv_text.splitlines()[0] == (
        "file,bytes,tokens,nll,perplexity,bits_per_token,bits_per_byte,words,word_perplexity,"
        "nll_stderr,perplexity_ci95,protocol,window,stride"
    )
    lines = invoke("score", a, "-m", model_dir, "--format", "jsonl").stdout.splitlines()
    # alone, or batched with another file: the same numbers, to float rounding
    assert json.loads(lines[0])["nll"] == pytest.approx(rows[0]["nll"], abs=1e-5)
    model = tvq.load(model_dir)  # the CLI equals the library, with full context
    ids = model.tokenizer.encode(a.read_text())
    scored, _ = score_ids(model, ids)
    assert abs(scored.nll - rows[0]["nll"]) < 1e-5


def test_score_per_token_and_stdin(model_dir, tmp_path):
    text = "Ünïcödé is fine.\n"
    (tmp_path / "u.txt").write_text(text)
    out = tmp_path / "tokens.jsonl"
    result = invoke("score", tmp_path / "u.txt", "-m", model_dir, "--per-token", out,
                    "--format", "json")  # fmt: skip
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == len(text.encode())
    assert records[-1]["offset"] == len(text.encode()) - 1
    assert sum(r["logprob"] for r in records) == pytest.approx(
        -json.loads(result.stdout)[0]["nll"] * len(records), abs=1e-3
    )
    piped = cli("score", "-", "-m", model_dir, "--format", "jsonl", input=text.encode())
    assert json.loads(piped.stdout.splitlines()[0])["nll"] == pytest.approx(
        json.loads(result.stdout)[0]["nll"], abs=1e-6
    )


def test_score_edge_cases(model_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    rows = json.loads(invoke("score", tmp_path / "empty.txt", "-m", model_dir, "--format",
                             "json").stdout)  # fmt: skip
    assert rows[0]["tokens"] == 0 and rows[0]["nll"] == 0.0 and rows[0]["bits_per_byte"] == 0.0
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes\n")
    bad = invoke("score", tmp_path / "bad.txt", "-m", model_dir, "--format", "json")
    assert bad.exit_code == 0
    for args, message in [
        ((tmp_path / "nope.txt",), "does not exist"),
        ((tmp_path,), "is a directory"),
    ]:
        result = invoke("score", *args, "-m", model_dir, code=1)
        assert message in result.stderr
    result = invoke("score", DATA / "hamlet_head.txt", "-m", tmp_path, code=1)
    assert "not a tvq model directory" in result.stderr
    invoke("score", DATA / "hamlet_head.txt", "-m", model_dir, "--format", "xml", code=2)


# The child takes SIGINT as a terminal delivers it, whatever the test worker that starts
# it inherited (a blocked or ignored SIGINT is passed on to children); set in the child
# itself, not in a preexec_fn, which is unsafe after fork in a multithreaded process.
INTERRUPTIBLE = (
    "import runpy, signal, sys; signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT]); "
    "signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'tvq'; "
    "runpy.run_module('tvqcli', run_name='__main__')"
)


def test_sigint_prints_partial_results(model_dir, tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes((DATA / "macbeth_head.txt").read_bytes() * 4000)  # 24 MB: far from done
    env = dict(os.environ, TVQ_CACHE_DIR=str(tmp_path / "cache"))
    tokens = tmp_path / "tokens.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, "score", str(big), "-m",
                             str(model_dir), "--format", "jsonl", "--per-token", str(tokens)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    deadline = time.time() + 200
    while time.time() < deadline and not (tokens.exists() and tokens.stat().st_size > 0):
        time.sleep(0.1)  # wait for the first scored chunk
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[-1]["file"] == "TOTAL" and rows[-1]["partial"] is True
    assert 0 < rows[-1]["bytes"] < big.stat().st_size
    assert b"partial" in err and b"Traceback" not in err


# -- state files --------------------------------------------------------------------------


def test_state_file_continues_exactly(model_dir, tmp_path):
    text = (DATA / "hamlet_head.txt").read_text()
    part_a, part_b = text[:1500], text[1500:3000]
    (tmp_path / "a.txt").write_text(part_a)
    (tmp_path / "b.txt").write_text(part_b)
    (tmp_path / "ab.txt").write_text(part_a + part_b)
    state = tmp_path / "a.state"
    first = invoke("score", tmp_path / "a.txt", "-m", model_dir, "--save-state", state,
                   "--format", "json")  # fmt: skip
    assert first.exit_code == 0, first.output
    whole = json.loads(invoke("score", tmp_path / "ab.txt", "-m", model_dir, "--format",
                              "json").stdout)[0]  # fmt: skip
    a = json.loads(first.stdout)[0]
    b = json.loads(invoke("score", tmp_path / "b.txt", "-m", model_dir, "--load-state", state,
                          "--format", "json").stdout)[0]  # fmt: skip
    joined = (a["nll"] * a["tokens"] + b["nll"] * b["tokens"]) / whole["tokens"]
    assert abs(joined - whole["nll"]) < 1e-5
    # generating after the saved state equals generating with the text as prompt
    resumed = invoke("generate", "-m", model_dir, "--load-state", state, "-n", 12, "-t", 0)
    direct = invoke("generate", part_a, "-m", model_dir, "-n", 12, "-t", 0)
    assert resumed.stdout == direct.stdout
    # state size does not depend on the text length
    (tmp_path / "long.txt").write_text(text * 3)
    invoke("score", tmp_path / "long.txt", "-m", model_dir, "--save-state", tmp_path / "l.state")
    assert abs((tmp_path / "l.state").stat().st_size - state.stat().st_size) < 64


def test_bad_state_files(model_dir, tmp_path):
    state = tmp_path / "s.state"
    invoke("score", DATA / "hamlet_head.txt", "-m", model_dir, "--save-state", state)
    data = state.read_bytes()
    (tmp_path / "cut.state").write_bytes(data[: len(data) // 2])
    edited = bytearray(data)
    edited[len(data) // 2] ^= 0xFF
    (tmp_path / "edit.state").write_bytes(bytes(edited))
    other = tmp_path / "other"
    tvq.Model.init(tiny_config(n_vocab=259, mem_len=8), seed=9).with_tokenizer(
        ByteTokenizer()
    ).save(other)
    cases = [
        ("cut.state", model_dir, "not a tvq state file"),
        ("edit.state", model_dir, ""),
        ("s.state", other, "another model"),
        ("missing.state", model_dir, "cannot be read"),
    ]
    for name, model, message in cases:
        result = invoke("score", DATA / "hamlet_head.txt", "-m", model, "--load-state",
                        tmp_path / name, code=1)  # fmt: skip
        assert message in result.stderr and "Traceback" not in result.output


# -- info and convert ---------------------------------------------------------------------


def test_convert_and_info(model_dir, tmp_path):
    from flax import serialization

    model = tvq.load(model_dir)
    folder = tmp_path / "ref" / "checkpoint_5"
    folder.mkdir(parents=True)
    state = {"step": 5, "params": model.params, "opt_state": {}}
    import jax

    state = jax.tree_util.tree_map(np.asarray, state)
    (folder / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    (tmp_path / "flags.json").write_text(json.dumps(dict(model.config.to_dict(), block_len=4)))
    out = tmp_path / "converted"
    result = invoke("convert", tmp_path / "ref", "--flags", tmp_path / "flags.json", "--bytes",
                    "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    a = json.loads(invoke("score", DATA / "hamlet_head.txt", "-m", out, "--format", "json").stdout)
    b = json.loads(invoke("score", DATA / "hamlet_head.txt", "-m", model_dir, "--format",
                          "json").stdout)  # fmt: skip
    assert a[0]["nll"] == pytest.approx(b[0]["nll"], abs=1e-6)
    report = json.loads(invoke("info", out, "--json").stdout)
    assert report["tokenizer"]["kind"] == "bytes" and report["block_len"] == 4
    missing = invoke("convert", tmp_path / "ref", "--flags", tmp_path / "flags.json", "--out",
                     tmp_path / "x", code=2)  # fmt: skip
    assert "--tokenizer" in missing.stderr
