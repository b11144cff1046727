"""The paper suites end to end, shrunk in size only (`nbp smoke SUITE`), on data the test writes in the real layouts:
UCF-101 (all 101 classes in classInd, official list formats, xvid AVIs), K600 (CVDF layout), released files in the
released formats. Each suite runs to results/ through `dvc repro` in a fresh copy of the repository; ucf101 also
through Snakemake: `snakemake -c2` runs its data and tokenizer stages, then the Slurm CPU profile on a local one-node
Slurm runs the rest. The tables hold the metrics' numbers, every row of ours marked as a smoke run."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from pipeline_helpers import BIN, _same_number, copy_repo, dvc, env, ran_dvc, ran_snakemake, run, set_params, snakemake
from smoke_data import (
    smoke_params,
    write_k600,
    write_released_generator,
    write_released_tokenizer,
    write_ucf101,
    write_vgg16,
)

from nbp import tables

# in CI; `pytest -m paper_smoke` runs only these, `-m 'not paper_smoke'` everything else
pytestmark = [pytest.mark.slow, pytest.mark.paper_smoke]

GLOBAL = {"fetch_detector", "fetch_lpips", "tables"}


def stages_of(datasets, tokenizers, generators) -> set[str]:
    return GLOBAL | {f"{s}@{d}" for d in datasets for s in ("download", "prepare", "real_stats")} | {
        f"{s}@{t}" for t in tokenizers for s in ("train_tokenizer", "eval_tokenizer", "tokenize")} | {
        f"{s}@{g}" for g in generators for s in ("train_generator", "eval_generator")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("smoke_data")
    out = {"ucf": write_ucf101(d / "ucf"), "k600": write_k600(d / "kinetics"), "vgg": write_vgg16(d / "vgg16-random.pth")}
    out["released"] = {"train_tokenizer.released_ucf.checkpoint": write_released_tokenizer(d / "magvit2_ucf.pt"),
                       "train_tokenizer.released_k600.checkpoint": write_released_tokenizer(d / "magvit2_k600.pt", seed=1),
                       "train_generator.released_ucf_nbp16.checkpoint": write_released_generator(d / "ucf.ckpt", "hybrid"),
                       "train_generator.released_k600_nbp16.checkpoint": write_released_generator(d / "k600.ckpt",
                                                                                                 "frame_pred", seed=1)}
    return out


def smoke_repo(dst: Path, data: dict, suite: str, released: bool = False) -> Path:
    """A committed copy of the repository, the user's edits made (data roots, local VGG16), then `nbp smoke SUITE`."""
    copy_repo(dst)
    values = smoke_params(data["ucf"], data["k600"], data["vgg"])
    if released:
        values |= {k: str(v) for k, v in data["released"].items()}
    set_params(dst / "params.yaml", values)
    smoke_suite(dst, suite)
    return dst


def smoke_suite(repo: Path, suite: str) -> None:
    run([str(BIN / "nbp"), "smoke", suite], repo)
    run(["git", "commit", "-qam", f"smoke {suite}"], repo)


def check_smoke_tables(repo: Path, generators: list[str], tokenizers: list[str]) -> None:
    """Every table is bannered as a smoke run; each of our rows is marked and holds its metrics.json numbers."""
    res = repo / "results"
    for name in ("tokenizer", "main", "ntp_vs_nbp", "block_size", "block_shape"):
        md = (res / f"{name}.md").read_text()
        assert "(SMOKE RUN)" in md.splitlines()[0] and tables.SMOKE_BANNER in md, name
    assert (res / "README.md").read_text().startswith(tables.SMOKE_BANNER)
    for t in tokenizers:
        m = json.loads((repo / "out" / "eval_tokenizer" / t / "metrics.json").read_text())
        (row,) = [r for r in _csv(res / "tokenizer.csv") if r["experiment"] == f"{tables.SMOKE}: `{t}`"]
        _same_number(row["ours PSNR"], m["psnr"], 2, f"tokenizer.csv {t}")
        _same_number(row["ours LPIPS"], m["lpips"], 4, f"tokenizer.csv {t} LPIPS")  # LPIPS weights were there
    for g in generators:
        m = json.loads((repo / "out" / "eval_generator" / g / "metrics.json").read_text())
        rows = [r for name in ("main", "ntp_vs_nbp", "block_size", "block_shape") for r in _csv(res / f"{name}.csv")
                if r["experiment"] == f"{tables.SMOKE}: `{g}`"]
        assert rows, f"{g}: no smoke row in any table"
        for r in rows:
            _same_number(r["ours FVD"], m["gfvd"], 1, f"{g} ours FVD")
    for name in ("main", "ntp_vs_nbp", "block_size", "block_shape", "tokenizer"):
        for r in _csv(res / f"{name}.csv"):  # no evaluated row of ours without the marker
            if r["samples"] not in (tables.NA, tables.NOT_RUN):
                assert r["experiment"].startswith(tables.SMOKE), (name, r)


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _timed_dvc(repo: Path, record_property, key: str) -> set[str]:
    t0 = time.monotonic()
    res = dvc(["repro"], repo, timeout=2700)
    record_property(key, round(time.monotonic() - t0, 1))
    record_property(f"{key}_load", os.getloadavg()[0])
    return ran_dvc(res.stdout)


UCF = (["ucf101"], ["ucf101"], ["ucf_base_nbp16", "ucf_xl_nbp16", "ucf_3b_nbp16"])


def test_ucf101_smoke_through_dvc(data, tmp_path, record_property):
    repo = smoke_repo(tmp_path / "repo", data, "ucf101")
    ran = _timed_dvc(repo, record_property, "ucf101_dvc_s")
    assert ran == stages_of(*UCF)
    check_smoke_tables(repo, UCF[2], UCF[1])
    trained = {g: json.loads((repo / "out" / "train_generator" / g / "metrics.json").read_text()) for g in UCF[2]}
    assert trained["ucf_3b_nbp16"].get("strategy") == "deepspeed_zero2"  # the 3B recipe's ZeRO-2, one CPU process
    base, xl, b3 = (trained[g]["params"] for g in UCF[2])
    assert base < xl < b3, (base, xl, b3)  # the shrunk presets stay apart (depth 2 / 3 / 4)


def test_k600_then_ablations_through_dvc_share_the_tokenizer(data, tmp_path, record_property):
    from nbp.suites import SUITES

    repo = smoke_repo(tmp_path / "repo", data, "k600")
    k600 = SUITES["k600"][1]
    ran = _timed_dvc(repo, record_property, "k600_dvc_s")
    assert ran == stages_of(k600["datasets"], k600["tokenizers"], k600["generators"])
    check_smoke_tables(repo, k600["generators"], ["k600"])
    smoke_suite(repo, "k600_ablations")
    abl = SUITES["k600_ablations"][1]
    ran = _timed_dvc(repo, record_property, "k600_ablations_dvc_s")
    new = [g for g in abl["generators"] if g not in k600["generators"]]
    assert ran == {"tables"} | {f"{s}@{g}" for g in new for s in ("train_generator", "eval_generator")}
    check_smoke_tables(repo, abl["generators"] + k600["generators"], ["k600"])
    for g in ("k600_base_b2x1x8", "k600_base_b2x2x2"):  # the tail-block shapes ran
        m = json.loads((repo / "out" / "eval_generator" / g / "metrics.json").read_text())
        assert m["num_videos"] == 2


def test_released_smoke_through_dvc(data, tmp_path, record_property):
    from nbp.suites import SUITES

    repo = smoke_repo(tmp_path / "repo", data, "released", released=True)
    rel = SUITES["released"][1]
    ran = _timed_dvc(repo, record_property, "released_dvc_s")
    assert ran == stages_of(rel["datasets"], rel["tokenizers"], rel["generators"])
    check_smoke_tables(repo, rel["generators"], rel["tokenizers"])
    main = _csv(repo / "results" / "main.csv")
    assert sum(r["model"] == "NBP 700M (released weights)" and r["experiment"].startswith(tables.SMOKE) for r in main) == 2


DATA_AND_TOKENIZER = ("download", "fetch_detector", "fetch_lpips", "prepare", "real_stats", "train_tokenizer",
                      "eval_tokenizer", "tokenize")


@pytest.mark.slurm
def test_ucf101_smoke_through_snakemake_then_the_slurm_profile(data, tmp_path, record_property):
    """One ucf101 suite, both Snakemake runners on one workspace, as a user who starts on a workstation and finishes
    on the cluster: `snakemake -c2 --until tokenize eval_tokenizer real_stats` runs the data and tokenizer stages
    (local executor, 2 jobs at once), then the Slurm CPU profile on a local one-node Slurm runs the generators and
    the tables, taking the local run's outputs as done. Each runner runs exactly its part; together, every stage
    of the suite."""
    from slurm_cluster import SlurmCluster, slurm_installed

    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if not slurm_installed() and ci:
        pytest.fail("CI: slurmctld/slurmd/munged are not installed (.ci/run apt-installs them)")
    repo = smoke_repo(tmp_path / "repo", data, "ucf101")
    every = stages_of(*UCF)
    local = {s for s in every if s.split("@")[0] in DATA_AND_TOKENIZER}
    t0 = time.monotonic()
    res = snakemake(["-c2", "--until", "tokenize", "eval_tokenizer", "real_stats"], repo, timeout=2700)
    record_property("ucf101_snakemake_c2_s", round(time.monotonic() - t0, 1))
    assert ran_snakemake(res.stderr + res.stdout) == local
    assert not (repo / "out" / "train_generator").exists()
    if not slurm_installed():
        pytest.skip("Slurm is not installed (CI runs the rest through the Slurm profile); the -c2 part passed")
    cluster = SlurmCluster()
    try:
        cluster.start()
        t0 = time.monotonic()
        res = snakemake(["--profile", "workflow/profiles/slurm-cpu-test"], repo, check=False, timeout=2700,
                        SLURM_CONF=cluster.env["SLURM_CONF"], PATH=f"{cluster.dir / 'bin'}{os.pathsep}{env()['PATH']}")
        record_property("ucf101_slurm_s", round(time.monotonic() - t0, 1))
        assert res.returncode == 0, f"{res.stderr[-6000:]}\n{cluster.logs()}"
    finally:
        cluster.stop()
    assert ran_snakemake(res.stderr + res.stdout) == every - local
    check_smoke_tables(repo, UCF[2], UCF[1])
