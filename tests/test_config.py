"""Params validation: every kind of bad value ends in one line naming the key, exit code 2, no traceback."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from nbp.config import SCHEMA_PATH, ConfigError, json_schema, latent_grid, load_config

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())


def _set(raw: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    for p in parents:
        raw = raw[p]
    if value is DELETE:
        del raw[last]
    else:
        raw[last] = value


DELETE = object()

# (case, dotted key to change, new value, key named in the error, what the message says)
CASES = [
    ("unknown key", "train_tokenizer.embedded.stepz", 5, "train_tokenizer.embedded.stepz", "unknown key"),
    ("unknown section", "extra", {"a": 1}, "extra", "unknown key"),
    ("wrong type", "train_generator.embedded_nbp.steps", "many", "train_generator.embedded_nbp.steps",
     "expected integer, got str 'many'"),
    ("wrong type in a list", "run.datasets", "embedded", "run.datasets", "expected array"),
    ("not an allowed value", "run.wandb.mode", "sometimes", "run.wandb.mode", "'sometimes' is not one of"),
    ("missing key", "prepare.embedded.dataset", DELETE, "prepare.embedded.dataset", "required key is missing"),
    ("block does not divide the grid", "train_generator.embedded_nbp.block", [1, 1, 3], "train_generator.embedded_nbp.block",
     "[1, 1, 3] does not divide the latent grid"),
    ("block of the wrong length", "train_generator.embedded_nbp.block", [1, 8], "train_generator.embedded_nbp.block",
     "wrong number of items"),
    ("frames not 1 + k*temporal_factor", "prepare.embedded.frames", 16, "prepare.embedded.frames", "16 frames is not 1 + k*4"),
    ("bad reference", "eval_generator.embedded_nbp.generator", "nope", "eval_generator.embedded_nbp.generator",
     "'nope' is not an entry of `train_generator`"),
    ("run selects a missing entry", "run.generators", ["embedded_nbp", "ghost"], "run.generators",
     "'ghost' is not an entry of `train_generator`"),
    ("not positive", "prepare.embedded.fps", 0, "prepare.embedded.fps", "must be > 0, got 0"),
    ("fraction out of range", "prepare.embedded.max_bad_fraction", 1.5, "prepare.embedded.max_bad_fraction", "must be in [0, 1]"),
]
IDS = [c[0] for c in CASES]


def _write(tmp_path: Path, key: str, value) -> Path:
    raw = copy.deepcopy(BASE)
    _set(raw, key, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_repo_params_are_valid_and_match_the_schema():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.run.datasets == BASE["run"]["datasets"]
    jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text())).validate(BASE)
    p = cfg.prepare["embedded"]
    assert latent_grid(cfg, "embedded") == (1 + (p.frames - 1) // 4, p.resolution // 4, p.resolution // 4)  # small: x4 spatially


def test_committed_schema_is_current():
    assert json.loads(SCHEMA_PATH.read_text()) == json_schema(), "run `nbp schema --write`"
    assert json_schema()["additionalProperties"] is False


@pytest.mark.parametrize("case,key,value,named,says", CASES, ids=IDS)
def test_bad_params_raise_config_error_naming_the_key(tmp_path, case, key, value, named, says):
    path = _write(tmp_path, key, value)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == named
    assert says in err.value.problem
    assert str(err.value).startswith(f"{path}: {named}: ")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbp", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def _check_one_line(done: subprocess.CompletedProcess, path: Path, named: str, says: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith(f"nbp: error: {path}: {named}: ") and says in lines[0], lines[0]


# one of each kind through the command line (the rest are covered in-process above)
CLI_CASES = [("unknown key", "check"), ("wrong type", "prepare"), ("block does not divide the grid", "check"),
             ("frames not 1 + k*temporal_factor", "check"), ("bad reference", "check"),
             ("unknown key", "train_generator"), ("block does not divide the grid", "train_generator"),
             ("frames not 1 + k*temporal_factor", "prepare"), ("bad reference", "download"), ("wrong type", "check")]


@pytest.mark.parametrize("case,command", CLI_CASES)
def test_commands_print_one_line_and_exit_2(tmp_path, case, command):
    _, key, value, named, says = CASES[IDS.index(case)]
    path = _write(tmp_path, key, value)
    _check_one_line(_run(command, "--params", str(path), cwd=tmp_path), path, named, says)
    assert not (tmp_path / "out").exists()  # a stage refuses before it writes anything


def test_overrides_are_validated_too(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    done = _run("prepare", "--params", str(path), "-S", "prepare.embedded.frames=18", cwd=tmp_path)
    _check_one_line(done, path, "prepare.embedded.frames", "18 frames is not 1 + k*4")
    done = _run("download", "--params", str(path), "-S", "download.embedded.embedded.classes=13", cwd=tmp_path)
    _check_one_line(done, path, "download.embedded.embedded.classes", "at most 12 classes")
    missing = tmp_path / "nope.yaml"
    done = _run("check", "--params", str(missing), cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == f"nbp: error: {missing}: file not found"


def test_latent_grid_agrees_with_the_tokenizer_presets():
    """config.latent_grid (used by the DAG and the generator stages without building a tokenizer) matches the model."""
    from nbp.config import SPATIAL_FACTOR
    from nbp.tokenizer.model import PRESETS, VideoTokenizer

    assert SPATIAL_FACTOR == {k: p.spatial_factor for k, p in PRESETS.items()}
    cfg = load_config(REPO / "params.yaml")
    p = cfg.prepare["embedded"]
    model = VideoTokenizer(PRESETS[cfg.train_tokenizer["embedded"].preset])
    assert latent_grid(cfg, "embedded") == model.latent_grid(p.frames, p.resolution, p.resolution) == (5, 8, 8)


def test_floats_without_a_dot_are_numbers_as_in_dvc(tmp_path):
    """`lr: 3e-4` is a float for DVC (YAML 1.2) and must be one for nbp too (PyYAML alone reads a string)."""
    from nbp.cli import _parse_overrides
    from nbp.config import read_yaml

    assert read_yaml("a: 3e-4\nb: -1E+2\nc: 1.5e3\nd: 12\ne: 1e\nf: '3e-4'") == {"a": 3e-4, "b": -100.0, "c": 1500.0, "d": 12,
                                                                               "e": "1e", "f": "3e-4"}
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("lr: 2.0e-3", "lr: 2e-3"))
    assert load_config(path).train_tokenizer["embedded"].lr == 2e-3
    assert _parse_overrides(["train_generator.embedded_nbp.lr=3e-3"]) == {"train_generator.embedded_nbp.lr": 3e-3}
