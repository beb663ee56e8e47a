"""`tvq train` end to end on a tiny corpus: loss goes down, the model loads, runs resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tvq.train import train_from_files
from tvqcli.main import app

DATA = Path(__file__).parent / "data"
ARCH = dict(d_model=32, d_k=16, d_v=32, n_head=2, n_code=16, n_layer=1, mem_len=16,
            agg_cache=True, e_scale=32**-0.5)  # fmt: skip
SETTINGS = dict(steps=12, batch_size=4, update_len=32, block_len=16, lr=1e-2, warmup=2,
                eval_every=6, save_every=3)  # fmt: skip
TRAIN_ARGS = [
    "--bytes", "--d-model", "32", "--d-k", "16", "--d-v", "32", "--n-code", "16",
    "--n-layer", "1", "--mem-len", "16", "--batch-size", "4", "--update-len", "32",
    "--block-len", "16", "--lr", "1e-2", "--warmup", "2", "--save-every", "3",
]  # fmt: skip
STEPS_KILLED = 150
runner = CliRunner()


def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    text = (DATA / "macbeth_head.txt").read_text()
    (folder / "one.txt").write_text(text[:4096])  # whole compiled pieces when scored
    (folder / "two.txt").write_text(text[4096:5120])
    (folder / "empty.txt").write_text("")
    return folder


def test_train_cli_end_to_end(tmp_path):
    texts = corpus(tmp_path)
    out = tmp_path / "model"
    held = texts / "two.txt"
    result = runner.invoke(
        app,
        ["train", str(texts), "--out", str(out), "--val", str(held), "--steps", "30",
         "--eval-every", "15", *TRAIN_ARGS, "--save-every", "15"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = tvq.load(out)
    meta = model.metadata
    assert meta["steps"] == 30 and meta["heldout_documents"] == ["two.txt"]
    assert meta["tokens_seen"] == 30 * 4 * 32
    assert meta["command"].startswith("tvq train")
    assert model.tokenizer.kind == "bytes"
    # loss went down from the uniform guess
    assert meta["heldout_loss"] < np.log(259) - 0.5
    assert "bits/byte" in result.stderr


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    texts = corpus(tmp_path)

    def run(out, stop_at=None):
        def progress(p):
            if p.step == stop_at:
                raise KeyboardInterrupt

        return train_from_files(texts=[texts], out=out, use_bytes=True, architecture=ARCH,
                                settings=SETTINGS, on_progress=progress)  # fmt: skip

    straight = run(tmp_path / "a")
    with pytest.raises(tvq.Interrupted, match="step 7"):
        run(tmp_path / "b", stop_at=7)
    resumed = run(tmp_path / "b")
    assert resumed.metadata["steps"] == 12
    for x, y in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(resumed.params), strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    with pytest.raises(tvq.TvqError, match="other settings"):
        train_from_files(texts=[texts], out=tmp_path / "b", use_bytes=True, architecture=ARCH,
                         settings=dict(SETTINGS, lr=0.5))  # fmt: skip
    # the training log: every step once (the resumed run replaced nothing it had not redone),
    # the same losses as the straight run, the schedule's rates, an evaluation every 6 steps
    straight_log, resumed_log = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    steps = [r for r in resumed_log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["tokens"] for r in steps] == [4 * 32 * n for n in range(1, 13)]
    for a, b in zip([r for r in straight_log if "loss" in r], steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == b["lr"]
    assert steps[0]["lr"] == 0.0 and steps[2]["lr"] == pytest.approx(1e-2)  # warm-up 2
    assert steps[-1]["lr"] < steps[2]["lr"] and steps[-1]["tokens_per_second"] > 0
    evals = [r for r in resumed_log if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["val_bits_per_byte"] == pytest.approx(
        resumed.metadata["heldout_bits_per_byte"], abs=1e-4
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes(tmp_path):
    """SIGKILL mid-run loses at most the steps since the last checkpoint, never a checkpoint."""
    texts = corpus(tmp_path)
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "tvqcli", "train", str(texts), "--out", str(out),
           "--steps", str(STEPS_KILLED), "--eval-every", "1000", *TRAIN_ARGS,
           "--save-every", "20", "--val-fraction", "0"]  # fmt: skip
    env = dict(os.environ, TVQ_CACHE_DIR=os.environ.get("TVQ_TEST_CACHE", "/tmp/tvq-test-cache"))
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    checkpoints = out / "train" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.isdigit() for p in _ls(checkpoints)):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name) for p in _ls(checkpoints) if p.name.isdigit())
    assert saved, "no checkpoint was written before the kill"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming from step {saved[-1]}" in done.stderr
    assert tvq.load(out).metadata["steps"] == STEPS_KILLED
    logged = [r["step"] for r in metrics(out) if "loss" in r]
    assert logged == list(range(1, STEPS_KILLED + 1))  # steps redone after the kill: once


def _ls(folder: Path):
    return list(folder.iterdir()) if folder.is_dir() else []


def test_bad_training_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    cases = [
        (["train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o1")], "does not exist"),
        (["train", str(empty), "--out", str(tmp_path / "o2")], "every file is empty"),
        (["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "o3")], "does not exist"),
    ]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    cases.append((["train", str(DATA), "--out", str(tmp_path / "busy")], "holds other files"))
    for args, message in cases:
        result = runner.invoke(app, [*args, "--bytes"])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr
        assert "Traceback" not in result.output
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "x"


def test_fine_tune_from_model(tmp_path):
    texts = corpus(tmp_path)
    base = train_from_files(texts=[texts], out=tmp_path / "base", use_bytes=True,
                            architecture=ARCH, settings=dict(SETTINGS, steps=3))  # fmt: skip
    tuned = train_from_files(texts=[texts], out=tmp_path / "tuned", from_dir=tmp_path / "base",
                             settings=dict(SETTINGS, steps=3))  # fmt: skip
    assert tuned.config == base.config
    assert tuned.metadata["fine_tuned_from"] == str(tmp_path / "base")
    assert tuned.tokenizer.kind == "bytes"
    moved = jax.tree_util.tree_leaves(tuned.params)[-1] - jax.tree_util.tree_leaves(base.params)[-1]
    assert float(np.abs(np.asarray(moved)).max()) > 0
