"""Training-time dropout (docs/DESIGN.md section 11): the reference's p_dropemb, p_dropres
and p_droplyr. Off, training is exactly as without it; on, it is random but reproducible
(the same step draws the same masks, also after a resume), and scaled to keep the mean."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import random_tokens, tiny_config
from tests.test_train import ARCH, TRAIN_ARGS, corpus
from tvq.train import train_from_files
from tvq.train.settings import TrainSettings
from tvq.train.step import dropout_key, dropout_multipliers, layer_keep, train_forward
from tvqcli.main import app

DROPOUT = TrainSettings(p_dropemb=0.1, p_dropres=0.25, p_droplyr=0.5)


def test_multipliers_drop_at_the_rate_and_keep_the_mean():
    key = dropout_key(3, 7)
    layers = layer_keep(DROPOUT, key, 4, 64)
    assert set(np.unique(np.asarray(layers)).tolist()) == {0.0, 2.0}
    assert abs(float(jnp.mean(layers == 0)) - 0.5) < 0.1
    drop = dropout_multipliers(DROPOUT, key, layers, jnp.asarray(2), 3, 8, 64, 32)
    emb, res = np.asarray(drop.embedding), np.stack([np.asarray(r) for r in drop.residuals])
    assert emb.shape == (64, 24, 32) and res.shape == (4, 64, 24, 32)
    assert abs((emb == 0).mean() - 0.1) < 0.01 and abs(emb.mean() - 1.0) < 0.02
    kept = np.asarray(layers)[:, :, None, None] > 0  # a dropped sublayer is zero throughout
    assert (res[~np.broadcast_to(kept, res.shape)] == 0).all()
    on = res[np.broadcast_to(kept, res.shape)]
    assert abs((on == 0).mean() - 0.25) < 0.01 and np.allclose(on[on > 0], 2.0 / 0.75)
    # block by block: blocks 2, 3, 4 drawn one at a time equal the three drawn together
    for i in range(3):
        one = dropout_multipliers(DROPOUT, key, layers, jnp.asarray(2 + i), 1, 8, 64, 32)
        np.testing.assert_array_equal(np.asarray(one.embedding), emb[:, 8 * i : 8 * i + 8])
    # blocks, sublayers and steps differ
    assert not np.array_equal(emb[:, :8], emb[:, 8:16])
    assert not np.array_equal(res[0], res[1])
    other = dropout_multipliers(DROPOUT, dropout_key(3, 8), layers, jnp.asarray(2), 3, 8, 64, 32)
    assert not np.array_equal(np.asarray(other.embedding), emb)


def test_dropout_changes_the_loss_reproducibly_and_off_changes_nothing():
    config = tiny_config(mem_len=4)
    model = tvq.Model.init(config, seed=1)
    data = jnp.asarray(random_tokens(config, 2, 25))
    state = model.initial_state(2)

    def total_nll(settings, key):
        (total, _), _ = train_forward(config, model.params, data[:, :-1], data[:, 1:], state, 4,
                                      "serial", settings, key)  # fmt: skip
        return total

    nll = jax.jit(total_nll, static_argnums=0)  # TrainSettings is frozen: hashable
    plain = float(nll(None, None))
    assert float(nll(TrainSettings(), dropout_key(0, 1))) == plain  # rates 0: nothing drawn
    on = float(nll(DROPOUT, dropout_key(0, 1)))
    assert on != pytest.approx(plain, abs=1e-3)
    assert float(nll(DROPOUT, dropout_key(0, 1))) == on
    assert float(nll(DROPOUT, dropout_key(0, 2))) != pytest.approx(on, abs=1e-4)
    with pytest.raises(ValueError, match="needs a key"):
        train_forward(config, model.params, data[:, :-1], data[:, 1:], state, 4, "serial",
                      DROPOUT, None)  # fmt: skip


def test_a_run_with_dropout_resumes_to_the_same_result(tmp_path):
    texts = corpus(tmp_path)
    settings = dict(
        steps=6,
        batch_size=4,
        update_len=32,
        block_len=16,
        lr=1e-2,
        warmup=2,
        eval_every=100,
        save_every=2,
        p_dropemb=0.1,
        p_dropres=0.1,
        p_droplyr=0.2,
    )

    def run(out, stop_at=None, **changes):
        def progress(p):
            if p.step == stop_at:
                raise KeyboardInterrupt

        return train_from_files(texts=[texts], out=out, use_bytes=True, architecture=ARCH,
                                settings=dict(settings, **changes), val_fraction=0,
                                on_progress=progress)  # fmt: skip

    straight = run(tmp_path / "a")
    with pytest.raises(tvq.Interrupted):
        run(tmp_path / "b", stop_at=3)
    resumed = run(tmp_path / "b")
    for x, y in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(resumed.params), strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    assert resumed.metadata["train_settings"]["p_droplyr"] == 0.2


def test_a_run_from_before_dropout_resumes(tmp_path):
    """run.json written before the dropout settings existed still matches (at 0)."""
    texts = corpus(tmp_path)
    settings = dict(steps=4, batch_size=4, update_len=32, block_len=16, eval_every=100,
                    save_every=2)  # fmt: skip

    def progress(p):
        if p.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(tvq.Interrupted):
        train_from_files(texts=[texts], out=tmp_path / "m", use_bytes=True, architecture=ARCH,
                         settings=settings, val_fraction=0, on_progress=progress)  # fmt: skip
    run_file = tmp_path / "m" / "train" / "run.json"
    doc = json.loads(run_file.read_text())
    for name in ("p_dropemb", "p_dropres", "p_droplyr"):
        del doc["settings"][name]
    run_file.write_text(json.dumps(doc))
    model = train_from_files(texts=[texts], out=tmp_path / "m", use_bytes=True,
                             architecture=ARCH, settings=settings, val_fraction=0)  # fmt: skip
    assert model.metadata["steps"] == 4


@pytest.mark.parametrize("flag", ["--p-dropemb", "--p-dropres", "--p-droplyr"])
def test_bad_dropout_rate_is_a_clear_error(tmp_path, flag):
    texts = corpus(tmp_path)
    result = CliRunner().invoke(app, ["train", str(texts), "--out", str(tmp_path / "o"),
                                      *TRAIN_ARGS, flag, "1"])  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{flag[2:].replace('-', '_')} must be in [0, 1)" in result.stderr
    assert not (tmp_path / "o").exists()
