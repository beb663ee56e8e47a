"""Bad input of every kind, to every command: one clear line on stderr and a non-zero exit
(usage errors may keep Typer's panel), never a traceback, never lost work."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import tiny_config
from tvq.runtime.context import Context, score_ids
from tvq.runtime.statefile import load_state, save_state
from tvq.text.tokenizer import ByteTokenizer
from tvqcli.main import app

runner = CliRunner()
DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "macbeth_head.txt"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A byte-level model, the same without a tokenizer, and a state file of the first."""
    root = tmp_path_factory.mktemp("errors")
    model = tvq.Model.init(tiny_config(n_vocab=259, mem_len=8, e_scale=0.25), block_len=4)
    model.with_tokenizer(ByteTokenizer()).save(root / "model")
    model.save(root / "bare")
    state = root / "s.state"
    result = invoke("score", SAMPLE, "-m", root / "model", "--save-state", state)
    assert result.exit_code == 0, result.output
    return root


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


# what `tvq train TEXT` prints, one line per phase, when it prepares its data off a terminal
PREPARE_PHASES = ("scan:", "tokenizer:", "tokenize:", "index:", "prepared ", "using the prepared")


def assert_one_line_error(result, code: int, message: str) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == code, (result.exit_code, result.output)
    if code == 1:  # one error line; before it only the data preparation's phase lines
        lines = [line for line in result.stderr.splitlines() if line.strip()
                 and not line.startswith(PREPARE_PHASES)]  # fmt: skip
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert message in " ".join(result.stderr.split()), result.stderr


def corrupt_copy(models: Path, tmp_path: Path, damage) -> Path:
    target = tmp_path / "damaged"
    shutil.copytree(models / "model", target)
    damage(target)
    return target


def test_a_model_without_tokenizer(models):
    """Saved by model.save() with no tokenizer: generating or scoring text needs one."""
    for args in (("generate", "x", "-n", 3), ("score", SAMPLE)):
        result = invoke(*args, "-m", models / "bare")
        assert_one_line_error(result, 1, "this model has no tokenizer")
    assert invoke("info", models / "bare").exit_code == 0


@pytest.mark.parametrize(("args", "message"), [
    (("generate", "x", "-n", 3, "--save-state", "{missing}/x.state"), "does not exist"),
    (("generate", "x", "-n", 3, "--save-state", "{tmp}"), "is a directory"),
    (("score", SAMPLE, "--save-state", "{missing}/x.state"), "does not exist"),
    (("score", SAMPLE, "--per-token", "{missing}/t.jsonl"), "does not exist"),
    (("score", SAMPLE, "--per-token", "{tmp}"), "is a directory"),
    (("score", SAMPLE, "--save-state", "{file}/x.state"), "does not exist"),
])  # fmt: skip
def test_output_paths_are_checked_before_any_work(models, tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    fill = dict(missing=tmp_path / "no" / "dir", tmp=tmp_path, file=tmp_path / "file")
    args = [str(a).format(**fill) for a in args]
    result = invoke(*args, "-m", models / "model")
    assert_one_line_error(result, 1, message)
    assert result.stdout == ""  # nothing was generated or scored first


def test_output_dirs_of_train_and_convert(tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke("train", SAMPLE, "--bytes", "--out", tmp_path / "file" / "m")
    assert_one_line_error(result, 1, "is not a directory")
    result = invoke("convert", tmp_path, "--flags", tmp_path / "f.json", "--bytes", "--out",
                    tmp_path / "file")  # fmt: skip
    assert_one_line_error(result, 1, "exists and is not a directory")


def test_state_write_errors_are_state_errors(models, tmp_path):
    model = tvq.load(models / "model")
    (tmp_path / "file").write_text("x")
    context = Context.start(model)
    with pytest.raises(tvq.StateError, match="cannot be written"):
        save_state(tmp_path / "file" / "x.state", model, context)
    with pytest.raises(tvq.StateError, match="is a directory"):
        save_state(tmp_path, model, context)


@pytest.mark.parametrize("args", [
    ("generate", "x", "--temperature", "inf"), ("generate", "x", "-t", "nan"),
    ("generate", "x", "--top-p", "nan"), ("generate", "x", "--min-p", "inf"),
    ("generate", "x", "--num-samples", "0"), ("generate", "x", "--top-k", "-1"),
    ("generate", "x", "-n", "many"), ("score", SAMPLE, "--block-len", "0"),
    ("score", SAMPLE, "--format", "xml"), ("score", "-", "-"),
    ("train", SAMPLE, "--out", "{tmp}/m", "--lr", "inf"),
    ("train", SAMPLE, "--out", "{tmp}/m", "--c-gamma", "nan"),
    ("train", SAMPLE, "--out", "{tmp}/m", "--e-scale", "-inf"),
    ("convert", SAMPLE, "--flags", SAMPLE, "--out", "{tmp}/c"),
])  # fmt: skip
def test_bad_option_values_are_usage_errors(models, tmp_path, args):
    args = [str(a).format(tmp=tmp_path) for a in args]
    result = invoke(*args, *(["-m", models / "model"] if args[0] in ("generate", "score") else []))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("args", "message"), [
    (("train", SAMPLE, "--bytes", "--out", "{tmp}/m", "--steps", "0"), "steps must be at least 1"),
    (("train", SAMPLE, "--bytes", "--out", "{tmp}/m", "--c-gamma", "1"), "c_gamma"),
    (("train", SAMPLE, "--bytes", "--out", "{tmp}/m", "--d-model", "15"), "d_model must be even"),
    (("train", SAMPLE, "--bytes", "--out", "{tmp}/m", "--val-fraction", "1"), "val-fraction"),
])  # fmt: skip
def test_bad_training_settings(tmp_path, args, message):
    result = invoke(*[str(a).format(tmp=tmp_path) for a in args])
    assert_one_line_error(result, 1, message)


@pytest.mark.parametrize(("args", "message"), [
    (("generate", "-f", "{missing}"), "cannot be read"),
    (("generate", "-f", "{tmp}"), "is a directory"),
    (("generate", "x", "--load-state", "{missing}"), "cannot be read"),
    (("generate", "x", "--load-state", "{tmp}"), "is a directory"),
    (("score", "{missing}"), "does not exist"),
    (("score", "{tmp}"), "is a directory"),
    (("score", SAMPLE, "--load-state", "{text}"), "not a tvq state file"),
    (("info", "{missing}"), "does not exist"),
    (("info", "{text}"), "is not a directory"),
    (("train", "{missing}", "--bytes", "--out", "{tmp}/m"), "does not exist"),
    (("train", SAMPLE, "--tokenizer", "{tmp}", "--out", "{tmp}/m"), "cannot be read"),
    (("train", SAMPLE, "--tokenizer", "{text}", "--out", "{tmp}/m"), "not a sentencepiece"),
    (("train", SAMPLE, "--from", "{missing}", "--out", "{tmp}/m"), "does not exist"),
    (("convert", "{missing}", "--flags", "{text}", "--bytes", "--out", "{tmp}/c"), "flags file"),
    (("convert", "{tmp}", "--flags", "{tmp}", "--bytes", "--out", "{tmp}/c"), "flags file"),
    (("convert", "{tmp}", "--flags", "{flags}", "--bytes", "--out", "{tmp}/c"), "checkpoint_"),
    (("convert", "{text}", "--flags", "{flags}", "--bytes", "--out", "{tmp}/c"), "msgpack"),
])  # fmt: skip
def test_missing_and_wrong_kinds_of_paths(models, tmp_path, args, message):
    (tmp_path / "text.txt").write_text("just text")
    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps(tvq.load(models / "model").config.to_dict()))
    fill = dict(missing=tmp_path / "absent", tmp=tmp_path, text=tmp_path / "text.txt", flags=flags)
    args = [str(a).format(**fill) for a in args]
    model = ["-m", models / "model"] if args[0] in ("generate", "score") else []
    assert_one_line_error(invoke(*args, *model), 1, message)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "config.json").write_text("{not json"), "cannot be read"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "not a tvq model config"),
    (lambda d: (d / "config.json").write_bytes(b"\xff\xfe\x00"), "cannot be read"),
    (lambda d: shutil.rmtree(d / "params"), "params/ is missing"),
    (lambda d: [p.write_bytes(b"junk") for p in (d / "params").rglob("*") if p.is_file()],
     "cannot be read"),
    (lambda d: _edit_config(d, lambda c: c["config"].update(d_k="wide")), "d_k"),
    (lambda d: _edit_config(d, lambda c: c["config"].update(n_layer=2)), "missing"),
    (lambda d: _edit_config(d, lambda c: c.update(version=99)), "newer tvq"),
    (lambda d: _edit_config(d, lambda c: c.update(tokenizer={"kind": "morse"})), "morse"),
])  # fmt: skip
def test_corrupt_model_directories(models, tmp_path, damage, message):
    target = corrupt_copy(models, tmp_path, damage)
    for args in (("generate", "x", "-n", 2, "-m", target), ("score", SAMPLE, "-m", target),
                 ("info", target)):  # fmt: skip
        assert_one_line_error(invoke(*args), 1, message)


def _edit_config(folder: Path, edit) -> None:
    document = json.loads((folder / "config.json").read_text())
    edit(document)
    (folder / "config.json").write_text(json.dumps(document))


def test_corrupt_state_files(models, tmp_path):
    data = (models / "s.state").read_bytes()
    cases = {
        "empty.state": (b"", "not a tvq state file"),
        "binary.state": (os.urandom(300), "not a tvq state file"),
        "cut.state": (data[: len(data) // 2], "not a tvq state file"),
        "text.state": (b"hello", "not a tvq state file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        for command in (("generate", "x", "-n", 2), ("score", SAMPLE)):
            result = invoke(*command, "-m", models / "model", "--load-state", tmp_path / name)
            assert_one_line_error(result, 1, message)
    result = invoke("score", SAMPLE, "-m", models / "bare", "--load-state", models / "s.state")
    assert_one_line_error(result, 1, "no tokenizer")


def test_empty_and_binary_input(models, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 40)
    rows = json.loads(invoke("score", tmp_path / "empty.txt", tmp_path / "binary.bin", "-m",
                             models / "model", "--format", "json").stdout)  # fmt: skip
    assert rows[0]["tokens"] == 0 and rows[1]["tokens"] == 256 * 40 == rows[1]["bytes"]
    generated = invoke("generate", "-f", tmp_path / "binary.bin", "-m", models / "model", "-n",
                       5, "--seed", 1, "--json")  # fmt: skip
    assert generated.exit_code == 0 and len(json.loads(generated.stdout)["tokens"]) >= 1
    result = invoke("train", tmp_path / "empty.txt", "--bytes", "--out", tmp_path / "m")
    assert_one_line_error(result, 1, "every file is empty")


def test_library_state_file_round_trip(models, tmp_path):
    """docs/DESIGN.md invariant 7 in the library: a saved and loaded context continues
    exactly like the one in memory."""
    model = tvq.load(models / "model")
    ids = model.tokenizer.encode(SAMPLE.read_text()[:700])
    first, context = score_ids(model, ids[:300])
    save_state(tmp_path / "a.state", model, context)
    loaded = load_state(tmp_path / "a.state", model)
    assert loaded.tokens == context.tokens == 300
    np.testing.assert_array_equal(loaded.last_token, context.last_token)
    in_memory, _ = score_ids(model, ids[300:], context, keep_log_probs=True)
    from_file, _ = score_ids(model, ids[300:], loaded, keep_log_probs=True)
    np.testing.assert_array_equal(in_memory.log_probs, from_file.log_probs)
    whole, _ = score_ids(model, ids, keep_log_probs=True)
    np.testing.assert_allclose(whole.log_probs[:, 300:], from_file.log_probs, atol=1e-5)


def tvq_process(*args, cache: Path):
    env = dict(os.environ, TVQ_CACHE_DIR=str(cache))
    return subprocess.Popen([sys.executable, "-m", "tvqcli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_cache_directory_that_cannot_be_used(models, tmp_path):
    """A cache path that is a file (or unwritable) only costs speed: no error, no noise."""
    (tmp_path / "cache").write_text("not a directory")
    proc = tvq_process("generate", "x", "-m", models / "model", "-n", 4, "--seed", 1,
                       cache=tmp_path / "cache")  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and err == b"" and len(out) > 0


def test_two_first_runs_at_once_on_an_empty_cache(models, tmp_path):
    args = ("generate", "x", "-m", models / "model", "-n", 6, "--seed", 3, "--json")
    procs = [tvq_process(*args, cache=tmp_path / "cache") for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    records = [json.loads(out) for out, _ in outs]
    assert records[0]["tokens"] == records[1]["tokens"] and records[0]["tokens"]
    assert any((tmp_path / "cache").iterdir())  # the cache was written


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes any file")
def test_unreadable_and_unwritable_paths(models, tmp_path):
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    locked.chmod(0)
    assert_one_line_error(invoke("score", locked, "-m", models / "model"), 1, "cannot be read")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    result = invoke("score", SAMPLE, "-m", models / "model", "--save-state", folder / "s")
    assert_one_line_error(result, 1, "cannot be written")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_while_writing_keeps_the_results(models):
    """--per-token on a full disk: the totals scored so far are still printed (marked
    partial), then one error line and exit 1."""
    result = invoke("score", SAMPLE, "-m", models / "model", "--per-token", "/dev/full",
                    "--format", "jsonl")  # fmt: skip
    assert_one_line_error(result, 1, "No space left on device")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[-1]["file"] == "TOTAL" and rows[-1]["partial"] is True
    assert rows[-1]["tokens"] > 0


def test_a_run_that_cannot_start_leaves_nothing_in_the_way(tmp_path):
    """Settings the data cannot fill are refused before the run directory is written, so
    the corrected command starts cleanly."""
    out = tmp_path / "m"
    args = ("train", SAMPLE, "--bytes", "--out", out, "--steps", 1, "--d-model", 16, "--d-k", 8,
            "--d-v", 8, "--n-code", 4, "--n-layer", 1, "--mem-len", 4, "--update-len", 16,
            "--block-len", 8, "--eval-every", 5, "--val-fraction", 0)  # fmt: skip
    assert_one_line_error(invoke(*args, "--batch-size", 1000), 1, "not enough training text")
    assert not (out / "train" / "run.json").exists()
    result = invoke(*args, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert tvq.load(out).metadata["steps"] == 1


HUGE = 10**20  # beyond any integer array: once an OverflowError ("internal error")


@pytest.mark.parametrize(("args", "option"), [
    (("--top-k", HUGE), "--top-k"), (("--seed", HUGE), "--seed"), (("-n", HUGE), "--max-tokens"),
    (("--num-samples", HUGE), "--num-samples"), (("--json", "--logprobs", HUGE), "--logprobs"),
    (("--repeat-last-n", HUGE), "--repeat-last-n"), (("--logit-bias", f"{HUGE}=1"), "--logit-bias"),
    (("--logit-bias", "5=1e300"), "--logit-bias"), (("--logit-bias", "300=1"), "--logit-bias"),
    (("--seed", -1), "--seed"), (("--repeat-penalty", 11), "--repeat-penalty"),
])  # fmt: skip
def test_every_numeric_setting_is_checked_before_any_array(models, args, option):
    """Each numeric setting is checked once, in its range (tvq.text.settings), before any
    array is made: a usage error naming the option, never an internal error."""
    result = invoke("generate", "x", "-m", models / "model", *args)
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert result.exit_code == 2, result.output
    assert f"{option} must be" in " ".join(result.stderr.split()), result.stderr


def test_one_range_reaches_every_front_end(models, monkeypatch):
    """A range is stated once (tvq.text.settings.RANGES): changing it changes the CLI's
    usage error, the server's 400 and the llm plugin's option check alike."""
    from pydantic import ValidationError

    from tvq.integrations import llm_plugin
    from tvq.serving.protocol import ApiError, ServerSettings, parse_completion
    from tvq.text import settings

    monkeypatch.setitem(settings.RANGES, "top_p", settings.Range(float, 0, 0.5, open_low=True))
    result = invoke("generate", "x", "-m", models / "model", "--top-p", "0.7")
    assert result.exit_code == 2 and "--top-p must be in (0, 0.5], got 0.7" in result.stderr
    tokenizer = ByteTokenizer()
    with pytest.raises(ApiError) as caught:
        parse_completion({"prompt": "x", "top_p": 0.7}, tokenizer, 259, ServerSettings())
    assert caught.value.status == 400 and caught.value.param == "top_p"
    assert caught.value.message == "'top_p' must be in (0, 0.5], got 0.7"
    options = llm_plugin.make_options()
    with pytest.raises(ValidationError, match="less than or equal to 0.5"):
        options(top_p=0.7)
    assert options(top_p=0.4).top_p == 0.4
    assert parse_completion({"prompt": "x", "top_p": 0.4}, tokenizer, 259,
                            ServerSettings()).sampler.top_p == 0.4  # fmt: skip
