"""One device vs many (docs/DESIGN.md invariant 8): data-parallel training over forced CPU
devices gives the numbers of one device, and a run resumes on another device count."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import forced_devices
from tvqcli.main import app

ROOT = Path(__file__).resolve().parent.parent


def test_training_on_four_devices_equals_one(tmp_path):
    script = ROOT / "tests" / "scripts" / "data_parallel.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=forced_devices(4),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert len(result["losses"]["1"]) == 4
    assert result["losses"]["1"] == pytest.approx(result["losses"]["4"], abs=1e-5)
    assert result["params_1_vs_4"] < 1e-5
    # --shard-params: the same numbers, each device holding a quarter of a large array
    assert result["losses_sharded"] == pytest.approx(result["losses"]["1"], abs=1e-5)
    assert result["params_1_vs_4_sharded"] < 1e-5
    assert result["embs_spec"] == [None, "data"] and result["embs_shard"] == [259, 8]
    assert result["small_spec"] == []  # 3 does not split over 4 devices: replicated
    assert result["steps"] == {"4->1": 4, "1->4": 4}
    for key, diff in result["resumed_vs_1"].items():
        assert diff < 1e-5, key


def test_devices_option_and_info(tmp_path):
    runner = CliRunner()
    info = runner.invoke(app, ["info", "--devices", "--json"])
    assert info.exit_code == 0, info.output
    report = json.loads(info.stdout)
    assert report["devices"] >= 1 and report["processes"] == 1 and report["backend"]
    result = runner.invoke(app, ["train", str(ROOT / "tests" / "data"), "--bytes", "--out",
                                 str(tmp_path / "m"), "--devices", "99"])  # fmt: skip
    assert result.exit_code == 1 and "devices must be between 1 and" in result.stderr
    assert not (tmp_path / "m" / "train" / "run.json").exists()


LENGTHS = (900, 0, 3000, 40, 1500, 1, 2000)  # bytes of the seven files scored together


def texts_of_lengths(folder: Path) -> list[Path]:
    source = b"".join(p.read_bytes() for p in sorted((ROOT / "tests" / "data").glob("*.txt")))
    paths = []
    for i, n in enumerate(LENGTHS):
        paths.append(folder / f"text{i}.txt")
        paths[-1].write_bytes(source[len(source) - n :] if i % 2 else source[:n])
    return paths


def small_model(folder: Path) -> Path:
    """A random byte-level model (fast to compile and run), saved in `folder`."""
    from tests.conftest import tiny_config
    from tvq.text.tokenizer import ByteTokenizer

    config = tiny_config(n_vocab=259, mem_len=8, e_scale=0.25)
    tvq.Model.init(config, seed=0, block_len=8).with_tokenizer(ByteTokenizer()).save(folder)
    return folder


def scored_alone(paths: list[Path], model_dir: Path) -> list[dict]:
    from tvq.scoring.stream import score_stream

    model = tvq.load(model_dir)
    rows = []
    for path in paths:
        with path.open("rb") as f:
            rows.append(score_stream(model, f, str(path))[0].row())
    return rows


def assert_same_scores(jsonl: str, alone: list[dict]) -> None:
    rows = [json.loads(line) for line in jsonl.splitlines()]
    assert [r["file"] for r in rows] == [r["file"] for r in alone] + ["TOTAL"]
    for got, want in zip(rows, alone, strict=False):
        assert (got["tokens"], got["bytes"]) == (want["tokens"], want["bytes"])
        assert got["nll"] == pytest.approx(want["nll"], abs=1e-5), got["file"]
    assert rows[-1]["tokens"] == sum(r["tokens"] for r in alone)


def test_scoring_many_files_on_four_devices_equals_each_alone(tmp_path):
    paths, model_dir = texts_of_lengths(tmp_path), small_model(tmp_path / "model")
    done = subprocess.run([sys.executable, "-m", "tvqcli", "score", *map(str, paths), "--format",
                           "jsonl", "--batch-size", "1", "-m", str(model_dir)],
                          env=forced_devices(4), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_scores(done.stdout, scored_alone(paths, model_dir))


def test_samples_split_over_devices_are_the_samples_of_one(tmp_path):
    model_dir = small_model(tmp_path / "model")

    def samples(devices: int) -> list[tuple[str, list[float]]]:
        done = subprocess.run([sys.executable, "-m", "tvqcli", "generate", "To be", "-n", "24",
                               "--num-samples", "4", "--seed", "5", "--json", "-v", "-m",
                               str(model_dir)],
                              env=forced_devices(devices), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"{devices} device" in done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines()]
        return [(r["text"], r["logprobs"]) for r in records]

    one, four = samples(1), samples(4)
    assert [text for text, _ in one] == [text for text, _ in four]
    for (_, a), (_, b) in zip(one, four, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
