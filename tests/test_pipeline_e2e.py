"""The whole DAG on a tiny parameter set, through `dvc repro` and through `snakemake -c2`, each in a fresh copy of
the repository: everything runs once, a second run does nothing, and changing one tokenizer parameter reruns
exactly the stages downstream of the tokenizer. The two first runs start together (their stages overlap on the
machine's cores, which mostly wait on Python start-up)."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from pipeline_helpers import (
    ALL_STAGES,
    BIN,
    EXPECTED_RERUN,
    TOKENIZER_CHANGE,
    check_results,
    dvc,
    finish,
    import_trace_env,
    model_weights,
    ran_dvc,
    ran_snakemake,
    same_weights,
    set_params,
    snakemake,
    stage_imports,
    start,
    tiny_repo,
)

from nbp import dag

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory):
    """The first full runs of `dvc repro` and `snakemake -c2`, each in its own tiny copy, started together."""
    tmp = tmp_path_factory.mktemp("e2e")
    dvc_repo, sm_repo = tiny_repo(tmp / "dvc"), tiny_repo(tmp / "snakemake")
    trace = import_trace_env(tmp / "trace")
    t0 = time.monotonic()
    procs = {"dvc": start([str(BIN / "dvc"), "repro"], dvc_repo, **trace),
             "snakemake": start([sys.executable, "-m", "snakemake", "-c2"], sm_repo)}
    for p in procs.values():  # both end before either is judged
        p.wait(timeout=900)
    results = {k: finish(p) for k, p in procs.items()}
    return {"dvc": (dvc_repo, results["dvc"]), "snakemake": (sm_repo, results["snakemake"]), "trace": tmp / "trace",
            "seconds": time.monotonic() - t0}


def test_dvc_repro_end_to_end(first_runs, record_property):
    repo, res = first_runs["dvc"]
    record_property("first_runs_s", round(first_runs["seconds"], 1))
    assert ran_dvc(res.stdout) == ALL_STAGES
    check_results(repo)
    assert (repo / "dvc.lock").is_file()
    # the code each stage really imported is among its declared code dependencies
    imported = stage_imports(first_runs["trace"], repo)
    assert set(imported) == {s.name for s in dag.STAGES}, sorted(imported)
    for stage, files in imported.items():
        deps = dag.code_deps(stage) + tuple(dag.runtime_imports_allowed())
        missing = sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps))
        assert not missing, f"{stage} imports {missing}: add them to its code in nbp/dag.py"

    t0 = time.monotonic()
    res = dvc(["repro"], repo)
    record_property("dvc_noop_s", round(time.monotonic() - t0, 1))
    assert ran_dvc(res.stdout) == set(), res.stdout
    assert "Data and pipelines are up to date" in res.stdout
    assert "changed" not in dvc(["status"], repo).stdout
    check_comment_only_change(repo)

    metrics = json.loads(dvc(["metrics", "show", "--json"], repo).stdout)
    files = next(iter(metrics.values()))["data"]
    assert "gfvd" in files["out/eval_generator/embedded_nbp/metrics.json"]["data"]
    plots = json.loads(dvc(["plots", "show", "--json"], repo).stdout)["data"]
    assert {"fps_vs_block_size", "fvd_vs_block_size", "out/train_generator/embedded_nbp/history.csv"} <= set(plots)
    points = plots["fvd_vs_block_size"][0]["content"]["data"]["values"]
    assert any(p["block_size"] == "16" and p["paper_k600_fvd"] == "25.5" for p in points)

    before = {g: model_weights(repo / f"out/train_generator/{g}/generator.pt") for g in ("embedded_nbp", "embedded_ntp")}
    set_params(repo / "params.yaml", TOKENIZER_CHANGE)
    res = dvc(["repro"], repo)
    assert ran_dvc(res.stdout) == EXPECTED_RERUN, res.stdout
    for g, w in before.items():  # retrained on the new tokens, not resumed from the finished run on the old ones
        assert not same_weights(w, model_weights(repo / f"out/train_generator/{g}/generator.pt")), g


def test_snakemake_end_to_end(first_runs, record_property):
    repo, res = first_runs["snakemake"]
    assert ran_snakemake(res.stderr + res.stdout) == ALL_STAGES
    check_results(repo)
    for stage in ("train_tokenizer/embedded", "eval_generator/embedded_ntp", "fetch_detector", "tables"):
        assert (repo / "logs" / f"{stage}.log").is_file(), stage

    t0 = time.monotonic()
    res = snakemake(["-c2"], repo)
    record_property("snakemake_noop_s", round(time.monotonic() - t0, 1))
    assert "Nothing to be done" in res.stdout + res.stderr, res.stderr[-3000:]

    # Snakemake decides everything it will rerun before running anything: its dry run is the plan it executes
    # (the DVC test above runs the rerun for real and checks the retrained weights)
    set_params(repo / "params.yaml", TOKENIZER_CHANGE)
    planned = ran_snakemake(snakemake(["-n", "-c2"], repo).stdout)
    assert planned == EXPECTED_RERUN


# killed stages, leaf first (each kill leaves its upstream intact): (stage instance, NBP_FAULT, its output folder or
# file). DVC deletes a stage's outputs before it runs, so the kill falls where the complete new folder waits to be
# moved in (`swap`); tables: between two tables (its receipt, the done-marker, is removed first)
KILLS = [
    ("tables", "write:main.md", "out/tables/receipt.json"),
    ("eval_generator@embedded_nbp", "swap:eval_generator/embedded_nbp", "out/eval_generator/embedded_nbp"),
    ("train_generator@embedded_nbp", "swap:train_generator/embedded_nbp", "out/train_generator/embedded_nbp"),
    ("tokenize@embedded", "swap:tokenize/embedded", "out/tokenize/embedded"),
    ("eval_tokenizer@embedded", "swap:eval_tokenizer/embedded", "out/eval_tokenizer/embedded"),
    ("train_tokenizer@embedded", "swap:train_tokenizer/embedded", "out/train_tokenizer/embedded"),
    ("real_stats@embedded", "swap:real_stats/embedded", "out/real_stats/embedded"),
]


def test_every_stage_killed_while_writing_is_not_done_for_dvc(first_runs):
    """Issue 13 item 3, on the DVC repository the test above left up to date: each stage, forced to run again, is
    SIGKILLed while its outputs are replaced (prepare: tests/test_stage_kills.py, with Snakemake too). None of its
    declared outputs is left; `dvc status` lists every killed stage; one `dvc repro` reruns them, the DAG is up to
    date again, and the killed runs' temporaries are gone."""
    from nbp.config import load_config

    repo, _ = first_runs["dvc"]
    cfg = load_config(repo / "params.yaml")
    assert "changed" not in dvc(["status"], repo).stdout
    for stage, fault, output in KILLS:
        res = dvc(["repro", "-f", "-s", stage], repo, check=False, NBP_FAULT=fault)
        assert res.returncode != 0, f"{stage}: not killed\n{res.stdout[-2000:]}"
        if stage == "tables":  # its receipt says done (the tables themselves are written one by one)
            assert not (repo / output).exists(), f"tables: {output} left behind by the kill"
        else:
            name, _, entry = stage.partition("@")
            declared = [repo / p for p in dag.resolve(cfg, name, entry).outputs.values()]
            assert declared and not [p for p in declared if p.exists()], stage
    changed = _dvc_changed_stages(repo)
    assert {s for s, _, _ in KILLS} <= changed, changed
    res = dvc(["repro"], repo)
    ran = ran_dvc(res.stdout)
    restored = set(re.findall(r"Stage '([^']+)' is cached - skipping run, checking out outputs", res.stdout))
    assert {s for s, _, _ in KILLS} <= ran | restored, res.stdout[-3000:]  # rerun, or its outputs from DVC's run cache
    assert "changed" not in dvc(["status"], repo).stdout
    check_results(repo)
    for stage, _, output in KILLS:  # a rerun removes its killed predecessor's temporaries (a cache checkout cannot)
        if stage not in ran:
            continue
        for folder in [(repo / output).parent] + ([repo / "results"] if stage == "tables" else []):
            assert not [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))], (stage, folder)


def _dvc_changed_stages(repo) -> set[str]:
    """Stage instances `dvc status` reports (lines `name:` at the start, e.g. `tables:` or `prepare@embedded:`)."""
    out = dvc(["status"], repo).stdout
    return {ln[:-1] for ln in out.splitlines() if ln.endswith(":") and not ln.startswith((" ", "\t"))}


def check_comment_only_change(repo) -> None:
    """Code deps are modules, not folders: a comment added to a module leaves `dvc status` clean for every stage
    that does not import it (before: a docstring edit in nbp/tokenizer invalidated every downstream stage)."""
    module = "nbp/metrics/image.py"  # the PSNR/SSIM/LPIPS metrics: the tokenizer's training and evaluation only
    users = {s.name for s in dag.STAGES if module in dag.code_deps(s.name)}
    assert users == {"train_tokenizer", "eval_tokenizer"}, users
    path = repo / module
    text = path.read_text()
    try:
        path.write_text(text + "\n# a comment\n")
        assert _dvc_changed_stages(repo) == {"train_tokenizer@embedded", "eval_tokenizer@embedded"}
    finally:
        path.write_text(text)
    assert _dvc_changed_stages(repo) == set()
