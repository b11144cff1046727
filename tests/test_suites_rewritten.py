"""`nbp select` on params.yaml files it did not write: after a real `dvc exp run -S` (block lists, anchors
expanded, long lines wrapped), with wrapped flow lists or indentless block lists, and a one-line refusal where the
run lists cannot be rewritten safely."""

from __future__ import annotations

import shutil

import pytest
from pipeline_helpers import ROOT, run

from nbp.config import ConfigError, load_config, read_yaml
from nbp.suites import SUITES, rewrite_run, select

DVC_YAML = """stages:
  lr:
    cmd: python -c "print(1)" > lr.txt
    params: [train_generator.embedded_nbp.lr]
    outs: [lr.txt]
"""


def _git_dvc_repo(path):
    path.mkdir()
    shutil.copy(ROOT / "params.yaml", path / "params.yaml")
    (path / "dvc.yaml").write_text(DVC_YAML)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        run(cmd, path)
    return path


def test_select_after_a_real_dvc_exp_run(tmp_path):
    repo = _git_dvc_repo(tmp_path / "repo")
    run(["dvc", "exp", "run", "-q", "-S", "train_generator.embedded_nbp.lr=3e-4"], repo)
    p = repo / "params.yaml"
    rewritten = p.read_text()
    assert "  datasets:\n  - embedded\n" in rewritten  # DVC's dump: block lists at the key's column
    assert "embedded_ntp: {<<: *emb_gen, block: [1, 1, 1], tokens: embedded" in rewritten  # anchor merged and expanded
    before = read_yaml(rewritten)

    select(p, "k600")
    after = read_yaml(p.read_text())
    assert {k: after["run"][k] for k in ("datasets", "tokenizers", "generators")} == SUITES["k600"][1]
    assert {k: v for k, v in after.items() if k != "run"} == {k: v for k, v in before.items() if k != "run"}
    assert after["train_generator"]["embedded_nbp"]["lr"] == 3e-4  # the experiment's value survives
    assert load_config(p).run.generators == SUITES["k600"][1]["generators"]
    changed = [ln for ln in p.read_text().splitlines() if ln not in rewritten.splitlines()]
    assert changed == ["  datasets: [k600]", "  tokenizers: [k600]", "  generators: [" + ", ".join(
        SUITES["k600"][1]["generators"]) + "]"]

    res = run(["nbp", "select", "embedded"], repo)  # and back, through the CLI
    assert "run selects suite 'embedded'" in res.stdout
    assert read_yaml(p.read_text())["run"] == read_yaml((ROOT / "params.yaml").read_text())["run"]


def test_rewrite_replaces_wrapped_flow_lists_and_indentless_block_lists():
    text = (
        "run:\n"
        "  datasets:\n"
        "  - a\n"
        "  # a comment inside the list\n"
        "  - b\n"
        "  tokenizers: [t1,\n"
        "      t2]  # wrapped\n"
        "  generators:\n"
        "    - g1\n"
        "  out: out\n"
        "  # trailing comment stays\n"
        "\n"
        "download: {a: 1}\n"
    )
    new = rewrite_run(text, {"datasets": ["d"], "tokenizers": ["t"], "generators": ["g", "h"]})
    assert new == (
        "run:\n"
        "  datasets: [d]\n"
        "  tokenizers: [t]\n"
        "  generators: [g, h]\n"
        "  out: out\n"
        "  # trailing comment stays\n"
        "\n"
        "download: {a: 1}\n"
    )


def test_anchors_inside_the_run_section_are_rewritten_with_it(tmp_path):
    original = (ROOT / "params.yaml").read_text()
    start, end = original.index("run:\n"), original.index("  out: out\n")
    p = tmp_path / "params.yaml"
    p.write_text(original[:start] + "run:\n  datasets: &ds [embedded]\n  tokenizers: *ds\n  generators: [embedded_nbp]\n"
                 + original[end:])
    select(p, "k600")
    assert load_config(p).run.tokenizers == ["k600"] and "*ds" not in p.read_text()


def test_missing_run_key_is_added_inside_the_section():
    new = rewrite_run("run:\n  out: out\n\ndownload: {}\n", {"generators": ["g"]})
    assert new == "run:\n  out: out\n  generators: [g]\n\ndownload: {}\n"


def test_a_flow_mapping_run_section_is_written_anew(tmp_path):
    original = (ROOT / "params.yaml").read_text()
    start, end = original.index("run:\n"), original.index("\ndownload:")
    p = tmp_path / "params.yaml"
    p.write_text(original[:start] + "run: {datasets: [embedded], tokenizers: [embedded], generators: [embedded_nbp],\n"
                 "  out: out, seed: 3}\n" + original[end:])
    select(p, "k600")
    text = p.read_text()
    assert text[:start] == original[:start] and text.endswith(original[end:])  # only the run section changed
    assert text[start:len(text) - len(original) + end] == (
        "run:\n  datasets: [k600]\n  tokenizers: [k600]\n  generators: [" + ", ".join(SUITES["k600"][1]["generators"])
        + "]\n  out: out\n  seed: 3\n")


@pytest.mark.parametrize("run_section, match", [
    # an anchor of a run list used outside the section: neither edit can keep the other use
    ("run:\n  datasets: &ds [embedded]\n  tokenizers: [embedded]\n  generators: [embedded_nbp]\n"
     "tables: {out: *ds}\n", "could not rewrite the run lists safely"),
    ("run:\n  datasets: [embedded\n", "not valid YAML"),
])
def test_select_refuses_in_one_line_and_writes_nothing(tmp_path, run_section, match):
    original = (ROOT / "params.yaml").read_text()
    start = original.index("run:\n")
    end = original.index("\ndownload:")
    p = tmp_path / "params.yaml"
    p.write_text(original[:start] + run_section + original[end:])
    before = p.read_text()
    with pytest.raises(ConfigError, match=match):
        select(p, "k600")
    assert p.read_text() == before
    res = run(["nbp", "select", "k600", "--params", str(p)], ROOT, check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and match.split("`")[0] in res.stderr
