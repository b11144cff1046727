"""Multi-node training for real: a two-node Slurm on localhost (slurmd n1 and n2) runs `train_generator` through
`snakemake --profile workflow/profiles/slurm-cpu-multinode`, whose resources make the job's command the README's
multi-node launcher (srun -> one torchrun per node, c10d rendezvous, gloo on CPU). The weights equal a one-process
run with the same global batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

import pytest
import torch
from pipeline_helpers import copy_repo, env, model_weights, run, set_params, snakemake
from slurm_cluster import running_cluster
from test_generator_train import make_shards

from nbp.generator.model import GPT, GPTConfig

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

ENTRY = "embedded_nbp"
# a few dozen steps of the tiny preset; dropout off (its noise is drawn per rank, so it cannot match one process)
TRAIN = {"steps": 24, "batch_size": 8, "grad_accum": 1, "dropout": 0.0, "cond_dropout": 0.0, "val_every": 12,
         "val_clips": 2, "log_every": 6, "checkpoint_every": 100}
# Adam divides by sqrt(v): float-rounding differences of near-zero gradients (gloo's all-reduce sums in another
# order than one process's batch) come out as weight differences well above the rounding itself
ATOL = RTOL = 1e-4
# the README's multi-node launcher for 2 nodes x 1 process
LAUNCH = ("srun --nodes=2 --ntasks-per-node=1 python -m nbp.launch --nnodes=2 --nproc_per_node=1 --rdzv_id=$SLURM_JOB_ID "
          "--rdzv_backend=c10d --rdzv_endpoint=$(hostname):$((29500 + SLURM_JOB_ID % 1000)) -m nbp")


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(nodes=2)


def test_two_node_cluster_runs_one_task_per_node(cluster):
    res = cluster.run(["srun", "-N2", "--ntasks-per-node=1", "-t", "1", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_PROCID"],
                      timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split("\n")[:2]) == ["n1 0", "n2 1"], res.stdout


def _repo(tmp_path):
    """A committed copy of the repository whose run selects one generator, and that entry's token shards (written
    directly in the tokenize format, as tests/test_generator_train.py does: no tokenizer needed)."""
    repo = copy_repo(tmp_path / "repo")
    set_params(repo / "params.yaml", {"run.generators": [ENTRY], "run.wandb.mode": "disabled",
                                      **{f"train_generator.{ENTRY}.{k}": v for k, v in TRAIN.items()}})
    run(["git", "commit", "-qam", "multi-node test params"], repo)
    make_shards(repo / "out")
    return repo


def _one_process_reference(repo, tmp_path):
    """`nbp train_generator` as one process on a copy of the same token shards."""
    ref = tmp_path / "ref"
    shutil.copytree(repo / "out" / "tokenize", ref / "tokenize")
    run([sys.executable, "-m", "nbp", "train_generator", ENTRY, "-S", f"run.out={json.dumps(str(ref))}"], repo,
        timeout=600, OMP_NUM_THREADS="1")
    return model_weights(ref / "train_generator" / ENTRY / "generator.pt")


def _job_nodes(cluster, output: str) -> tuple[str, tuple[str, str]]:
    """The train_generator job's id and (NumNodes, NodeList), from the controller (MinJobAge keeps finished jobs)."""
    (jobid,) = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", output)
    show = cluster.run(["scontrol", "show", "job", jobid], timeout=30).stdout
    return jobid, (re.search(r"NumNodes=(\d+)", show).group(1), re.search(r" NodeList=(\S+)", show).group(1))


def test_train_generator_on_two_nodes_equals_one_process(cluster, tmp_path, record_property):
    repo = _repo(tmp_path)
    t0 = time.monotonic()
    # only this stage, on the shards already there (the way to rerun one stage of a DAG whose inputs exist)
    target = f"out/train_generator/{ENTRY}/generator.pt"
    res = snakemake(["--profile", "workflow/profiles/slurm-cpu-multinode", target, "--allowed-rules", "train_generator"], repo,
                    check=False,
                    timeout=600, SLURM_CONF=cluster.env["SLURM_CONF"], OMP_NUM_THREADS="1",
                    PATH=f"{cluster.dir / 'bin'}{os.pathsep}{env()['PATH']}")
    record_property("two_node_run_s", round(time.monotonic() - t0, 1))
    output = res.stdout + res.stderr
    log = repo / "logs" / "train_generator" / f"{ENTRY}.log"
    assert res.returncode == 0, f"{output[-6000:]}\n{log.read_text()[-4000:] if log.exists() else ''}\n{cluster.logs()}"
    # the job ran the README's multi-node launcher (the job's own Slurm log), as one job on both nodes
    jobid, nodes = _job_nodes(cluster, output)
    job_log = (repo / ".snakemake" / "slurm_logs" / "rule_train_generator" / ENTRY / f"{jobid}.log").read_text()
    assert f"\nShell command: {LAUNCH} train_generator {ENTRY} > logs/" in job_log, job_log[-4000:]
    assert nodes == ("2", "n[1-2]")
    # two ranks, one on each node, joined one process group (c10d hands out the ranks in arrival order)
    ranks = dict(re.findall(r"^rank (\d) of 2 \(local rank 0\) on node (\S+)$", log.read_text(), re.M))
    assert sorted(ranks) == ["0", "1"] and sorted(ranks.values()) == ["n1", "n2"], log.read_text()[-3000:]
    out = repo / "out" / "train_generator" / ENTRY
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == TRAIN["steps"]
    two = model_weights(out / "generator.pt")
    one = _one_process_reference(repo, tmp_path)
    assert two.keys() == one.keys()
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    init = _initial_weights(out / "generator.pt")
    moved = max((one[k] - v).abs().max().item() for k, v in init.items())
    record_property("max_abs_diff", diff)
    record_property("max_abs_change_from_init", moved)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: f"{k}: {m}")
    assert moved > 20 * ATOL, moved  # the steps moved the weights far beyond the tolerance


def _initial_weights(generator_pt) -> dict:
    """The weights before step 1 (the trainer's initialisation: seed 0 on rank 0; pos_emb is overwritten by the grid code)."""
    torch.manual_seed(0)
    init = GPT(GPTConfig(**torch.load(generator_pt, weights_only=True)["config"])).state_dict()
    return {k: v for k, v in init.items() if k != "pos_emb"}
