"""Warm starts (tvq.files.warm, docs/DESIGN.md section 14): stored executables and parameter
copies give the numbers of the normal path, skip tracing when they are there, and are
rebuilt when missing, damaged or stale."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.conftest import ROOT, count_compilations, save_byte_model
from tvq.files import warm

traces = []


@functools.partial(jax.jit, static_argnames=("power",))
def scaled(x, y, power: int, shift=0.0):
    traces.append(power)  # runs once per trace
    return x**power + y * shift


@pytest.fixture
def folder(tmp_path):
    warm.enable(tmp_path / "warm")
    yield tmp_path / "warm"
    warm.enable(None)


def fresh_process(folder: Path) -> None:
    """What a new process sees: the files, nothing in memory."""
    warm.enable(folder)
    jax.clear_caches()


def test_a_stored_executable_runs_without_tracing(folder):
    x, y = jnp.arange(4.0), jnp.ones(4)
    want = scaled(x, y, power=3, shift=2.0)
    first = warm.call(scaled, ("power",), x, y, power=3, shift=2.0)
    np.testing.assert_array_equal(first, want)
    assert len(list((folder / "executables").iterdir())) == 1
    fresh_process(folder)
    traces.clear()
    with count_compilations() as compiled:
        again = warm.call(scaled, ("power",), x, y, power=3, shift=2.0)
        again = warm.call(scaled, ("power",), x, y, power=3, shift=2.0)  # in memory now
    np.testing.assert_array_equal(again, want)
    assert traces == [] and sum(compiled.values()) == 0
    # another static value or shape is another program
    np.testing.assert_array_equal(warm.call(scaled, ("power",), x, y, power=2), x**2)
    warm.call(scaled, ("power",), jnp.arange(5.0), jnp.ones(5), power=3)
    assert traces == [2, 3]
    assert len(list((folder / "executables").iterdir())) == 3


def test_inside_a_trace_the_call_is_inlined(folder):
    x, y = jnp.arange(3.0), jnp.ones(3)
    outer = jax.jit(lambda a: warm.call(scaled, ("power",), a, y, power=2))
    np.testing.assert_array_equal(outer(x), x**2)
    assert not (folder / "executables").exists()


def test_a_damaged_executable_is_compiled_again(folder):
    x, y = jnp.arange(3.0), jnp.ones(3)
    warm.call(scaled, ("power",), x, y, power=2)
    (entry,) = (folder / "executables").iterdir()
    entry.write_bytes(b"not an executable")
    fresh_process(folder)
    np.testing.assert_array_equal(warm.call(scaled, ("power",), x, y, power=2), x**2)
    fresh_process(folder)
    traces.clear()
    np.testing.assert_array_equal(warm.call(scaled, ("power",), x, y, power=2), x**2)
    assert traces == []  # the rewritten entry is whole


def test_least_recently_used_entries_go(folder, monkeypatch):
    monkeypatch.setitem(warm.KEEP, "executables", 2)
    x = jnp.arange(3.0)
    for power in (1, 2, 3):
        warm.call(scaled, ("power",), x, x, power=power)
        os.utime(max((folder / "executables").iterdir(), key=lambda p: p.stat().st_mtime_ns))
    assert len(list((folder / "executables").iterdir())) == 2


def test_switched_off_it_writes_nothing(tmp_path):
    warm.enable(None)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(warm.call(scaled, ("power",), x, x, power=2), x**2)
    assert warm.params(tmp_path, lambda: {"a": 1}) == {"a": 1}
    assert list(tmp_path.iterdir()) == []


def test_parameter_copies_equal_the_checkpoint_and_follow_its_changes(folder, tmp_path):
    stored = tmp_path / "params"
    stored.mkdir()
    (stored / "data").write_bytes(b"1")
    tree = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                      "half": np.array([1.5, -2.0], ml_dtypes.bfloat16)},
            "bias": np.array(3, np.int32)}  # fmt: skip
    reads = []

    def read():
        reads.append(1)
        return jax.tree_util.tree_map(jnp.asarray, tree)

    first = warm.params(stored, read)
    fresh_process(folder)
    copy = warm.params(stored, read)
    assert len(reads) == 1
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(copy),
                    strict=True):  # fmt: skip
        assert a.dtype == b.dtype and isinstance(b, jax.Array)
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(first) == jax.tree_util.tree_structure(copy)
    (stored / "data").write_bytes(b"22")  # the checkpoint changed: read it again
    warm.params(stored, read)
    assert len(reads) == 2


def test_cli_generates_the_same_text_from_stored_files(tmp_path):
    """Cold, from JAX's cache alone (the stored copy removed), and warm: one text. The
    second run compiles its stored copy afresh, since an executable JAX loaded from its
    own cache does not serialize whole on a CPU."""
    model = save_byte_model(tmp_path / "model", seed=2)
    cache = tmp_path / "cache"
    env = dict(os.environ, TVQ_CACHE_DIR=str(cache), JAX_LOG_COMPILES="1")
    cmd = [sys.executable, "-m", "tvqcli", "generate", "-m", str(model), "ab", "-n", "40",
           "--seed", "3"]  # fmt: skip

    def run():
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout, "Finished tracing decode_chunk" in done.stderr

    cold, traced = run()
    assert traced and len(cold) > 0
    for entry in (cache / "warm" / "executables").iterdir():
        entry.unlink()
    assert run() == (cold, True)
    assert run() == (cold, False)
    assert len(list((cache / "warm" / "params").iterdir())) == 1
