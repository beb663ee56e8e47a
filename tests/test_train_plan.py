"""`tvq train --config` and `--dry-run` (tvqcli/recipe.py, tvq/train/plan.py): a TOML
recipe gives the options (the command line wins), the resolved settings are kept as the
model's recipe.toml (itself a recipe), a dry run prints the plan and writes nothing, and
the shipped recipes give the paper's models."""

import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import tvq
from tests.test_train import TRAIN_ARGS, corpus
from tvq.runtime.model import init_params
from tvqcli.main import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_a_recipe_gives_the_options_and_the_command_line_wins(tmp_path):
    texts = corpus(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nd-model = 32\nn_layer = 1\n[training]\nsteps = 4\nseed = 9\n'
                      'schedule = "wsd"\n')  # fmt: skip
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", str(texts), "--out", str(out), *TRAIN_ARGS,
                                 "--config", str(recipe), "--steps", "3", "-v"])  # fmt: skip
    assert result.exit_code == 0, result.output
    kept = tomllib.loads((out / "recipe.toml").read_text())
    assert (kept["steps"], kept["seed"], kept["schedule"], kept["d_model"]) == (3, 9, "wsd", 32)
    assert "seed = 9" in result.stderr  # -v prints the resolved settings
    again = runner.invoke(app, ["train", str(texts), "--out", str(tmp_path / "m2"),
                                "--config", str(out / "recipe.toml")])  # fmt: skip
    assert again.exit_code == 0, again.output
    for a, b in zip(
        jax.tree_util.tree_leaves(tvq.load(out).params),
        jax.tree_util.tree_leaves(tvq.load(tmp_path / "m2").params),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)  # the recipe reproduces the run


@pytest.mark.parametrize(("text", "message"), [
    ("steps = 3\nbogus = 1\n", "'bogus' is not a setting of tvq train"),
    ("steps = [", "is not TOML"),
    ("steps = \"many\"\n", "steps"),
])  # fmt: skip
def test_bad_recipes_are_usage_errors(tmp_path, text, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    result = runner.invoke(app, ["train", str(corpus(tmp_path)), "--out", str(tmp_path / "m"),
                                 "--config", str(recipe)])  # fmt: skip
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "m"
    result = runner.invoke(app, ["train", str(corpus(tmp_path)), "--out", str(out), *TRAIN_ARGS,
                                 "--steps", "100", "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = dict(line.split("  ", 1) for line in result.stdout.splitlines() if "  " in line)
    model = tvq.Model.init(tvq.ModelConfig(n_vocab=259, d_model=32, d_k=16, d_v=32, n_head=2,
                                           n_code=16, n_layer=1, mem_len=16))  # fmt: skip
    assert lines["parameters"].strip() == f"{model.param_count:,}"
    assert lines["tokens per step"].strip() == f"{4 * 32:,}"
    assert "s (compiling" in lines["time per step"]
    assert not (out / "train" / "checkpoints").exists() and not (out / "recipe.toml").exists()


@pytest.mark.parametrize(
    ("recipe", "n_vocab", "paper"), [("enwik8", 259, 190e6), ("pg19", 32000, 1.3e9)]
)
def test_the_papers_recipes_give_the_papers_models(recipe, n_vocab, paper):
    model = tomllib.loads((ROOT / "recipes" / f"{recipe}.toml").read_text())["model"]
    config = tvq.ModelConfig(n_vocab=n_vocab, **model)
    shapes = jax.eval_shape(lambda: init_params(config, 0))
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert abs(count - paper) / paper < 0.02  # the paper's table, to its rounding


def test_the_builtin_recipe_is_the_builtin_models_config():
    recipe = tomllib.loads((ROOT / "recipes" / "builtin.toml").read_text())["model"]
    config = tvq.load().config
    assert {name: getattr(config, name) for name in recipe} == recipe
