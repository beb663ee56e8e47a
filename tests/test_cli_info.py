"""`tvq --help` and `tvq info` through the real Typer app and as a subprocess."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import tvq
from tests.conftest import tiny_config
from tvqcli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    tvq.Model.init(tiny_config(), block_len=2).save(path)
    return path


def test_info_json(model_dir):
    result = runner.invoke(app, ["info", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["d_model"] == 16
    assert report["block_len"] == 2
    assert report["parameters"] == tvq.load(model_dir).param_count
    assert report["state_bytes_per_sequence"] > 0


def test_info_missing_model_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "absent")])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_subprocess_help_and_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tvqcli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "info" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tvqcli", "info", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"TVQ_CACHE_DIR": str(tmp_path / "cache"), "PATH": ""},
    )
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "not a tvq model directory" in bad.stderr


def test_cli_start_up_imports_no_training_or_checkpoint_code():
    """`tvq --help` and every command's start pay only for what they use: registering the
    commands imports neither optax, orbax nor flax (tvq's packages load names lazily)."""
    code = "import sys, tvqcli.main; print(sorted({'optax', 'orbax', 'flax'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
