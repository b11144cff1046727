"""A stage killed midway leaves no half-written declared output (issue 13 item 3).

Every stage writes its folder through :func:`nbp.io.atomic_dir` (prepare's clip cache, tokenize's shards, real_stats,
both evaluations, the trainings' exports) or single files through :func:`nbp.io.atomic_path`; ``tables`` writes its
files one by one and removes its receipt first. Each writer is killed (SIGKILL, ``NBP_FAULT``) at each of its points,
in a real process: the declared output is then the previous complete one or absent, never a mix, and the rerun
completes it. For ``prepare``, the verdicts of DVC (`dvc status`) and Snakemake (`-n --rerun-incomplete`) on a real
tiny repository are checked too, and Snakemake's for ``tokenize``, ``train_generator`` and ``eval_generator``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WRITE_FOLDER = """
import sys
from nbp.io import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    for name in ("a.json", "b.json", "c.json"):
        (tmp / name).write_text(sys.argv[2])
"""


def _python(code: str, *args: str, fault: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "NBP_FAULT"} | ({"NBP_FAULT": fault} if fault else {})
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=REPO, capture_output=True).returncode


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.mark.parametrize("point, expect", [("swap", "old"), ("swapped-out", "absent")])
def test_a_folder_output_killed_while_replaced_is_the_old_one_or_absent(tmp_path, point, expect):
    out = tmp_path / "out" / "stage"
    assert _python(WRITE_FOLDER, str(out), "old") == 0
    assert _python(WRITE_FOLDER, str(out), "new", fault=f"{point}:stage") == -signal.SIGKILL
    assert _contents(out) == ({n: "old" for n in ("a.json", "b.json", "c.json")} if expect == "old" else {})
    assert _python(WRITE_FOLDER, str(out), "new") == 0  # the rerun completes it and clears what the kill left
    assert _contents(out) == {n: "new" for n in ("a.json", "b.json", "c.json")}
    assert sorted(p.name for p in out.parent.iterdir() if p.name.endswith(".old")) == []


@pytest.mark.parametrize("point", ["write", "write-half"])
def test_a_file_output_killed_while_written_keeps_the_previous_file(tmp_path, point):
    code = "import sys\nfrom nbp.io import write_json\nwrite_json(sys.argv[1], {'v': sys.argv[2] * 1000})\n"
    path = tmp_path / "metrics.json"
    assert _python(code, str(path), "old") == 0
    assert _python(code, str(path), "new", fault=f"{point}:metrics.json") == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"v": "old" * 1000}  # the previous file, whole
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".metrics.json.")]
    assert len(left) == 1  # the killed write's temporary: beside the declared path, never at it
    if point == "write-half":
        assert 0 < left[0].stat().st_size < len(json.dumps({"v": "new" * 1000}))


def test_tables_killed_between_two_tables_leaves_no_receipt(tmp_path):
    """tables writes main.md, main.csv, ... one by one: killed after the first, the old receipt was left in place,
    and Snakemake (which judges by the receipt's time, inputs unchanged) took the mixed tables as done."""
    from test_tables import _metrics

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    out, results = tmp_path / "out", tmp_path / "results"
    _metrics(out / "eval_tokenizer/embedded", {"rfvd": 55.5, "psnr": 24.1, "ssim": 0.81, "lpips": None,
                                               "codebook_usage": 0.5, "num_videos": 64, "device": "cpu"})
    cmd = [sys.executable, "-m", "nbp", "tables", "--params", str(params), "-S", f"run.out={out}", "-S",
           f"tables.out={results}"]
    env = {**os.environ, "NBP_PROGRESS": "0"}
    env.pop("NBP_FAULT", None)
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True)
    receipt = out / "tables" / "receipt.json"
    assert receipt.is_file()
    _metrics(out / "eval_tokenizer/embedded", {"rfvd": 44.4, "psnr": 25.2, "ssim": 0.82, "lpips": None,
                                               "codebook_usage": 0.5, "num_videos": 64, "device": "cpu"})
    r = subprocess.run(cmd, env={**env, "NBP_FAULT": "write:main.md"}, cwd=tmp_path, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert "25.2" in (results / "tokenizer.md").read_text()  # the new tokenizer table was written before the kill
    assert not receipt.exists()  # so the stage is not done for DVC (missing output) nor for Snakemake
    subprocess.run(cmd, env=env, cwd=tmp_path, check=True, capture_output=True)
    assert receipt.is_file() and "25.2" in (results / "tokenizer.md").read_text()


# --------------------------------------------------------------------------------------
# the verdicts of DVC and Snakemake on a real tiny repository (prepare: a folder output written by atomic_dir)


@pytest.mark.slow
def test_prepare_killed_midway_is_not_done_for_dvc_nor_snakemake(tmp_path):
    from pipeline_helpers import dvc, ran_dvc, ran_snakemake, run, set_params, snakemake, tiny_repo

    repo = tiny_repo(tmp_path / "repo")
    dvc(["repro", "prepare@embedded"], repo)
    cache = repo / "out" / "prepare" / "embedded"
    old = (cache / "train" / "clips.npy").read_bytes()
    set_params(repo / "params.yaml", {"prepare.embedded.train_clips_per_video": 2})  # prepare must run again
    r = run(["nbp", "prepare", "embedded"], repo, check=False, NBP_FAULT="swapped-out:prepare/embedded")
    assert r.returncode == -signal.SIGKILL and not cache.exists()  # killed between moving the old out and the new in
    assert "prepare@embedded" in dvc(["status", "prepare@embedded"], repo).stdout  # not done: DVC lists it
    res = dvc(["repro", "prepare@embedded"], repo)
    assert ran_dvc(res.stdout) == {"prepare@embedded"} and (cache / "train" / "clips.npy").read_bytes() != old
    assert "up to date" in dvc(["status", "prepare@embedded"], repo).stdout

    shutil.rmtree(repo / "out")  # Snakemake on its own, from scratch: the prepare job is killed while it swaps in
    r = snakemake(["-c1", str(cache.relative_to(repo))], repo, check=False, NBP_FAULT="swap:prepare/embedded")
    assert r.returncode != 0 and not cache.exists(), r.stdout[-2000:] + r.stderr[-2000:]
    plan = snakemake(["-n", "--rerun-incomplete", str(cache.relative_to(repo))], repo)
    assert ran_snakemake(plan.stdout) == {"prepare@embedded"}, plan.stdout[-2000:]  # download is done, prepare not
    snakemake(["-c1", "--rerun-incomplete", str(cache.relative_to(repo))], repo)
    assert (cache / "train" / "clips.npy").is_file()
    assert ran_snakemake(snakemake(["-n", str(cache.relative_to(repo))], repo).stdout) == set()


# the stages after prepare, each killed in its own output's writer: (stage@entry, target, NBP_FAULT)
LATER_KILLS = [
    ("tokenize@embedded", "out/tokenize/embedded", "swap:tokenize/embedded"),  # the shards complete, not yet in place
    ("train_generator@embedded_nbp", "out/train_generator/embedded_nbp/generator.pt", "write-half:generator.pt"),
    ("eval_generator@embedded_nbp", "out/eval_generator/embedded_nbp/metrics.json", "write-half:metrics.json"),
]


@pytest.mark.slow
def test_tokenize_training_and_evaluation_killed_are_rerun_by_snakemake(tmp_path):
    """tokenize (its shards), train_generator (generator.pt) and eval_generator (its metrics), each SIGKILLed while
    writing its output under `snakemake -c1`: the plan with --rerun-incomplete is exactly that stage, no declared
    output of it exists (the kill's temporary lies beside its folder), and after the rerun the plan is empty. One
    tiny repository for the three: each case's upstream is the previous case's rerun."""
    from pipeline_helpers import parse_dry_run, ran_snakemake, snakemake, tiny_repo

    repo = tiny_repo(tmp_path / "repo")
    for job, target, fault in LATER_KILLS:
        stage, entry = job.split("@")
        folder = repo / "out" / stage / entry
        # --keep-incomplete: Snakemake leaves a failed job's outputs as they are (as when Snakemake itself is killed),
        # so what lies at the declared paths below is what the stage's own writers left
        r = snakemake(["-c1", "--keep-incomplete", target], repo, check=False, NBP_FAULT=fault)
        log = repo / "logs" / stage / f"{entry}.log"
        assert r.returncode != 0, f"{job} was not killed:\n{r.stderr[-2000:]}"
        left = sorted(p.name for p in folder.parent.glob(f".{entry}.*.tmp"))
        assert left, f"{job}: no temporary of its writer, so the kill did not hit the write:\n{log.read_text()[-2000:]}"
        plan = snakemake(["-n", "--rerun-incomplete", target], repo)
        jobs = [j for j in parse_dry_run(plan.stdout) if j["rule"] != "all"]
        assert ran_snakemake(plan.stdout) == {job}, plan.stdout[-2000:]  # its upstream is done, it is not
        (declared,) = [j["output"] for j in jobs]
        assert declared and not [o for o in declared if (repo / o).exists()], declared  # nothing half-written there
        snakemake(["-c1", "--rerun-incomplete", target], repo)
        assert all((repo / o).exists() for o in declared), declared
        assert sorted(p.name for p in folder.parent.glob(f".{entry}.*")) == []  # the rerun cleared the kill's leftovers
        assert ran_snakemake(snakemake(["-n", target], repo).stdout) == set()
