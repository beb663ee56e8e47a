"""Save/load round trip, reference-checkpoint import, and typed errors for bad arguments."""

import json

import jax
import numpy as np
import pytest
from flax import serialization

import tvq
from tests.conftest import random_tokens, tiny_config, with_param


@pytest.fixture(scope="module")
def model():
    config = tiny_config(e_tie=False, pe_abs=True)
    return with_param(tvq.Model.init(config, seed=11, block_len=4), "position_embedder/scale", 0.3)


def write_reference(tmp_path, params, step=1200):
    """A checkpoint in the reference layout: {"step", "params", "opt_state"} as flax msgpack."""
    train_state = {
        "step": np.int32(step),
        "params": jax.tree_util.tree_map(np.asarray, params),
        "opt_state": {"0": {"mu": jax.tree_util.tree_map(np.zeros_like, params)}},
    }
    folder = tmp_path / "run" / f"checkpoint_{step}"
    folder.mkdir(parents=True)
    (folder / "checkpoint").write_bytes(serialization.msgpack_serialize(train_state))
    return tmp_path / "run"


def reference_flags(config: tvq.ModelConfig) -> dict:
    flags = config.to_dict()
    for name in ("agg_cache", "pe_abs", "e_tie", "e_preln"):
        flags[name] = int(flags[name])  # the reference passes booleans as 0/1
    flags.update(block_len=6, sequence_len=2048, c_beta=1e-4, optimizer="adamw", d_ff=0)
    return flags


def test_save_load_round_trip(model, tmp_path):
    model.save(tmp_path / "m")
    loaded = tvq.load(tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.block_len == 4
    for a, b in zip(
        jax.tree_util.tree_leaves(model.params),
        jax.tree_util.tree_leaves(loaded.params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = random_tokens(model.config, 2, 10)
    np.testing.assert_array_equal(model.log_probs(tokens)[0], loaded.log_probs(tokens)[0])
    model.save(tmp_path / "m")  # overwriting a model directory is allowed
    assert tvq.load(tmp_path / "m").config == model.config


def test_save_refuses_foreign_directory(model, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(tvq.CheckpointError, match="not a tvq model directory"):
        model.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_load_errors(model, tmp_path):
    with pytest.raises(tvq.CheckpointError, match="does not exist"):
        tvq.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(tvq.CheckpointError, match="no config.json"):
        tvq.load(tmp_path / "empty")
    model.save(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(tvq.CheckpointError, match="cannot be read"):
        tvq.load(tmp_path / "m")
    model.save(tmp_path / "m2")
    document = json.loads((tmp_path / "m2" / "config.json").read_text())
    document["config"]["d_k"] = 4
    (tmp_path / "m2" / "config.json").write_text(json.dumps(document))
    with pytest.raises(tvq.CheckpointError, match="kvg_proj/kernel has shape"):
        tvq.load(tmp_path / "m2")


def test_config_json_round_trip():
    config = tiny_config(dtype="bfloat16", agg_cache=False, e_scale=0.5)
    assert tvq.ModelConfig.from_json(config.to_json()) == config
    with pytest.raises(tvq.ConfigError, match="unknown config field"):
        tvq.ModelConfig.from_dict({"d_model": 8, "colour": "red"})
    with pytest.raises(tvq.ConfigError, match="dtype"):
        tiny_config(dtype="float16")
    with pytest.raises(tvq.ConfigError, match="n_head"):
        tiny_config(n_head=0)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"e_tie": False, "pe_abs": True}, {"e_preln": False, "n_layer": 2, "d_v": 12},
     {"n_head": 3, "d_k": 5, "n_code": 7, "param_dtype": "bfloat16"}],
)  # fmt: skip
def test_param_layout_is_what_init_makes(overrides):
    """Checkpoints are checked against the layout worked out from the config; it must be
    exactly the tree that the flax modules create."""
    from tvq.nn.params import flatten, param_layout, param_shapes

    config = tiny_config(**overrides)
    made = {name: tuple(x.shape) for name, x in flatten(param_shapes(config)).items()}
    assert param_layout(config) == made


def test_from_reference_matches(model, tmp_path):
    run = write_reference(tmp_path, model.params)
    flags = reference_flags(model.config)
    imported = tvq.Model.from_reference(run, flags)
    assert imported.config == model.config
    assert imported.block_len == 6
    tokens = random_tokens(model.config, 1, 17)
    np.testing.assert_allclose(model.log_probs(tokens)[0], imported.log_probs(tokens)[0], atol=1e-5)
    # flags as a JSON file, and the checkpoint given as its step directory
    (tmp_path / "flags.json").write_text(json.dumps(flags))
    again = tvq.Model.from_reference(run / "checkpoint_1200", tmp_path / "flags.json")
    np.testing.assert_array_equal(
        np.asarray(again.params["token_embedder"]["embs"]),
        np.asarray(model.params["token_embedder"]["embs"]),
    )


def test_from_reference_shape_mismatch(model, tmp_path):
    run = write_reference(tmp_path, model.params)
    flags = reference_flags(model.config)
    flags["d_v"] = 4
    with pytest.raises(tvq.CheckpointError) as info:
        tvq.Model.from_reference(run, flags)
    message = str(info.value)
    assert "transformer_layers_0/scanned_attn1/kvg_proj/kernel" in message
    assert "(16, 48)" in message and "(16, 32)" in message


def test_from_reference_other_errors(model, tmp_path):
    run = write_reference(tmp_path, model.params)
    flags = reference_flags(model.config)
    with pytest.raises(tvq.CheckpointError, match="e_tie"):
        tvq.Model.from_reference(run, dict(flags, e_tie=1))  # out_proj would be unused
    with pytest.raises(tvq.CheckpointError, match="lack architecture setting.*n_code"):
        tvq.Model.from_reference(run, {k: v for k, v in flags.items() if k != "n_code"})
    with pytest.raises(tvq.CheckpointError, match="no checkpoint_<step>"):
        tvq.Model.from_reference(tmp_path, flags)
    (tmp_path / "junk").write_bytes(b"\x00\x01 not msgpack")
    with pytest.raises(tvq.CheckpointError):
        tvq.Model.from_reference(tmp_path / "junk", flags)


@pytest.mark.parametrize(
    ("tokens", "pattern"),
    [
        (np.zeros((1, 4), np.float32), "integer dtype"),
        (np.zeros((4,), np.int32), "rank 2"),
        (np.zeros((1, 2, 3), np.int32), "rank 2"),
        (np.zeros((1, 0), np.int32), "at least one token"),
        (np.array([[1, 13]]), "id 13, outside the vocabulary"),
        (np.array([[-1, 2]]), "id -1, outside"),
        ("hello", "integer array"),
    ],
)
def test_bad_tokens(model, tokens, pattern):
    with pytest.raises(tvq.InputError, match=pattern):
        model.log_probs(tokens)


def test_bad_state_and_arguments(model):
    tokens = random_tokens(model.config, 2, 5)
    _, state = model.log_probs(tokens)
    with pytest.raises(tvq.StateError, match="batch size 2"):
        model.log_probs(tokens[:1], state=state)
    other = tvq.Model.init(tiny_config(mem_len=5, e_tie=False, pe_abs=True))
    with pytest.raises(tvq.StateError, match="another model"):
        other.log_probs(tokens, state=state)
    deeper = tvq.Model.init(tiny_config(n_layer=2, e_tie=False, pe_abs=True))
    with pytest.raises(tvq.StateError, match="sublayers"):
        deeper.log_probs(tokens, state=state)
    with pytest.raises(tvq.StateError, match="ModelState"):
        model.log_probs(tokens, state={"pos_offset": 0})
    with pytest.raises(tvq.InputError, match="block_len"):
        model.log_probs(tokens, block_len=0)
    with pytest.raises(tvq.InputError, match="targets have shape"):
        model.score(tokens, tokens[:, :3])
    with pytest.raises(tvq.InputError, match="batch_size"):
        model.initial_state(0)
    assert issubclass(tvq.StateError, tvq.TvqError)


def test_public_names_resolve():
    """tvq's names load on first use; every one in __all__ is there, and nothing else."""
    assert sorted(tvq.__all__) == sorted(tvq._EXPORTS)
    for name in tvq.__all__:
        assert getattr(tvq, name) is not None
    with pytest.raises(AttributeError):
        tvq.not_a_name  # noqa: B018
