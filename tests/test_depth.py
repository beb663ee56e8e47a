"""Depth as a scan (docs/DESIGN.md section 5): the sublayers run as one scan over stacked
parameters, every number is the unrolled network's, the files keep the reference
layout, and a compiled program holds one copy of the sublayer whatever the depth.

tests/data/depth_reference.npz holds the numbers of the network as it was before the
scan, when it looped over its sublayers in Python: `reference_values` below, run at
revision 4f24ded (`python tests/test_depth.py --record` there; the parameters then came
from Model.init(config, seed=7), stored as "<config>/init"). The test starts from those
parameters and must give those numbers. Each entry is a pytree's leaves, in tree order,
raveled into one float32 array (a state's integers are small: exact in float32).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tvq  # noqa: E402
from tests.conftest import forced_devices, random_tokens, tiny_config, with_param  # noqa: E402
from tvq.errors import TrainingError  # noqa: E402
from tvq.nn import layout  # noqa: E402
from tvq.nn.params import flatten, param_layout, param_shapes  # noqa: E402
from tvq.nn.ring import model_from_ring, model_to_ring  # noqa: E402
from tvq.nn.state import initial_state, stack_state, unstack_state  # noqa: E402
from tvq.nn.transformer import Transformer, network  # noqa: E402
from tvq.runtime.decode_loop import feed_ids  # noqa: E402
from tvq.runtime.forward import forward_program  # noqa: E402
from tvq.runtime.model import _init_params, init_params  # noqa: E402
from tvq.train.checkpoints import to_file_layout, to_run_layout  # noqa: E402
from tvq.train.settings import TrainSettings  # noqa: E402
from tvq.train.step import (  # noqa: E402
    dropout_key,
    make_optimizer,
    make_train_step,
    step_memory,
    train_forward,
)

REFERENCE = Path(__file__).parent / "data" / "depth_reference.npz"
ATOL = RTOL = 1e-5

# Tiny configurations of 2 to 4 layers: absolute positions and an untied output; no
# aggregate and no output norm; odd widths and several heads.
CONFIGS = {
    "a": dict(n_layer=3, mem_len=3, pe_abs=True, e_tie=False),
    "b": dict(n_layer=2, mem_len=4, agg_cache=False, e_preln=False),
    "c": dict(n_layer=4, mem_len=5, n_head=3, d_k=5, n_code=7, d_v=6),
}
DROPOUT = TrainSettings(p_dropemb=0.1, p_dropres=0.2, p_droplyr=0.3)
STEP_SETTINGS = dict(batch_size=4, update_len=12, block_len=4, lr=1e-2, warmup=1, steps=5)


def tree_values(name: str, tree) -> dict[str, np.ndarray]:
    """A pytree's leaves in tree order, raveled into one float32 array under `name`."""
    leaves = [np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(tree)]
    return {name: np.concatenate(leaves)}


def with_random_biases(model: tvq.Model) -> tvq.Model:
    """u, v (zero at init) random and the absolute positions' scale 0.7, so that every
    parameter matters."""
    config = model.config
    key = jax.random.PRNGKey(1)
    for path in flatten(model.params):
        if path.endswith(("/u", "/v")):
            key, sub = jax.random.split(key)
            model = with_param(model, path, jax.random.normal(sub, (config.n_head * config.d_k,)))
    if config.pe_abs:
        model = with_param(model, "position_embedder/scale", 0.7)
    return model


def recorded_model(name: str, recorded) -> tvq.Model:
    """Model `name` of CONFIGS with the parameters recorded before the scan."""
    config = tiny_config(**CONFIGS[name])
    leaves, treedef = jax.tree_util.tree_flatten(param_shapes(config))
    flat, start, params = recorded[f"{name}/init"], 0, []
    for leaf in leaves:
        size = int(np.prod(leaf.shape))
        params.append(jnp.asarray(flat[start : start + size].reshape(leaf.shape)))
        start += size
    assert start == flat.size
    model = tvq.Model(config, jax.tree_util.tree_unflatten(treedef, params), block_len=4)
    return with_random_biases(model)


def reference_values(model: tvq.Model, name: str, steps: bool = True) -> dict[str, np.ndarray]:
    """The numbers the scan must reproduce, through the public calls only (steps: with
    two whole update steps)."""
    values: dict[str, np.ndarray] = {}
    config = model.config
    tokens = random_tokens(config, 2, 11, seed=3)
    for algorithm in ("serial", "parallel"):
        log_probs, state = model.log_probs(tokens, algorithm=algorithm)
        values.update(tree_values(f"{name}/{algorithm}/log_probs", log_probs))
        values.update(tree_values(f"{name}/{algorithm}/state", state))
    # the decoding loop (Transformer.step) after a carried state
    _, carried = model.log_probs(tokens[:, :5])
    (scored,), state = feed_ids(model, carried, tokens[:, 4], tokens[:, 5:])
    values.update(tree_values(f"{name}/ring/log_probs", scored))
    values.update(tree_values(f"{name}/ring/state", state))
    # training: loss, statistics and gradient of a window, with and without dropout
    data = jnp.asarray(random_tokens(config, 2, 13, seed=4))
    start = model.initial_state(2)
    for tag, settings, key in (("plain", None, None), ("dropout", DROPOUT, dropout_key(0, 3))):

        def loss(params, settings=settings, key=key):
            (nll, stats), new_state = train_forward(
                config, params, data[:, :-1], data[:, 1:], start, 4, "serial", settings, key
            )
            return nll + sum(s.commit for s in stats), (stats, new_state)

        grads, (stats, new_state) = jax.grad(loss, has_aux=True)(model.params)
        values.update(tree_values(f"{name}/{tag}/grads", grads))
        values.update(tree_values(f"{name}/{tag}/stats", stats))
        values.update(tree_values(f"{name}/{tag}/train_state", new_state))
    if not steps:
        return values
    # two whole update steps (AdamW and the codebook EMA)
    params, state, losses = run_steps(model, TrainSettings(**STEP_SETTINGS), 2)
    for n, metrics in enumerate(losses):
        values[f"{name}/step{n}/loss"] = np.asarray(metrics.loss).ravel()
        values[f"{name}/step{n}/grad_norm"] = np.asarray(metrics.grad_norm).ravel()
    values.update(tree_values(f"{name}/step/params", params))
    values.update(tree_values(f"{name}/step/state", state))
    return values


def run_steps(model: tvq.Model, settings: TrainSettings, steps: int, algorithm="serial"):
    """`steps` updates from the model's parameters on fixed windows of 4 rows →
    (parameters, attention state, each step's metrics). The step runs on the run's
    layout (stacked where the network scans): converted to it and back, as a training
    run's checkpoints are."""
    config = model.config
    optimizer = make_optimizer(settings)
    step = make_train_step(config, settings, optimizer, algorithm)
    params = jax.tree_util.tree_map(jnp.copy, model.params)  # the step donates them
    params, state = to_run_layout((params, model.initial_state(4)), config)
    opt_state = optimizer.init(params)
    windows = random_tokens(config, 4, steps * 12 + 1, seed=5)
    metrics = []
    for n in range(steps):
        window = jnp.asarray(windows[:, 12 * n : 12 * n + 13])
        params, opt_state, state, m = step(
            params, opt_state, state, window[:, :-1], window[:, 1:], jnp.asarray(n)
        )
        metrics.append(m)
    params, state = to_file_layout((params, state))
    return params, state, metrics


@pytest.fixture(scope="module")
def recorded():
    with np.load(REFERENCE) as data:
        return {name: data[name] for name in data.files}


@pytest.fixture
def scan_everything(monkeypatch):
    """Every network scans its sublayers, however few (layout.UNROLLED_MAX 0); compiled
    programs are keyed on the config, not on this, so caches are dropped around it."""
    jax.clear_caches()
    monkeypatch.setattr(layout, "UNROLLED_MAX", 0)
    yield
    jax.clear_caches()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scanned_network_gives_the_unrolled_numbers(name, recorded, scan_everything):
    """Scoring in both forms, the decoding ring, the training loss's gradient and
    statistics (with dropout too) and two whole update steps, against the numbers of the
    network before the scan, with the sublayers scanned."""
    assert_reference_values(name, recorded)


def test_unrolled_network_gives_the_same_numbers(recorded):
    """A network of at most UNROLLED_MAX sublayers runs them one after another (the
    loop kept as the fallback): the same numbers, from the stacked parameters too."""
    assert not layout.scanned(2 * CONFIGS["a"]["n_layer"])
    assert_reference_values("a", recorded, steps=False)  # the update steps: test_train.py


def assert_reference_values(name: str, recorded, steps: bool = True) -> None:
    model = recorded_model(name, recorded)
    values = reference_values(model, name, steps)
    want = {k: v for k, v in recorded.items() if k.startswith(f"{name}/") and k != f"{name}/init"
            and (steps or "/step" not in k)}  # fmt: skip
    assert sorted(values) == sorted(want)
    noise = adam_noise(model) if steps else None
    assert noise is None or noise.mean() < 0.1
    for key, value in values.items():
        if key.endswith("/step/params"):  # where AdamW moves by noise: within its steps
            np.testing.assert_allclose(value[noise], want[key][noise], atol=2 * 1e-2)
            value, want[key] = value[~noise], want[key][~noise]
        np.testing.assert_allclose(value, want[key], rtol=RTOL, atol=ATOL, err_msg=key)


def adam_noise(model: tvq.Model, rates: dict | None = None) -> np.ndarray:
    """Which parameters (raveled in tree order) run_steps' two updates move by float noise.
    AdamW moves a parameter by lr · m / (√v + 1e-9), m the moment of the (clipped)
    gradients, here 0.09·g₀ + 0.1·g₁ after two steps: where that sum is as small as the
    gradients' float rounding (about 1e-7 of the mean loss's gradient, below 1e-6 taken
    as noise: the rows of r_proj that meet slowly turning sines of small distances, or
    two steps that cancel), two exact computations of the same gradients move it
    differently, by up to lr. The codebook, updated by its EMA, is never noise. rates:
    dropout rates of the steps (their draws, dropout_key(0, step))."""
    settings = TrainSettings(**STEP_SETTINGS, **(rates or {}))
    windows = jnp.asarray(random_tokens(model.config, 4, 2 * 12 + 1, seed=5))

    def clipped_gradient(params, state, window, step):
        def loss(params):
            (nll, stats), _ = train_forward(model.config, params, window[:, :-1],
                                            window[:, 1:], state, 4, "serial", settings,
                                            dropout_key(settings.seed, step))  # fmt: skip
            return (nll + settings.c_beta * sum(s.commit for s in stats)) / window[:, 1:].size

        grads = jax.grad(loss)(params)
        norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))))
        return jax.tree_util.tree_map(lambda g: g * min(1.0, settings.grad_clip / norm), grads)

    first = clipped_gradient(model.params, model.initial_state(4), windows[:, :13], 0)
    params, state, _ = run_steps(model, settings, 1)
    second = clipped_gradient(params, state, windows[:, 12:25], 1)
    moment = jax.tree_util.tree_map(lambda a, b: 0.09 * a + 0.1 * b, first, second)
    noise = [
        np.full(m.size, False) if "quantizer" in jax.tree_util.keystr(path)
        else np.abs(np.asarray(m)).ravel() < 1e-6
        for path, m in jax.tree_util.tree_leaves_with_path(moment)
    ]  # fmt: skip
    return np.concatenate(noise)


def test_conversions_between_the_forms_are_exact(recorded):
    model = recorded_model("c", recorded)
    stacked = layout.stack_params(model.params)
    assert sorted(stacked) == sorted(
        [k for k in model.params if not k.startswith(layout.LAYERS)] + [layout.STACK]
    )
    assert layout.n_layers(stacked) == layout.n_layers(model.params) == 4
    leaf = stacked[layout.STACK]["kvg_proj"]["kernel"]
    assert leaf.shape == (8, *model.params["transformer_layers_0"]["scanned_attn1"]["kvg_proj"]
                          ["kernel"].shape)  # fmt: skip
    np.testing.assert_array_equal(  # sublayer 3 is layer 1's second
        leaf[3], model.params["transformer_layers_1"]["scanned_attn2"]["kvg_proj"]["kernel"]
    )
    back = layout.unstack_params(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(model.params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(model.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    assert layout.stack_params(stacked) is stacked and layout.unstack_params(back) is back
    _, state = model.log_probs(random_tokens(model.config, 2, 7))
    again = unstack_state(stack_state(state))
    _, _, tables = network(model.config, model.params)
    from_rings = model_from_ring(model_to_ring(state), tables)
    for a, b in ((again, state), (from_rings, state)):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


def test_fresh_parameters_have_the_reference_layout():
    """init_params makes the reference tree (the stacked one never leaves a compiled
    call); each sublayer draws its own values; the same seed gives the same tree."""
    config = tiny_config(n_layer=3, e_tie=False, pe_abs=True)
    params = init_params(config, seed=2)
    assert layout.STACK not in params
    assert {k: tuple(v.shape) for k, v in flatten(params).items()} == param_layout(config)
    kernels = [np.asarray(sub["q_proj"]["kernel"]) for sub in layout.sublayer_params(params)]
    assert len(kernels) == 6
    assert all(not np.array_equal(a, b) for i, a in enumerate(kernels) for b in kernels[i + 1 :])
    for kernel in kernels:  # variance scaling, fan-in 16: standard deviation 1/4
        assert 0.2 < kernel.std() < 0.3 and abs(kernel.mean()) < 0.1
    again = init_params(config, seed=2)
    other = init_params(config, seed=3)
    for a, b, c in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again),
                       jax.tree_util.tree_leaves(other), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
        if a.size > 1 and float(jnp.std(a)) > 0:
            assert not np.array_equal(a, c)


def test_a_saved_model_keeps_the_reference_layout(tmp_path, recorded):
    """A model directory's parameters are the reference tree, names and shapes, as
    written before the scan; loading gives the same tree and the same numbers."""
    from tvq.files.checkpoint import PARAMS_DIR, restore_params

    model = recorded_model("a", recorded)
    model.save(tmp_path / "m")
    stored = flatten(restore_params(tmp_path / "m" / PARAMS_DIR))
    assert {k: tuple(np.shape(v)) for k, v in stored.items()} == param_layout(model.config)
    assert "transformer_layers_2/scanned_attn2/quantizer/c_sum" in stored
    for name, value in flatten(model.params).items():
        np.testing.assert_array_equal(stored[name], value)
    loaded = tvq.load(tmp_path / "m")
    assert loaded.fingerprint == model.fingerprint
    tokens = random_tokens(model.config, 1, 9)
    np.testing.assert_array_equal(model.log_probs(tokens)[0], loaded.log_probs(tokens)[0])
    want = recorded["a/serial/log_probs"].reshape(2, 11, -1)
    np.testing.assert_allclose(
        loaded.log_probs(random_tokens(model.config, 2, 11, seed=3))[0], want, atol=ATOL
    )


@pytest.mark.parametrize(("accum", "dropout"), [(4, True)])
def test_accumulated_gradients_equal_one_batch(accum, dropout, recorded):
    """grad_accum 4 (micro-batches of 1 row) gives one batch's losses, parameters and
    attention state after two steps, with dropout (each row drops what it drops in the
    whole batch). (grad_accum 2 without dropout, the same program with other shapes, was
    dropped from the suite for its time: 40 s on 2 cores.)"""
    model = recorded_model("b", recorded)
    rates = dict(p_dropemb=0.1, p_dropres=0.2, p_droplyr=0.3) if dropout else {}
    whole = run_steps(model, TrainSettings(**STEP_SETTINGS, **rates), 2)
    noise = adam_noise(model, rates)
    parts = run_steps(model, TrainSettings(**STEP_SETTINGS, **rates, grad_accum=accum), 2)
    for a, b in zip(whole[2], parts[2], strict=True):
        assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-6)
        assert float(a.grad_norm) == pytest.approx(float(b.grad_norm), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(whole[1]), jax.tree_util.tree_leaves(parts[1]),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    a, b = tree_values("p", whole[0])["p"], tree_values("p", parts[0])["p"]
    np.testing.assert_allclose(a[~noise], b[~noise], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(a[noise], b[noise], atol=2 * 1e-2)


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(TrainingError, match="multiple of grad_accum 3"):
        TrainSettings(batch_size=8, grad_accum=3)
    with pytest.raises(TrainingError, match="grad_accum must be at least 1"):
        TrainSettings(grad_accum=0)
    with pytest.raises(TrainingError, match=re.escape("grad_accum 2 × 4 devices = 8")):
        TrainSettings(batch_size=4, grad_accum=2).check_devices(4)
    TrainSettings(batch_size=8, grad_accum=2).check_devices(4)
    with pytest.raises(TrainingError, match="remat must be true or false"):
        TrainSettings(remat="yes")


@pytest.mark.parametrize("algorithm", ["serial", "parallel"])
def test_remat_gives_the_same_gradient(algorithm, recorded, scan_everything):
    """Recomputing each sublayer in the backward pass (the scan's body checkpointed)
    changes memory, not the gradient."""
    model = recorded_model("b", recorded)
    config = model.config
    data = jnp.asarray(random_tokens(config, 2, 17, seed=6))
    state = model.initial_state(2)

    def grad(remat):
        settings = TrainSettings(remat=remat, p_dropres=0.2)

        def loss(params):
            (nll, stats), _ = train_forward(config, params, data[:, :-1], data[:, 1:], state, 4,
                                            algorithm, settings, dropout_key(0, 1))  # fmt: skip
            return nll + sum(s.commit for s in stats)

        return jax.jit(jax.grad(loss))(model.params)

    plain, remat = grad(False), grad(True)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(plain)) > 1e-3
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(remat),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    # and a whole step: the same parameters after it
    a = run_steps(model, TrainSettings(**STEP_SETTINGS), 1, algorithm)
    b = run_steps(model, TrainSettings(**STEP_SETTINGS, remat=True), 1, algorithm)
    for x, y in zip(jax.tree_util.tree_leaves(a[:2]), jax.tree_util.tree_leaves(b[:2]),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def test_step_memory_reports_the_compiled_step():
    config = tiny_config(n_layer=2)
    settings = TrainSettings(batch_size=2, update_len=8, block_len=4)
    optimizer = make_optimizer(settings)
    step = make_train_step(config, settings, optimizer)
    params = init_params(config)
    sizes = step_memory(step, params, optimizer.init(params), tvq.Model(config, params)
                        .initial_state(2), jnp.zeros((2, 8), jnp.int32),
                        jnp.zeros((2, 8), jnp.int32))  # fmt: skip
    if sizes is None:  # the backend gives no analysis
        return
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    assert sizes["arguments"] >= 3 * param_bytes  # parameters, Adam's two moments
    assert sizes["outputs"] >= 3 * param_bytes
    assert sizes["temporaries"] > 0
    assert sizes["total"] == (sizes["arguments"] + sizes["outputs"] + sizes["temporaries"]
                              - sizes["aliased"])  # fmt: skip


def test_the_step_runs_on_the_runs_layout_alone():
    """A scanned network's step takes the scanned tree and a stacked state, an unrolled
    one's the reference tree and a ModelState; the other layout is refused when traced,
    not converted."""
    settings = TrainSettings(batch_size=2, update_len=8, block_len=4)
    tokens = jnp.zeros((2, 8), jnp.int32)
    for n_layer in (2, 5):
        config = tiny_config(n_layer=n_layer)
        optimizer = make_optimizer(settings)
        step = make_train_step(config, settings, optimizer)
        params, state = init_params(config), initial_state(config, 2)  # the files' layout
        run_params, run_state = to_run_layout((params, state), config)
        assert layout.is_stacked(run_params) == layout.scanned(2 * n_layer)
        if not layout.scanned(2 * n_layer):  # the wrong layout: the stacked one
            params, state = layout.stack_params(params), stack_state(state)
        with pytest.raises(ValueError, match="the run's layout"):
            step.lower(params, optimizer.init(params), state, tokens, tokens)
        step.lower(run_params, optimizer.init(run_params), run_state, tokens, tokens)


def sublayer_copies(text: str) -> int:
    """Copies of the sublayer's work in a StableHLO module: one dot_general per
    projection of each copy of the sublayer (and a few outside it); in the
    initialisation, which multiplies nothing, the threefry hash's shifts of each
    parameter drawn."""
    return len(re.findall(r"stablehlo\.(dot_general|shift_right_logical)", text))


def programs(n_layer: int) -> dict[str, str]:
    assert layout.scanned(2 * n_layer)
    """The StableHLO text of every compiled entry point for a model of n_layer layers."""
    config = tiny_config(n_layer=n_layer)
    params = init_params(config)
    model = tvq.Model(config, params, block_len=4)
    state = model.initial_state(2)
    tokens = jnp.zeros((2, 16), jnp.int32)
    settings = TrainSettings(batch_size=2, update_len=16, block_len=4)
    optimizer = make_optimizer(settings)
    step = make_train_step(config, settings, optimizer)
    run_params, run_state = to_run_layout((params, state), config)  # the step's layout
    rings = model_to_ring(state)

    @jax.jit
    def decode(params, rings, tokens):  # the ring, a token at a time (tests/test_decoding.py)
        net, variables, tables = network(config, params)

        def one(rings, token):
            return net.apply(variables, token, rings, tables, method=Transformer.step)

        return jax.lax.scan(one, rings, tokens.T)

    return {
        "init": _init_params.lower(config, jax.random.PRNGKey(0)).as_text(),
        "score": forward_program.lower(config, params, tokens, state, 4, tokens).as_text(),
        "parallel": forward_program.lower(
            config, params, tokens, state, 4, tokens, algorithm="parallel"
        ).as_text(),  # fmt: skip
        "decode": decode.lower(params, rings, tokens).as_text(),
        "train": step.lower(
            run_params, optimizer.init(run_params), run_state, tokens, tokens
        ).as_text(),
    }


def test_compiled_programs_hold_one_sublayer_whatever_the_depth():
    """Compile time follows the program's size: at 10 layers every entry point holds as
    many projections as at 5 (one sublayer under a scan), and its text grows only by
    the stacking of its inputs (an operand per sublayer of one concatenation per
    array); its outputs are stacked, so no slice per sublayer."""
    shallow, deep = programs(5), programs(10)
    for name in shallow:
        assert sublayer_copies(deep[name]) == sublayer_copies(shallow[name]), name
        assert sublayer_copies(shallow[name]) >= 4, name
        assert len(deep[name]) < 1.5 * len(shallow[name]), (name, len(shallow[name]),
                                                             len(deep[name]))  # fmt: skip
        assert len(re.findall(r"stablehlo\.slice", deep[name])) == len(
            re.findall(r"stablehlo\.slice", shallow[name])
        ), name


def test_deep_ring_equals_blocks_of_one_in_bfloat16():
    """A scanned network's decoding step rounds exactly where its blocks of one token
    do, in bfloat16 too (tests/test_decoding.py holds the unrolled network to it); its
    rings are stacked, rows first, and convert to the window state exactly."""
    config = tiny_config(mem_len=3, n_layer=5, dtype="bfloat16", e_scale=0.25)
    assert layout.scanned(2 * config.n_layer)
    model = with_random_biases(tvq.Model.init(config, seed=5))
    state = model.initial_state(2)
    tokens = jnp.asarray(random_tokens(config, 2, 13, seed=4))

    @jax.jit
    def ring_run(params, state, tokens):
        net, variables, tables = network(config, params)

        def one(rings, token):
            return net.apply(variables, token, rings, tables, method=Transformer.step)

        rings, log_probs = jax.lax.scan(one, model_to_ring(state), tokens.T)
        return jnp.swapaxes(log_probs, 0, 1), model_from_ring(rings, tables), rings

    got, got_state, rings = ring_run(model.params, state, tokens)
    assert rings.z.shape[:2] == (2 * config.n_head, 10)  # [G, 2·n_layer, M + 1]
    want, want_state = model.log_probs(tokens, state=state, block_len=1)
    np.testing.assert_allclose(got, want, atol=ATOL)
    for a, b in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(want_state),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_a_scanned_sequence_spread_over_four_devices_equals_one_device():
    """tests/scripts/sequence_parallel.py (the contract's check of one sequence spread
    over 4 devices) with 5 layers, so that the sublayers run as a scan inside shard_map."""
    script = (Path(__file__).parent / "scripts" / "sequence_parallel.py").read_text()
    assert script.count("n_layer=1,") == 1
    done = subprocess.run([sys.executable, "-c", script.replace("n_layer=1,", "n_layer=5,")],
                          env=forced_devices(4), capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for case, diffs in report.items():
        assert diffs["log_probs"] < ATOL and diffs["state"] < ATOL, case


def contract_cases():
    """The contract's equivalences (docs/DESIGN.md section 6) as the other test files
    state them, to run again on the scanned form: block-length invariance, a tail
    shorter than a block, chained calls, gradients across a block boundary, and a
    reference checkpoint's numbers."""
    from tests import test_checkpoint_and_errors as checkpoints
    from tests import test_equivalence as equivalence

    def reference_checkpoint(tmp_path):
        config = tiny_config(e_tie=False, pe_abs=True)
        model = with_param(tvq.Model.init(config, seed=11, block_len=4),
                           "position_embedder/scale", 0.3)  # fmt: skip
        checkpoints.test_from_reference_matches(model, tmp_path)

    return {
        "block length": lambda _: equivalence.test_block_length_invariance(True, True, False),
        "tail": lambda _: equivalence.test_tail_shorter_than_block(True),
        "chained": lambda _: equivalence.test_chained_calls_equal_one_call(3, 4, True),
        "gradient": lambda _: equivalence.test_gradient_consistency_across_blocks(True),
        "reference checkpoint": reference_checkpoint,
    }


@pytest.mark.parametrize("case", sorted(contract_cases()))
def test_the_contract_holds_on_the_scanned_form(case, scan_everything, tmp_path):
    assert layout.scanned(2)  # every network, however shallow
    contract_cases()[case](tmp_path)


def test_a_deep_run_resumes_exactly_and_its_memory_knobs_keep_the_losses(tmp_path):
    """The training loop keeps a scanned network's parameters, optimiser and attention
    state stacked and checkpoints the reference tree: a run stopped and resumed gives
    the straight run's parameters; one stopped with --grad-accum 2 and resumed with
    --remat (memory knobs may change on resume) gives its losses."""
    from tests.test_train import ARCH, SETTINGS, corpus, metrics
    from tvq.train import train_from_files

    texts = corpus(tmp_path)
    arch = dict(ARCH, n_layer=5)
    assert layout.scanned(2 * arch["n_layer"])
    base = dict(SETTINGS, steps=6, eval_every=6, save_every=2)

    def run(out, stop_at=None, **knobs):
        def progress(p):
            if p.step == stop_at:
                raise KeyboardInterrupt

        return train_from_files(texts=[texts], out=out, use_bytes=True, architecture=arch,
                                settings=dict(base, **knobs), on_progress=progress)  # fmt: skip

    straight = run(tmp_path / "a")
    with pytest.raises(tvq.Interrupted, match="step 3"):
        run(tmp_path / "b", stop_at=3)
    resumed = run(tmp_path / "b")
    assert layout.STACK not in resumed.params and "transformer_layers_4" in resumed.params
    for x, y in zip(jax.tree_util.tree_leaves(straight.params),
                    jax.tree_util.tree_leaves(resumed.params), strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    with pytest.raises(tvq.Interrupted, match="step 3"):
        run(tmp_path / "c", stop_at=3, grad_accum=2)
    knobs = run(tmp_path / "c", remat=True)
    want = [r["loss"] for r in metrics(tmp_path / "a") if "loss" in r]
    got = [r["loss"] for r in metrics(tmp_path / "c") if "loss" in r]
    assert len(got) == 6 and got == pytest.approx(want, rel=1e-4)
    assert knobs.metadata["heldout_loss"] == pytest.approx(
        straight.metadata["heldout_loss"], abs=1e-3
    )


def test_train_cli_memory_knobs_and_verbose(tmp_path):
    """tvq train --grad-accum --remat -v on a scanned network: the step's memory is
    printed before the first step; a batch that does not split is a one-line error."""
    from typer.testing import CliRunner

    from tests.test_train import TRAIN_ARGS, corpus
    from tvqcli.main import app

    texts = corpus(tmp_path)
    args = ["train", str(texts), *TRAIN_ARGS, "--n-layer", "5", "--steps", "2"]
    runner = CliRunner()
    done = runner.invoke(app, [*args, "--out", str(tmp_path / "m"), "--grad-accum", "2",
                               "--remat", "-v"])  # fmt: skip
    assert done.exit_code == 0, done.output
    line = next(x for x in done.stderr.splitlines() if x.startswith("compiled step memory"))
    assert re.search(r"\d+\.\d MiB per device \(arguments [\d.]+, outputs", line) or (
        "not reported" in line
    )
    assert tvq.load(tmp_path / "m").metadata["train_settings"]["grad_accum"] == 2
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "n"), "--grad-accum", "3"])
    assert bad.exit_code != 0
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: batch size 4 must be a multiple of grad_accum 3"
    )


if __name__ == "__main__" and "--record" in sys.argv:
    # At 4f24ded: Model.init(config, seed=7) gave the parameters (stored as <config>/init).
    values = {}
    for config_name in CONFIGS:
        fresh = tvq.Model.init(tiny_config(**CONFIGS[config_name]), seed=7, block_len=4)
        values.update(tree_values(f"{config_name}/init", fresh.params))
        values.update(reference_values(with_random_biases(fresh), config_name))
    np.savez_compressed(REFERENCE, **values)
    print(f"wrote {REFERENCE}")
