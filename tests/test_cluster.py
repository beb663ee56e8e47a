"""Several processes as one job (docs/DESIGN.md section 12, invariant 8): two `tvq`
processes with two forced CPU devices each form a cluster over 127.0.0.1 and train with
the numbers of one process; killing one stops the other with a clear line, and the
checkpoints resume in a single process."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import forced_devices
from tvqcli.main import app

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
ARCH = ["--d-model", "32", "--d-k", "16", "--d-v", "32", "--n-head", "2", "--n-code", "16",
        "--n-layer", "1", "--mem-len", "16"]  # fmt: skip
RUN = ["--batch-size", "4", "--update-len", "32", "--block-len", "16", "--lr", "0.01",
       "--warmup", "1"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    return forced_devices(devices, PYTHONUNBUFFERED="1")


def tvq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tvqcli", *args]


def launch(args: list[str], logs: Path, processes: int = 2) -> list[subprocess.Popen]:
    """The same command in `processes` processes of 2 devices each, joined as a cluster."""
    port = free_port()
    procs = []
    for i in range(processes):
        cluster = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                   "--process-id", str(i)]  # fmt: skip
        out = open(logs / f"p{i}.out", "w")
        err = open(logs / f"p{i}.err", "w")
        procs.append(subprocess.Popen(tvq_cmd(*args, *cluster), env=env(2), stdout=out,
                                      stderr=err))  # fmt: skip
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()


def losses(out: Path) -> list[float]:
    records = map(json.loads, (out / "train" / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def test_two_processes_train_like_one(tmp_path):
    train = ["train", str(DATA), "--bytes", *ARCH, *RUN, "--steps", "4", "--save-every", "2",
             "--eval-every", "2"]  # fmt: skip
    cluster = launch([*train, "--out", str(tmp_path / "two")], tmp_path)
    single = subprocess.run(tvq_cmd(*train, "--out", str(tmp_path / "one"), "--devices", "1"),
                            env=env(1), capture_output=True, text=True, timeout=600)  # fmt: skip
    codes = wait_all(cluster)
    logs = {p: (tmp_path / f"p{i}.err").read_text() for i, p in enumerate(("p0", "p1"))}
    assert codes == [0, 0], logs
    assert single.returncode == 0, single.stderr
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    assert len(losses(tmp_path / "two")) == 4  # process 0 alone writes the log
    # process 0 tokenized the text into shards every process sees; the other memory-mapped
    # them (its rows only) and tokenized nothing
    data = tmp_path / "two" / "train" / "data"
    assert (data / "COMPLETE").is_file() and list(data.glob("train-*.bin"))
    assert "tokenize:" in logs["p0"] and "tokenize:" not in logs["p1"]
    two, one = tvq.load(tmp_path / "two"), tvq.load(tmp_path / "one")
    leaves = (jax.tree_util.tree_leaves(m.params) for m in (one, two))
    for a, b in zip(*leaves, strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-5
    assert two.metadata["steps"] == 4 and "--process-id" not in two.metadata["command"]
    assert "saved" in logs["p0"] and "saved" not in logs["p1"]  # process 0 reports


def test_killed_process_stops_the_other_and_the_run_resumes_alone(tmp_path):
    out = tmp_path / "run"
    train = ["train", str(DATA), "--bytes", *ARCH, *RUN, "--steps", "20", "--save-every",
             "5", "--eval-every", "1000", "--val-fraction", "0", "--out", str(out)]  # fmt: skip
    procs = launch(train, tmp_path)
    try:
        checkpoints = out / "train" / "checkpoints"
        deadline = time.monotonic() + 300
        while not any(p.name.isdigit() for p in checkpoints.glob("*")):
            assert time.monotonic() < deadline, (tmp_path / "p0.err").read_text()
            assert procs[0].poll() is None, (tmp_path / "p0.err").read_text()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = procs[0].wait(timeout=90)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    message = (tmp_path / "p0.err").read_text()
    assert code == 1 and waited < 60, message
    # the watchdog's line, or the collective's own error when it notices first
    assert "process 1 of 2 stopped responding" in message or (
        "another process of the cluster stopped" in message
    ), message
    assert "run the same command again to resume" in message

    resumed = subprocess.run(tvq_cmd(*train), env=env(1), capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stderr
    assert tvq.load(out).metadata["steps"] == 20
    steps = [json.loads(line)["step"] for line in
             (out / "train" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert [s for s in steps if s is not None][-1] == 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["--coordinator", "127.0.0.1:1234"], "missing --num-processes, --process-id"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
         "--coordinator must be HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id must be in [0, 2)"),
        (["--num-processes", "0", "--coordinator", "h:1", "--process-id", "0"],
         "--num-processes must be at least 1"),
        (["--distributed", "manual"], "Invalid value for '--distributed'"),
    ],
)  # fmt: skip
def test_bad_cluster_options(tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", str(DATA), "--bytes", "--out",
                                      str(tmp_path / "m"), *args])  # fmt: skip
    assert result.exit_code in (1, 2), result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "m" / "train").exists()


def test_cluster_from_environment(tmp_path):
    result = CliRunner().invoke(
        app,
        ["train", str(DATA), "--bytes", "--out", str(tmp_path)],
        env={"TVQ_COORDINATOR": "127.0.0.1:1", "TVQ_PROCESS_ID": "0"},
    )
    assert result.exit_code == 1
    assert "missing --num-processes" in result.stderr


def test_two_processes_score_their_share_and_process_0_prints_all(tmp_path):
    from tests.test_devices import assert_same_scores, scored_alone, small_model, texts_of_lengths

    paths, model_dir = texts_of_lengths(tmp_path), small_model(tmp_path / "model")
    procs = launch(["score", *map(str, paths), "--format", "jsonl", "--batch-size", "2", "-m",
                    str(model_dir)], tmp_path)  # fmt: skip
    assert wait_all(procs) == [0, 0], (tmp_path / "p0.err").read_text()
    assert (tmp_path / "p1.out").read_text() == ""
    assert_same_scores((tmp_path / "p0.out").read_text(), scored_alone(paths, model_dir))
