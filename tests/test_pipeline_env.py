"""The conda environment of the Snakemake rules pins exactly pyproject.toml's dependencies."""

import pytest
import yaml
from pipeline_helpers import ROOT

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_conda_env_matches_pyproject_pins():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "workflow/envs/nbp.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert sorted(pip) == sorted(pins)
    assert all("==" in p for p in pip)
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and py == "python=3.11"  # the pinned dependencies need 3.11
    assert (ROOT / "workflow/envs/nbp.post-deploy.sh").stat().st_mode & 0o111  # Snakemake runs it after creating the env
