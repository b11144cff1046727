"""The Slurm path for real: a one-node Slurm on localhost runs the tiny DAG through `snakemake --profile`
(workflow/profiles/slurm-cpu-test: the Slurm executor with CPU-only resources)."""

from __future__ import annotations

import os
import re
import time

import pytest
from pipeline_helpers import ALL_STAGES, check_results, env, ran_snakemake, snakemake, tiny_repo
from slurm_cluster import running_cluster

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster()


def test_cluster_is_real_and_has_no_gpu(cluster):
    res = cluster.run(["srun", "-t", "1", "hostname"], timeout=60)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    res = cluster.run(["sbatch", "--gpus=1", "--wrap", "true"], timeout=60)  # what the GPU profile would ask for
    assert res.returncode != 0 and "gres" in res.stderr.lower()


def test_tiny_dag_through_the_slurm_profile(cluster, tmp_path, record_property):
    repo = tiny_repo(tmp_path)
    t0 = time.monotonic()
    res = snakemake(["--profile", "workflow/profiles/slurm-cpu-test"], repo, check=False, timeout=900,
                    SLURM_CONF=cluster.env["SLURM_CONF"], PATH=f"{cluster.dir / 'bin'}{os.pathsep}{env()['PATH']}")
    record_property("slurm_run_s", round(time.monotonic() - t0, 1))
    assert res.returncode == 0, f"{res.stderr[-6000:]}\n{cluster.logs()}"
    assert ran_snakemake(res.stderr + res.stdout) == ALL_STAGES
    check_results(repo)
    # every non-local job went through sbatch (the test profile keeps the executor's per-job Slurm logs)
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", res.stdout + res.stderr)
    assert len(submitted) == len(ALL_STAGES) - 4, res.stderr[-3000:]  # the 4 localrules run on the host
    logs = (repo / ".snakemake" / "slurm_logs").rglob("*.log")  # .../rule_<rule>/<entry>/<jobid>.log
    slurm_logs = {part for p in logs for part in p.parts if part.startswith("rule_")}
    want = {f"rule_{r}" for r in ("prepare", "real_stats", "train_tokenizer", "eval_tokenizer", "tokenize", "train_generator",
                                   "eval_generator")}
    assert want <= slurm_logs, slurm_logs
    assert not {"rule_download", "rule_fetch_detector", "rule_fetch_lpips", "rule_tables"} & slurm_logs  # localrules
