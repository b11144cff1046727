"""`nbp select SUITE` rewrites only the run lists of params.yaml, and every suite is a valid selection."""

from __future__ import annotations

import shutil

import pytest
import yaml
from pipeline_helpers import ROOT, run

from nbp import dag
from nbp.config import ConfigError, load_config
from nbp.suites import SUITES, rewrite_run, select


@pytest.mark.parametrize("suite", list(SUITES))
def test_every_suite_selects_a_wired_dag(tmp_path, suite):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    original = p.read_text()
    select(p, suite)
    cfg = load_config(p)
    dag.check_wiring(cfg)
    lists = SUITES[suite][1]
    assert (cfg.run.datasets, cfg.run.tokenizers, cfg.run.generators) == (lists["datasets"], lists["tokenizers"],
                                                                          lists["generators"])
    changed = [(a, b) for a, b in zip(original.splitlines(), p.read_text().splitlines()) if a != b]
    assert len(original.splitlines()) == len(p.read_text().splitlines())
    assert all(a.startswith(("  datasets:", "  tokenizers:", "  generators:")) for a, _ in changed), changed
    select(p, "embedded")
    assert p.read_text() == original  # the default is the embedded suite, byte for byte


def test_rewrite_keeps_comments_and_block_lists():
    text = (
        "# head comment\n"
        "run:   # the switch\n"
        "  datasets:   # which data\n"
        "    - a\n"
        "    - b\n"
        "  tokenizers: [t]  # keep me\n"
        "  out: out\n"
        "  generators: []\n"
        "\n"
        "download: {a: 1}\n"
    )
    new = rewrite_run(text, {"datasets": ["k600"], "tokenizers": ["k1", "k2"], "generators": ["g"]})
    assert new == (
        "# head comment\n"
        "run:   # the switch\n"
        "  datasets: [k600]  # which data\n"
        "  tokenizers: [k1, k2]  # keep me\n"
        "  out: out\n"
        "  generators: [g]\n"
        "\n"
        "download: {a: 1}\n"
    )
    assert yaml.safe_load(new)["run"] == {"datasets": ["k600"], "tokenizers": ["k1", "k2"], "out": "out", "generators": ["g"]}


def test_select_refuses_unknown_suite_and_broken_wiring(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    before = p.read_text()
    with pytest.raises(ConfigError, match="unknown suite 'k700'"):
        select(p, "k700")
    res = run(["nbp", "select", "k700", "--params", str(p)], ROOT, check=False)
    assert res.returncode == 2 and "k700" in res.stderr
    broken = before.replace("k600: {tokenizer: k600, batch_size: 32}", "k600: {tokenizer: ucf101, batch_size: 32}")
    assert broken != before
    p.write_text(broken)
    with pytest.raises(ConfigError, match=r"tokenize\.k600\.tokenizer: must be 'k600'"):
        select(p, "k600")
    assert p.read_text() == broken  # nothing written
