"""dvc.yaml and the Snakefile describe the same DAG: same stages, commands, inputs, outputs, params."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import pytest
from pipeline_helpers import (
    ROOT,
    covers,
    dvc_dag,
    edges_dvc,
    edges_snakemake,
    run,
    snakemake,
    snakemake_dag,
    strip_log,
)

from nbp import dag
from nbp.config import ConfigError, load_config
from nbp.suites import select


def test_committed_dvc_yaml_is_generated_from_dag_py():
    assert (ROOT / "dvc.yaml").read_text() == dag.render_dvc_yaml(), "dvc.yaml is stale: run `nbp dag --write`"
    res = run(["nbp", "dag", "--check"], ROOT)
    assert "current" in res.stdout


@functools.cache
def _dags(suite: str):
    """params (switched to ``suite``), DVC's resolved stages and Snakemake's dry-run jobs, computed once per suite."""
    repo = Path(tempfile.mkdtemp(prefix=f"nbp-dag-{suite}-"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    (repo / ".dvc").mkdir()
    (repo / ".dvc" / "config").write_text("[core]\n    no_scm = true\n    analytics = false\n")
    select(repo / "params.yaml", suite)
    try:
        return load_config(repo / "params.yaml"), dvc_dag(repo), snakemake_dag(["--configfile", str(repo / "params.yaml")])
    finally:
        shutil.rmtree(repo)


@pytest.mark.parametrize("suite", ["embedded", "k600_ablations", "released"])
def test_dvc_and_snakemake_dags_agree(suite):
    cfg, dv, sm = _dags(suite)
    assert set(dv) == set(sm), f"stages differ: dvc-only {set(dv) - set(sm)}, snakemake-only {set(sm) - set(dv)}"
    expected = {f"{s.name}@{e}" for s in dag.STAGES for e in dag.selected(cfg, s.name)}
    expected |= {s.name for s in dag.STAGES if s.is_global}
    assert set(dv) == expected
    for name, d in dv.items():
        stage, _, entry = name.partition("@")
        job = sm[name]
        assert d["cmd"] == dag.command(stage, entry or None)
        # the same command; Snakemake starts a training stage under torchrun when its job has several GPUs
        gpu = int(job["resources"].get("gpu", 0))
        assert strip_log(job["shell"]) == dag.command(stage, entry or None, dag.launcher(stage, gpu))
        assert job["log"] == [f"logs/{stage}/{entry}.log" if entry else f"logs/{stage}.log"]
        assert sorted(job["output"]) == sorted(d["outs"])
        assert d["params"] == dag.params_keys(stage, entry or None)
        for path in job["input"]:
            assert any(covers(dep, path) for dep in d["deps"]), f"{name}: snakemake input {path} is not a dvc dep"
        for dep in d["deps"]:
            assert any(covers(dep, path) for path in job["input"]), f"{name}: dvc dep {dep} is not a snakemake input"
    e_sm, e_dvc = edges_snakemake(sm), edges_dvc(dv)
    assert e_sm <= e_dvc
    if len(cfg.run.datasets) == 1 and len(cfg.run.tokenizers) == 1:
        assert e_dvc == e_sm  # one entry per family: the coarse folders are exact
    else:  # several: the extra DVC edges come only from a stage-folder dependency (out/<stage>)
        for a, b in e_dvc - e_sm:
            coarse = {f"{cfg.run.out}/{s.name}" for s in dag.STAGES}
            assert any(dep in coarse for dep in dv[b]["deps"] if any(covers(dep, o) for o in dv[a]["outs"])), (a, b)


def test_embedded_dag_shape():
    """The edges of the default DAG, written out by hand."""
    e = edges_snakemake(_dags("embedded")[2])
    want = {
        ("download@embedded", "prepare@embedded"), ("prepare@embedded", "real_stats@embedded"),
        ("fetch_detector", "real_stats@embedded"), ("prepare@embedded", "train_tokenizer@embedded"),
        ("fetch_detector", "train_tokenizer@embedded"),  # the I3D perceptual loss, for entries that ask for it
        ("train_tokenizer@embedded", "eval_tokenizer@embedded"), ("prepare@embedded", "eval_tokenizer@embedded"),
        ("fetch_detector", "eval_tokenizer@embedded"), ("train_tokenizer@embedded", "tokenize@embedded"),
        ("prepare@embedded", "tokenize@embedded"), ("eval_tokenizer@embedded", "tables"),
        # the LPIPS weights (the perceptual loss, Table 7's LPIPS); for the embedded run the stage fetches nothing
        ("fetch_lpips", "train_tokenizer@embedded"), ("fetch_lpips", "eval_tokenizer@embedded"),
    }
    for g in ("embedded_nbp", "embedded_ntp"):
        want |= {("tokenize@embedded", f"train_generator@{g}"), (f"train_generator@{g}", f"eval_generator@{g}"),
                 ("tokenize@embedded", f"eval_generator@{g}"), ("train_tokenizer@embedded", f"eval_generator@{g}"),
                 ("real_stats@embedded", f"eval_generator@{g}"), ("fetch_detector", f"eval_generator@{g}"),
                 ("prepare@embedded", f"eval_generator@{g}"),  # labels / context frames of the FVD reference split
                 (f"eval_generator@{g}", "tables")}
    assert e == want


def _family_edges(ds: str, tok: str, gens: list[str]) -> set[tuple[str, str]]:
    """The edges of one dataset -> tokenizer -> generators chain, as the recipe says (written here, not from nbp/dag.py):
    clips feed the FVD reference, the tokenizer (and its evaluation) and the token shards; each generator trains on
    the shards and is scored with its tokenizer against the reference; every evaluation feeds the tables."""
    want = {
        (f"download@{ds}", f"prepare@{ds}"), (f"prepare@{ds}", f"real_stats@{ds}"), ("fetch_detector", f"real_stats@{ds}"),
        (f"prepare@{ds}", f"train_tokenizer@{tok}"), ("fetch_detector", f"train_tokenizer@{tok}"),  # I3D perceptual loss
        (f"train_tokenizer@{tok}", f"eval_tokenizer@{tok}"),
        (f"prepare@{ds}", f"eval_tokenizer@{tok}"), ("fetch_detector", f"eval_tokenizer@{tok}"),
        (f"train_tokenizer@{tok}", f"tokenize@{tok}"), (f"prepare@{ds}", f"tokenize@{tok}"), (f"eval_tokenizer@{tok}", "tables"),
        ("fetch_lpips", f"train_tokenizer@{tok}"), ("fetch_lpips", f"eval_tokenizer@{tok}"),  # LPIPS weights
    }
    for g in gens:
        want |= {(f"tokenize@{tok}", f"train_generator@{g}"), (f"train_generator@{g}", f"eval_generator@{g}"),
                 (f"tokenize@{tok}", f"eval_generator@{g}"), (f"train_tokenizer@{tok}", f"eval_generator@{g}"),
                 (f"real_stats@{ds}", f"eval_generator@{g}"), ("fetch_detector", f"eval_generator@{g}"),
                 (f"prepare@{ds}", f"eval_generator@{g}"),  # labels / context frames of the FVD reference split
                 (f"eval_generator@{g}", "tables")}
    return want


ABLATIONS = ["k600_base_ntp", "k600_base_nbp8", "k600_base_nbp16", "k600_base_nbp32", "k600_base_nbp64", "k600_base_nbp256",
             "k600_base_b1x4x4", "k600_base_b2x1x8", "k600_base_b2x2x2"]


def test_k600_ablations_dag_shape():
    """Figure 7 / Table 3: nine K600 generators on one tokenizer; no generator depends on another."""
    _, dv, sm = _dags("k600_ablations")
    want = _family_edges("k600", "k600", ABLATIONS)
    assert edges_snakemake(sm) == want
    assert want <= edges_dvc(dv)
    assert not {(a, b) for a, b in edges_snakemake(sm) if a.startswith("train_generator@") and b != a.replace("train_", "eval_")}


def test_released_dag_shape():
    """The released checkpoints: two separate chains (UCF-101, K600), imported tokenizers and generators, no crossing."""
    _, dv, sm = _dags("released")
    want = _family_edges("ucf101", "released_ucf", ["released_ucf_nbp16"])
    want |= _family_edges("k600", "released_k600", ["released_k600_nbp16"])
    assert edges_snakemake(sm) == want
    assert want <= edges_dvc(dv)
    assert ("prepare@k600", "eval_tokenizer@released_ucf") not in edges_snakemake(sm)  # families never cross


def test_snakemake_lint_is_clean():
    res = snakemake(["--lint"], check=False)
    assert res.returncode == 0 and "good condition" in res.stdout + res.stderr, res.stdout + res.stderr


def test_wiring_rules(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((ROOT / "params.yaml").read_text())
    dag.check_wiring(load_config(p))
    cfg = load_config(p, overrides={"eval_generator.embedded_nbp.generator": "embedded_ntp"})
    with pytest.raises(ConfigError, match=r"eval_generator\.embedded_nbp\.generator: must be 'embedded_nbp'"):
        dag.check_wiring(cfg)
    cfg = load_config(p, overrides={"run.generators": ["ucf_base_nbp16"]})
    with pytest.raises(ConfigError, match=r"'ucf101' is needed by `train_generator.ucf_base_nbp16`"):
        dag.check_wiring(cfg)


def test_launcher_commands():
    assert dag.launcher("train_generator", 0) == "nbp"
    assert dag.launcher("train_generator", 1) == "nbp"
    assert dag.launcher("train_generator", 4) == "python -m nbp.launch --standalone --nproc_per_node=4 -m nbp"
    # sharded evaluation
    assert dag.launcher("eval_generator", 8) == "python -m nbp.launch --standalone --nproc_per_node=8 -m nbp"
    for stage in ("real_stats", "eval_tokenizer", "tokenize", "eval_generator"):
        assert dag.launcher(stage, 1) == "nbp"  # one GPU (a workstation): one process
    assert dag.launcher("prepare", 8) == dag.launcher("tables", 4) == "nbp"  # not torchrun-launchable
    multi = dag.launcher("train_tokenizer", 8, nodes=2)
    assert multi.startswith("srun --nodes=2 --ntasks-per-node=1 python -m nbp.launch --nnodes=2 --nproc_per_node=8 ")
    assert multi.endswith(" -m nbp")


@pytest.mark.parametrize("profile", [None, "workflow/profiles/slurm"])
def test_a_fresh_clone_with_committed_results_plans_the_whole_dag(tmp_path, profile):
    """The committed results/ tables cannot stand in for the DAG's end: the tables stage's receipt lives under
    run.out, so `snakemake -n` on a fresh clone (results/ present and newer than everything) plans every stage."""
    from pipeline_helpers import ALL_STAGES, copy_repo, ran_snakemake

    repo = copy_repo(tmp_path / "clone")
    for name in dag.TABLE_FILES:  # what a clone of main holds: every table, committed after a real run
        p = repo / "results" / name
        p.mkdir(parents=True) if name == "samples" else p.write_text("committed\n")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results"], repo)
    args = ["-n", "-c2"] + (["--profile", profile] if profile else [])
    planned = ran_snakemake(snakemake(args, cwd=repo).stdout)
    assert planned == ALL_STAGES, sorted(planned ^ ALL_STAGES)


def test_a_fresh_clone_dry_runs_every_stage_under_dvc(tmp_path):
    """On a fresh clone `dvc repro --dry --force` and `dvc exp run --dry --force` list every stage and exit 0. Plain
    `--dry` stops at the first stage with an upstream output (DVC 3.67 hashes a stage's dependencies for its run
    cache before printing it, and an output not yet made cannot be hashed); `--force` skips that lookup, and on a
    fresh clone every stage runs anyway. The README documents both."""
    from pipeline_helpers import ALL_STAGES, copy_repo, dvc, ran_dvc

    repo = copy_repo(tmp_path / "clone")
    plain = dvc(["repro", "--dry"], repo, check=False)
    assert plain.returncode != 0 and "No such file or directory" in plain.stdout + plain.stderr  # as documented
    for cmd in (["repro", "--dry", "--force"], ["exp", "run", "--dry", "--force"]):
        out = dvc(cmd, repo)
        assert ran_dvc(out.stdout + out.stderr) == ALL_STAGES, cmd
    assert not (repo / "out").exists()  # a dry run made nothing
