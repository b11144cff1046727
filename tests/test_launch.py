"""`python -m nbp.launch` (the launcher of torchrun-launchable stages, nbp/dag.py `launcher`) on 2 gloo processes.

A stage that fails under it ends in the rank's own one-line error and one launcher line naming the stage, entry, rank
and exit code; the launcher exits with the code one process gives for the same input, and nothing prints a traceback
(torchrun itself prints ChildFailedError's). Every rank closes its process group before it exits, on success and on
failure: a hook that every Python process of the run loads (sitecustomize) records at exit whether it still had one.
The upstream of the stages is test_stages_distributed's (tiny clip cache, random tokenizer and generators).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_stages_distributed import build_upstream, overrides

from nbp.launch import exit_code, fit_to_gpus

REPO = Path(__file__).resolve().parents[1]
WORLD = 2

# what each Python process of a run had at exit: its argv, torchrun's RANK, whether a process group was still open
EXIT_HOOK = """
import atexit, json, os, sys

def _nbp_exit_record():
    dist = sys.modules.get("torch.distributed")
    open_group = bool(dist is not None and dist.is_available() and dist.is_initialized())
    with open(os.path.join(os.environ["NBP_EXIT_RECORDS"], f"{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, "rank": os.environ.get("RANK"), "open_group": open_group}, f)

if os.environ.get("NBP_EXIT_RECORDS"):
    atexit.register(_nbp_exit_record)
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """-> (run.out with the stages' inputs, the environment of a run)."""
    root = tmp_path_factory.mktemp("launch")
    out = root / "out"
    build_upstream(out)
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(EXIT_HOOK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NBP_PROGRESS": "0", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(root / "site")])}
    env.pop("NBP_FAULT", None)
    return out, env


def _stage_args(out: Path, stage: str, entry: str, extra: dict | None = None) -> list[str]:
    flags = [a for k, v in {**overrides(out), **(extra or {})}.items() for a in ("-S", f"{k}={json.dumps(v)}")]
    return [stage, entry, "--params", str(REPO / "params.yaml"), *flags]


def _run(cmd: list[str], env: dict, records: Path) -> subprocess.CompletedProcess:
    records.mkdir(parents=True)
    return subprocess.run(cmd, env={**env, "NBP_EXIT_RECORDS": str(records)}, cwd=records.parent, capture_output=True,
                          text=True, timeout=300)


def _launch(args: list[str], env: dict, records: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "nbp.launch", "--ranks-on-cpu", "--standalone", "--nproc_per_node", str(WORLD),
                 "-m", "nbp", *args], env, records)


def _ranks(records: Path) -> dict[int, dict]:
    """rank -> exit record of the stage processes (the launcher has no RANK)."""
    recs = [json.loads(p.read_text()) for p in records.glob("*.json")]
    return {int(r["rank"]): r for r in recs if r["rank"] is not None}


def _break_generator(out: Path, how: str) -> None:
    gen = out / "train_generator" / "embedded_nbp" / "generator.pt"
    if how == "missing":
        gen.unlink()
    else:
        data = gen.read_bytes()
        gen.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize("case, expect", [("unknown params key", 2), ("missing", 1), ("truncated", 1)])
def test_a_failed_stage_ends_in_one_line_with_its_exit_code(upstream, tmp_path, case, expect):
    out, env = upstream
    work = tmp_path / "out"
    build_upstream(work)  # its own copy: the cases break it differently
    extra = {"eval_generator.embedded_nbp.no_such_key": 1} if case == "unknown params key" else None
    if case != "unknown params key":
        _break_generator(work, case)
    args = _stage_args(work, "eval_generator", "embedded_nbp", extra)
    alone = _run([sys.executable, "-m", "nbp", *args], env, tmp_path / "alone")
    assert alone.returncode == expect, alone.stderr[-3000:]  # the one-process code of this input
    (error,) = alone.stderr.strip().splitlines()  # nbp's one line
    assert error.startswith("nbp: error: ") and "Traceback" not in alone.stdout + alone.stderr

    res = _launch(args, env, tmp_path / "two")
    text = res.stdout + res.stderr
    assert res.returncode == expect, text[-4000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-4000:]
    assert error in res.stderr.splitlines(), (error, res.stderr)  # the failed rank's own line, printed by itself
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("nbp: eval_generator")]
    assert len(lines) == 1 and re.fullmatch(
        rf"nbp: eval_generator embedded_nbp failed on rank [01] of 2 \(exit code {expect}\); its error is above",
        lines[0]), res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1] == lines[0]  # the last word: no failure table after it
    ranks = _ranks(tmp_path / "two")
    assert ranks, "no rank exited by itself"
    if case != "unknown params key":  # these fail after joining the process group (which bad params never reach)
        assert sum(f"rank {r} of 2" in res.stdout for r in range(WORLD)) >= 1, res.stdout[-2000:]
    assert all(not r["open_group"] for r in ranks.values()), ranks  # those that exited by themselves closed it


@pytest.mark.slow
def test_a_stage_that_succeeds_exits_0_with_its_process_group_closed(upstream, tmp_path):
    out, env = upstream
    res = _launch(_stage_args(out, "tokenize", "embedded"), env, tmp_path / "two")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    assert all(f"rank {r} of 2" in res.stdout for r in range(WORLD)), res.stdout[-2000:]  # both joined a group
    ranks = _ranks(tmp_path / "two")
    assert sorted(ranks) == [0, 1] and all(not r["open_group"] for r in ranks.values()), ranks
    assert "destroy_process_group" not in text and "Traceback" not in text, text[-4000:]
    meta = json.loads((out / "tokenize" / "embedded" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["clips"] == {"train": 7, "val": 5}  # the run wrote the sharded result


@pytest.mark.slow
def test_gpus_asked_on_a_machine_without_them_run_one_process(upstream, tmp_path):
    """The paper profile's 8-GPU command, run where there is no GPU (snakemake -c2 on a workstation): one rank, not 8
    CPU processes, and one line saying so; the result is the one-process result."""
    out, env = upstream
    res = _run([sys.executable, "-m", "nbp.launch", "--standalone", "--nproc_per_node=8", "-m", "nbp",
                *_stage_args(out, "tokenize", "embedded")], env, tmp_path / "fit")
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-4000:]
    assert "nbp: tokenize embedded: 8 processes per node asked, 0 GPU(s) here: running 1" in res.stderr, res.stderr[-2000:]
    assert sorted(_ranks(tmp_path / "fit")) == [0]  # one stage process
    meta = json.loads((out / "tokenize" / "embedded" / "meta.json").read_text())
    assert meta.get("world_size", 1) == 1 and meta["clips"] == {"train": 7, "val": 5}


def test_fit_to_gpus():
    assert [fit_to_gpus("8", g) for g in (0, 1, 4, 8, 16)] == ["1", "1", "4", "8", "8"]
    assert fit_to_gpus("gpu", 0) == "gpu" and fit_to_gpus("auto", 2) == "auto"  # torchrun's own words untouched


def test_exit_codes_of_a_failed_rank():
    assert [exit_code(c) for c in (1, 2, 3, 130)] == [1, 2, 3, 130]  # nbp's codes pass through
    assert exit_code(-9) == 137 and exit_code(-15) == 143  # killed by a signal: as a shell reports it
    assert exit_code(256) == 1  # not representable as an exit status: still a failure


def test_launcher_errors_are_one_line(tmp_path):
    """A rendezvous that never completes (a second node that never comes) ends in one line, not a traceback."""
    script = tmp_path / "never.py"
    script.write_text("raise SystemExit('never started')\n")
    cmd = [sys.executable, "-m", "nbp.launch", "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", "--rdzv_conf", "join_timeout=2", str(script)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stdout + res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith(f"nbp: {script}: the rendezvous timed out before all 2 node(s) "
                                                           "joined"), res.stderr[-3000:]


@pytest.mark.parametrize("writer, mangled", [("say(sys.argv[1] * 300)", False),
                                             ("print(sys.argv[1] * 300, file=sys.stderr)", True)])
def test_lines_of_ranks_sharing_stderr_never_interleave(tmp_path, writer, mangled):
    """Ranks that fail together write their one line to the same stderr. Under PYTHONUNBUFFERED (CI and clusters set
    it) ``print`` writes the text and the newline apart, and two ranks' lines merge into one (seen in CI: the failed
    rank's line was no longer a line of the launcher's stderr). ``say`` writes each line whole. The ``print`` case
    shows the test can see the defect it guards against: both writers start together (each waits for the other's
    marker file) and write for 0.3 s."""
    code = textwrap.dedent(f"""
        import pathlib, sys, time
        from nbp.errors import say
        pathlib.Path(sys.argv[2], sys.argv[1]).touch()
        while len(list(pathlib.Path(sys.argv[2]).iterdir())) < 2:
            time.sleep(0.001)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            {writer}
        """)
    read, write = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, ch, str(tmp_path)], stderr=write, env=env) for ch in "ab"]
    os.close(write)
    with os.fdopen(read, "rb") as f:
        lines = f.read().decode().splitlines()
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert {"a" * 300, "b" * 300} <= set(lines)
    bad = sum(line not in ("a" * 300, "b" * 300) for line in lines)
    assert (bad > 0) == mangled, (bad, len(lines))
