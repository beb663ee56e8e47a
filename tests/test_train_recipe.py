"""The run's recipe around the updates (docs/DESIGN.md section 11): learning-rate
schedules, the parameters' moving average, bounded held-out evaluation, keeping the best
checkpoint, TensorBoard and W&B logs, and exact resumes with all of them."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from typer.testing import CliRunner

import tvq
from tests.test_train import ARCH, SETTINGS, TRAIN_ARGS, corpus, metrics
from tvq.runtime.model import init_params
from tvq.text.tokenizer import ByteTokenizer
from tvq.train import TrainSettings, train_from_files
from tvq.train.checkpoints import Checkpoints
from tvq.train.evalset import EVAL_FILE, choose, eval_documents
from tvq.train.schedules import learning_rate
from tvqcli.main import app

runner = CliRunner()
CONFIG = tvq.ModelConfig(n_vocab=259, **ARCH)


def schedule(**settings) -> list[float]:
    rates = learning_rate(TrainSettings(steps=100, warmup=10, lr=1.0, min_lr=0.1, **settings))
    return [float(rates(n)) for n in (0, 5, 10, 55, 80, 90, 100)]


def test_schedules_at_chosen_steps():
    # warm-up 0 → lr over 10 updates, then each schedule's shape over the 90 left
    assert schedule(schedule="cosine") == pytest.approx(
        [
            0,
            0.5,
            1,
            0.55,
            0.1 + 0.9 * (1 + np.cos(np.pi * 70 / 90)) / 2,
            0.1 + 0.9 * (1 + np.cos(np.pi * 80 / 90)) / 2,
            0.1,
        ]
    )
    assert schedule(schedule="linear") == pytest.approx([0, 0.5, 1, 0.55, 0.3, 0.2, 0.1])
    assert schedule(schedule="constant") == pytest.approx([0, 0.5, 1, 1, 1, 1, 1])
    # wsd: flat until the last 20 of the 100 steps, then linear to min_lr
    assert schedule(schedule="wsd", decay_fraction=0.2) == pytest.approx(
        [0, 0.5, 1, 1, 1, 0.55, 0.1]
    )
    # the default floor: final_lr_ratio · lr, as before min_lr
    default = learning_rate(TrainSettings(steps=100, warmup=10, lr=1.0))
    assert float(default(100)) == pytest.approx(0.1)  # fmt: skip


def train(out: Path, texts: Path, **settings):
    return train_from_files(texts=[texts], out=out, use_bytes=True, architecture=ARCH,
                            settings=dict(SETTINGS, **settings))  # fmt: skip


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def checkpoint(out: Path, step: int):
    """A checkpoint's RunState (the files' layout), read back as numpy."""
    checkpoints = Checkpoints(out / "train", "best")
    try:
        restored = checkpoints.manager.restore(step, args=ocp.args.StandardRestore())
        return jax.tree_util.tree_map(np.asarray, restored)
    finally:
        checkpoints.close()


def test_ema_is_the_host_side_average_and_the_model(tmp_path):
    texts = corpus(tmp_path)
    model = train(tmp_path / "m", texts, steps=4, save_every=1, keep="10", ema=0.7,
                  eval_every=100)  # fmt: skip
    average = leaves(init_params(CONFIG, 0))  # the average starts at the initial parameters
    for step in range(1, 5):
        state = checkpoint(tmp_path / "m", step)
        params = leaves(state["params"])
        average = [np.float32(0.7) * a + np.float32(1 - 0.7) * p
                   for a, p in zip(average, params, strict=True)]  # fmt: skip
        for mine, theirs in zip(average, leaves(state["ema"]), strict=True):
            np.testing.assert_allclose(theirs, mine, rtol=1e-5, atol=1e-6)
    # --out holds the average, not the last parameters (which differ from it)
    for held, mine in zip(leaves(model.params), average, strict=True):
        np.testing.assert_allclose(held, mine, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - p).max() for a, p in zip(average, params, strict=True)) > 1e-3
    assert model.metadata["exported_weights"] == "ema"


def test_eval_tokens_bounds_and_fixes_the_documents(tmp_path):
    rng = np.random.default_rng(0)
    documents = [(rng.integers(3, 259, n), n) for n in (40, 7, 25, 60, 13, 30)]
    chosen = choose(documents, 50, seed=3, tokenizer=ByteTokenizer())
    assert sum(tokens for _, tokens, _ in chosen) == 50  # bounded, and filled
    assert chosen == choose(documents, 50, seed=3, tokenizer=ByteTokenizer())
    assert all(tokens == documents[i][1] for i, tokens, _ in chosen[:-1])  # whole but the last
    picked = eval_documents(documents, 50, 3, ByteTokenizer(), tmp_path)
    assert json.loads((tmp_path / EVAL_FILE).read_text())["documents"] == [list(c) for c in chosen]
    # a resumed run reads the recorded choice, whatever it would choose now
    again = eval_documents(documents, 50, 4, ByteTokenizer(), tmp_path)
    for (a, size_a), (b, size_b) in zip(picked, again, strict=True):
        np.testing.assert_array_equal(a, b)
        assert size_a == size_b
    assert sum(len(ids) for ids, _ in picked) == 50


def test_keep_best_keeps_and_exports_the_lowest_bits_per_byte(tmp_path):
    texts = corpus(tmp_path)
    out = tmp_path / "m"
    # a constant, too large rate: the held-out figures go down, then up
    model = train(out, texts, steps=10, eval_every=2, save_every=5, keep="best",
                  schedule="constant", lr=1.0, eval_tokens=300)  # fmt: skip
    evals = {r["step"]: r["val_bits_per_byte"] for r in metrics(out) if "val_loss" in r}
    assert list(evals) == [2, 4, 6, 8, 10]
    best = min(evals, key=evals.get)
    kept = sorted(int(p.name) for p in (out / "train" / "checkpoints").iterdir()
                  if p.name.isdigit())  # fmt: skip
    assert kept == sorted({best, 10})  # the best and the latest (to resume)
    assert model.metadata["heldout_bits_per_byte"] == pytest.approx(evals[best], abs=1e-4)
    assert model.metadata["heldout_tokens"] <= 300
    for held, saved in zip(leaves(model.params), leaves(checkpoint(out, best)["params"]),
                           strict=True):  # fmt: skip
        np.testing.assert_array_equal(held, saved)
    assert best != 10, f"the last evaluation was the best ({evals}): the test needs another"


def test_log_dir_writes_tensorboard_events(tmp_path):
    # read back with TensorBoard's own reader (the tensorboard package of the test extra)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = corpus(tmp_path)
    args = [
        "train",
        str(texts),
        "--out",
        str(tmp_path / "m"),
        *TRAIN_ARGS,
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--log-dir",
        str(tmp_path / "tb"),
        "--val",
        str(texts / "two.txt"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}  # fmt: skip
    logged = metrics(tmp_path / "m")
    steps = [r for r in logged if "loss" in r]
    for tag, name in [("train/loss", "loss"), ("train/learning_rate", "lr"),
                      ("train/tokens_per_second", "tokens_per_second"), ("train/mfu", "mfu"),
                      ("train/grad_norm", "grad_norm")]:  # fmt: skip
        assert scalars[tag] == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in steps]
    evals = [(r["step"], pytest.approx(r["val_bits_per_byte"], rel=1e-6)) for r in logged
             if "val_loss" in r]  # fmt: skip
    assert scalars["eval/bits_per_byte"] == evals and len(evals) == 2
    assert all(r["mfu"] > 0 and r["grad_norm"] > 0 for r in steps)  # metrics.jsonl gains both


def test_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    texts = corpus(tmp_path)
    out = tmp_path / "m"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true",
               TVQ_CACHE_DIR=os.environ.get("TVQ_TEST_CACHE", "/tmp/tvq-test-cache"))  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "tvqcli", "train", str(texts), "--out",
                           str(out), *TRAIN_ARGS, "--steps", "3", "--wandb", "tvq-test"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    run_id = json.loads((out / "train" / "wandb.json").read_text())["id"]
    (run_file,) = (out / "train" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = run_file.read_bytes()  # W&B's own record format; its reader is not public
    for tag in (b"train/loss", b"train/learning_rate", b"train/mfu", b"train/grad_norm"):
        assert tag in data


@pytest.mark.parametrize(("option", "module"), [("--log-dir", "tensorboardX"),
                                               ("--wandb", "wandb")])  # fmt: skip
def test_missing_log_package_is_one_line(tmp_path, monkeypatch, option, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    result = runner.invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "m"),
                                 option, str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {option} needs the {module} package: pip install {module}"
    ]
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--ema", "-0.5"], "--ema must be in (0, 1)"), (["--ema", "1"], "--ema must be in (0, 1)"),
    (["--keep", "0"], "--keep must be at least 1"), (["--keep", "some"], "--keep must be best"),
    (["--decay-fraction", "0"], "--decay-fraction must be in (0, 1]"),
    (["--decay-fraction", "1.5"], "--decay-fraction must be in (0, 1]"),
    (["--min-lr", "-1e-4"], "--min-lr must be in [0, lr"),
    (["--schedule", "steps"], "--schedule must be one of"),
    (["--eval-tokens", "0"], "--eval-tokens must be at least 1"),
    (["--export", "best"], "--export must be one of"),
])  # fmt: skip
def test_bad_recipe_values_are_usage_errors(tmp_path, args, message):
    result = runner.invoke(app, ["train", str(tmp_path), "--bytes", "--out",
                                 str(tmp_path / "m"), *args])  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_killed_run_resumes_exactly_with_wsd_and_ema(tmp_path):
    """The issue's whole recipe: --config (wsd, EMA, bounded evaluation, keep best) and
    --log-dir; kill -9 mid-run, the same command again: the losses, the average and the
    model of an uninterrupted run, and TensorBoard's reader finds each step's scalars
    once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    texts = corpus(tmp_path)
    env = dict(os.environ, TVQ_CACHE_DIR=os.environ.get("TVQ_TEST_CACHE", "/tmp/tvq-test-cache"))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[optimizer]\nschedule = "wsd"\ndecay-fraction = 0.5\nmin_lr = 1e-3\n'
                      '[evaluation]\nema = 0.9\neval_tokens = 200\nkeep = "best"\n')  # fmt: skip

    def command(out):
        return [sys.executable, "-m", "tvqcli", "train", str(texts), "--out", str(out),
                *TRAIN_ARGS, "--steps", "24", "--save-every", "4", "--eval-every", "12",
                "--config", str(recipe), "--log-dir", str(out) + ".logs"]  # fmt: skip

    straight = CliRunner().invoke(app, command(tmp_path / "a")[3:])  # in this process
    assert straight.exit_code == 0, straight.output
    proc = subprocess.Popen(command(tmp_path / "b"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoints = tmp_path / "b" / "train" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.isdigit() for p in _ls(checkpoints)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(command(tmp_path / "b"), env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step" in resumed.stderr
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b if "loss" in r] == list(range(1, 25))
    for x, y in zip([r for r in a if "loss" in r], [r for r in b if "loss" in r], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["lr"] == y["lr"]
    for x, y in zip([r for r in a if "val_loss" in r], [r for r in b if "val_loss" in r],
                    strict=True):  # fmt: skip
        assert x["val_bits_per_byte"] == pytest.approx(y["val_bits_per_byte"], abs=1e-6)
    for x, y in zip(leaves(tvq.load(tmp_path / "a").params),
                    leaves(tvq.load(tmp_path / "b").params), strict=True):  # fmt: skip
        np.testing.assert_allclose(x, y, atol=1e-6)
    events = EventAccumulator(str(tmp_path / "b.logs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 25))
    assert [e.step for e in events.Scalars("eval/bits_per_byte")] == [12, 24]


def _ls(folder: Path):
    return list(folder.iterdir()) if folder.is_dir() else []
