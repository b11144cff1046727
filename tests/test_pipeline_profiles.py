"""The Slurm GPU profile asks for the intended resources and launchers for the paper experiments (dry run)."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
from pipeline_helpers import ROOT, snakemake_dag, strip_log

from nbp.config import load_config
from nbp.suites import select

PROFILE = ["--profile", "workflow/profiles/slurm"]


@pytest.fixture(scope="module")
def paper_params(tmp_path_factory):
    p = tmp_path_factory.mktemp("paper") / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    select(p, "paper")
    return p


@pytest.fixture(scope="module")
def paper_jobs(paper_params):
    return snakemake_dag([*PROFILE, "--configfile", str(paper_params)])


def _res(job):
    return {k: int(job["resources"][k]) for k in ("gpu", "mem_mb", "runtime", "cpus_per_task")}


def test_training_gets_eight_gpus_under_torchrun(paper_jobs):
    for name, gpu_mem_time in {
        "train_generator@ucf_base_nbp16": (8, 256000, 4320),
        "train_generator@k600_base_ntp": (8, 256000, 4320),
        "train_generator@k600_base_nbp256": (8, 256000, 4320),
        "train_generator@k600_xl_nbp16": (8, 256000, 6480),  # 1.2B: 1.5x the time
        "train_generator@ucf_3b_nbp16": (8, 486400, 10800),  # 3B: 2.5x the time, 1.9x the host memory (ZeRO)
        "train_tokenizer@k600": (8, 256000, 4320),
    }.items():
        job = paper_jobs[name]
        gpu, mem, runtime = gpu_mem_time
        assert _res(job) == {"gpu": gpu, "mem_mb": mem, "runtime": runtime, "cpus_per_task": 32}, name
        stage, entry = name.split("@")
        assert strip_log(job["shell"]) == f"python -m nbp.launch --standalone --nproc_per_node=8 -m nbp {stage} {entry}"


def test_3b_presets_train_with_deepspeed(paper_params, paper_jobs):
    cfg = load_config(paper_params)
    big = [n for n in cfg.run.generators if cfg.train_generator[n].preset == "3b"]
    assert sorted(big) == ["k600_3b_nbp16", "k600_3b_ntp", "ucf_3b_nbp16"]
    for n in big:
        assert cfg.train_generator[n].strategy.startswith("deepspeed_zero"), n
        assert "python -m nbp.launch --standalone --nproc_per_node=8" in paper_jobs[f"train_generator@{n}"]["shell"]
    assert all(cfg.train_generator[n].strategy == "ddp" for n in cfg.run.generators if n not in big)


def test_evaluation_and_data_stages(paper_jobs):
    for name, gpu in {"eval_generator@k600_base_nbp16": 8, "eval_generator@ucf_3b_nbp16": 8, "tokenize@k600": 8,
                      "eval_tokenizer@ucf101": 4, "real_stats@k600": 4}.items():
        job = paper_jobs[name]
        assert _res(job)["gpu"] == gpu, name
        stage, entry = name.split("@")  # sharded over the job's GPUs
        assert strip_log(job["shell"]) == f"python -m nbp.launch --standalone --nproc_per_node={gpu} -m nbp {stage} {entry}", name
    assert _res(paper_jobs["eval_generator@k600_base_nbp16"]) == {"gpu": 8, "mem_mb": 128000, "runtime": 1440,
                                                                  "cpus_per_task": 32}
    assert _res(paper_jobs["prepare@k600"]) == {"gpu": 0, "mem_mb": 64000, "runtime": 1440, "cpus_per_task": 16}
    # downloads and tables run on the submitting host
    for name in ("download@ucf101", "fetch_detector", "tables"):
        assert paper_jobs[name]["rule"] in ("download", "fetch_detector", "tables")
    text = (ROOT / "workflow/rules/common.smk").read_text()
    assert "localrules:" in text and "download," in text and "fetch_detector," in text


def test_sbatch_command_for_a_training_job(paper_jobs):
    """What the Slurm executor plugin submits for the dry run's resources."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = paper_jobs["train_generator@k600_base_nbp16"]
    res = {k: int(v) if v.isdigit() else v for k, v in job["resources"].items()}
    fake = SimpleNamespace(resources=SimpleNamespace(get=res.get, **res), threads=32, name="train_generator")
    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "", "partition": "", "workdir": "/w"}
    cmd = get_submit_command(fake, params) + set_gres_string(fake)  # as the plugin's run_job builds it
    for flag in ("--gpus=8", "--mem 256000", "-t 4320", "--cpus-per-task=32"):
        assert flag in cmd, cmd


def test_multi_node_override(paper_params):
    jobs = snakemake_dag([*PROFILE, "--configfile", str(paper_params), "--set-resources",
                          "train_generator:nodes=2", "train_generator:gpus_per_node=8", "train_generator:gpu=0"])
    shell = strip_log(jobs["train_generator@k600_base_nbp16"]["shell"])
    assert shell.startswith("srun --nodes=2 --ntasks-per-node=1 python -m nbp.launch --nnodes=2 --nproc_per_node=8 "
                            "--rdzv_id=$SLURM_JOB_ID ")
    assert shell.endswith("-m nbp train_generator k600_base_nbp16")


def test_embedded_experiment_asks_for_small_cpu_jobs():
    jobs = snakemake_dag(PROFILE)
    for name, job in jobs.items():
        assert int(job["resources"]["gpu"]) == 0 and int(job["resources"]["mem_mb"]) <= 8000, name
        assert strip_log(job["shell"]).startswith("nbp "), name


def test_released_suite_imports_without_gpus(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    select(p, "released")
    jobs = snakemake_dag([*PROFILE, "--configfile", str(p)])
    for name in ("train_tokenizer@released_ucf", "train_generator@released_k600_nbp16"):
        assert _res(jobs[name]) == {"gpu": 0, "mem_mb": 32000, "runtime": 120, "cpus_per_task": 4}, name
        assert strip_log(jobs[name]["shell"]).startswith("nbp "), name
    assert _res(jobs["eval_generator@released_k600_nbp16"])["gpu"] == 8
    shell = strip_log(jobs["eval_generator@released_k600_nbp16"]["shell"])
    assert shell.startswith("python -m nbp.launch --standalone --nproc_per_node=8 ")
