"""The library call behind `tvq score` (tvq/scoring/job.py): `score_files` gives a Python
user the CLI's numbers, row by row, whether it scores the files together or one by one;
and a run stopped part-way yields what it has before it raises."""

import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import save_byte_model
from tvq.scoring.job import ScoreOptions, score_files
from tvqcli.main import app

DATA = Path(__file__).parent / "data"
LENGTHS = (9000, 4500, 300)  # bytes (= tokens): two chunks and a tail, one chunk, a tail


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A byte-level model and three texts, the first several compiled chunks long."""
    root = tmp_path_factory.mktemp("score_files")
    source = (DATA / "hamlet_head.txt").read_bytes() + (DATA / "macbeth_head.txt").read_bytes()
    paths = []
    for i, n in enumerate(LENGTHS):
        paths.append(root / f"text{i}.txt")
        paths[-1].write_bytes((source * (n // len(source) + 2))[i * 100 : i * 100 + n])
    return save_byte_model(root / "model", seed=2), paths


def cli_rows(*args) -> list[dict]:
    result = CliRunner().invoke(app, ["score", *map(str, args), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def library_rows(model, paths, options=None, **kwargs) -> list[dict]:
    return [score.row() for score, _ in score_files(model, paths, options, **kwargs)]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_together_the_library_gives_the_cli_rows(setup, batch_size):
    model_dir, paths = setup
    model = tvq.load(model_dir)
    rows = library_rows(model, paths, ScoreOptions(batch_size=batch_size))
    assert [r["file"] for r in rows] == [str(p) for p in paths] + ["TOTAL"]
    assert [r["tokens"] for r in rows] == [*LENGTHS, sum(LENGTHS)]
    assert cli_rows(*paths, "-m", model_dir, "--batch-size", batch_size) == rows


def test_one_by_one_the_library_gives_the_cli_rows_and_tokens(setup, tmp_path):
    """on_tokens (--per-token) scores the files one after another: the same rows and
    per-token log-probs as the CLI, and the numbers of scoring them together."""
    model_dir, paths = setup
    model = tvq.load(model_dir)
    kept = {}

    def on_tokens(name, ids, log_probs, offset, top):
        kept.setdefault(name, []).extend(round(float(lp), 6) for lp in log_probs)

    rows = library_rows(model, paths, on_tokens=on_tokens)
    out = tmp_path / "tokens.jsonl"
    assert cli_rows(*paths, "-m", model_dir, "--per-token", out) == rows
    written = [json.loads(line) for line in out.read_text().splitlines()]
    for path in paths:
        assert [r["logprob"] for r in written if r["file"] == str(path)] == kept[str(path)]
    together = library_rows(model, paths)
    for alone, batched in zip(rows, together, strict=True):
        assert alone["tokens"] == batched["tokens"] and alone["bytes"] == batched["bytes"]
        assert alone["nll"] == pytest.approx(batched["nll"], abs=1e-5), alone["file"]
        stderr = batched["nll_stderr"]  # None below two 256-token blocks
        assert alone["nll_stderr"] == (stderr and pytest.approx(stderr, rel=1e-4))


def test_window_protocol_and_inputs_of_every_kind(setup):
    """A window protocol (one by one) as the CLI's; a path, its bytes, a named stream
    and an open file score the same."""
    model_dir, paths = setup
    model = tvq.load(model_dir)
    options = ScoreOptions(window=1000, stride=500, by_position=True)
    rows = library_rows(model, paths[1:], options)
    cli = cli_rows(*paths[1:], "-m", model_dir, "--window", 1000, "--stride", 500,
                   "--by-position")  # fmt: skip
    assert cli == rows and rows[0]["protocol"] == "stride"
    data = paths[2].read_bytes()
    with paths[2].open("rb") as f:
        inputs = [paths[2], data, ("named", io.BytesIO(data)), f]
        kinds = library_rows(model, inputs)
    assert [r["file"] for r in kinds] == [str(paths[2]), "<bytes>", "named", str(paths[2]),
                                          "TOTAL"]  # fmt: skip
    for row in kinds[1:4]:
        assert row["nll"] == pytest.approx(kinds[0]["nll"], abs=1e-5)


def test_a_stop_part_way_yields_the_scores_so_far_then_raises(setup):
    """An on_tokens write that fails on the second file: the first file, the second's
    partial score and their TOTAL come first, then the OSError (named)."""
    model_dir, paths = setup
    model = tvq.load(model_dir)

    def on_tokens(name, ids, log_probs, offset, top):
        if name == str(paths[1]):
            raise OSError(28, "No space left on device")

    got = []
    with pytest.raises(OSError, match="No space left") as stopped:
        for score, _ in score_files(model, paths, on_tokens=on_tokens):
            got.append(score)
    assert stopped.value.filename == str(paths[1])
    assert [s.file for s in got] == [str(paths[0]), str(paths[1]), "TOTAL"]
    assert got[0].tokens == LENGTHS[0] and 0 < got[1].tokens <= LENGTHS[1]
    assert got[2].tokens == got[0].tokens + got[1].tokens


class Broken(io.BytesIO):
    """A stream whose second read fails."""

    def read(self, size=-1):
        if self.tell():
            raise OSError(5, "Input/output error")
        return super().read(300)


def test_a_failed_read_while_scoring_together_keeps_every_score_begun(setup):
    model_dir, paths = setup
    model = tvq.load(model_dir)
    got = []
    with pytest.raises(OSError, match="Input/output error") as stopped:
        for score, _ in score_files(model, [paths[2], ("broken", Broken(b"x" * 1000))]):
            got.append(score)
    assert stopped.value.filename == "broken"
    assert [s.file for s in got] == [str(paths[2]), "broken", "TOTAL"]
    assert got[2].tokens == got[0].tokens + got[1].tokens and got[1].tokens <= 300


def test_arguments_are_checked_before_any_work(setup, tmp_path):
    model_dir, paths = setup
    model = tvq.load(model_dir)
    for settings, message in (({"stride": 4}, "a stride needs a window"),
                              ({"batch_size": 0}, "batch_size must be >= 1"),
                              ({"top_logprobs": -1}, "top_logprobs")):  # fmt: skip
        with pytest.raises(tvq.InputError, match=message):
            ScoreOptions(**settings)
    start = tvq.Context.start(model)
    with pytest.raises(tvq.InputError, match="cannot continue a state"):
        score_files(model, paths, ScoreOptions(window=8), start=start)
    with pytest.raises(tvq.InputError, match="does not exist"):
        next(score_files(model, [paths[0], tmp_path / "missing.txt"]))
