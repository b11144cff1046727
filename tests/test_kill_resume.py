"""SIGKILL at seeded random moments, rerun, and end where an uninterrupted run ends (issue 13 item 2).

Each training (tokenizer, generator; tiny embedded settings) is run as `nbp <stage>` in a real process and killed
again and again by SIGKILL (``NBP_FAULT``, see :func:`nbp.io.fault`): at a random step, at the first step after a
resume, inside a rolling checkpoint write (the temporary half written), between the write and its rename, and inside
the export of the declared outputs. After each kill the rolling checkpoint loads and no declared output exists; the
last rerun ends with weights, optimizer state, RNG, loop state and history equal, bit for bit, to an uninterrupted
run's. The generator's chain runs with W&B offline: every process continues one run id, no process logs a step twice,
and a step logged again after a resume has the values it had (rows a killed process had not flushed are lost from W&B;
the history CSV, kept in the checkpoint, has them all).
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from nbp.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
ENV = {"NBP_PROGRESS": "0", "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
TIMING = {"seconds", "tokens_per_s", "train_seconds", "code_version", "wandb_run_id"}  # differ between any two runs


def nbp(args: list[str], env: dict) -> int:
    """``python -m nbp *args`` with ``env`` added -> its exit code (-9: SIGKILL)."""
    r = subprocess.run([sys.executable, "-m", "nbp", *args], env={**os.environ, **env}, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    if r.returncode not in (0, -signal.SIGKILL):
        print(r.stdout[-2000:], r.stderr[-3000:])
    return r.returncode


def same_rng(a: list[dict], b: list[dict]) -> None:
    """torch's RNG states are equal; numpy's and Python's global ones are not seeded by the trainings (nothing draws
    from them), so they are whatever the first process started with."""
    same([r["torch"] for r in a], [r["torch"] for r in b], "rng.torch")


def same(a, b, where: str = "") -> None:
    """``a`` and ``b`` are equal, tensors bit for bit (keys in TIMING are not compared)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in TIMING:
                same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def kill_chain(cmd: list[str], env: dict, faults: list[str], state: Path, output: Path, every: int, steps: int) -> list[int]:
    """Run ``nbp *cmd`` once per fault (each must end in SIGKILL), then once to the end -> the rolling checkpoint's step
    after each kill."""
    at = []
    for spec in faults:
        assert nbp(cmd, {**env, "NBP_FAULT": spec}) == -signal.SIGKILL, spec
        assert not output.exists(), spec  # no declared output of a killed run
        step = load_checkpoint(state / "last.pt")["step"] if (state / "last.pt").exists() else 0  # it always loads
        assert step % every == 0 or step == steps, (spec, step)
        assert not at or step >= at[-1], (spec, at, step)  # a kill never loses a checkpoint already written
        at.append(step)
    assert nbp(cmd, env) == 0
    assert not list(state.glob(".*.tmp"))  # the half-written temporaries of the killed writes are gone
    return at


def schedule(rng: random.Random, stage: str, folder: str, steps: int, every: int) -> list[str]:
    """Six kills: random steps, the first steps after a resume, inside and after a checkpoint write, in the export."""
    return [f"step:{stage}@{rng.randint(every + 1, 2 * every + 1)}",  # mid-run, after one or two checkpoints
            f"step:{stage}@1",  # the first step after the resume
            f"write-half:last.pt@{rng.randint(1, 2)}",  # inside a checkpoint write: the temporary half written
            f"step:{stage}@{rng.randint(2, every)}",  # early after the resume, before the next checkpoint
            f"write:last.pt@{rng.randint(1, 2)}",  # the checkpoint written, not yet renamed into place
            f"swap:{folder}"]  # the last checkpoint is written; the export's new folder is complete, not in place


# --------------------------------------------------------------------------------------
# W&B offline files: a record log of 32 KiB blocks (leveldb layout) of wandb_internal Record protobufs


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows (``_step`` and scalars) of one offline run folder, in the order they were written."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, part, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding (or the end of what a killed process got written)
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(part)
            part = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def check_wandb(state: Path, straight: Path, steps: int) -> None:
    runs = sorted(Path(p) for p in glob.glob(str(state / "wandb" / "offline-run-*")))
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(runs) == 7 and len(ids) == 1, runs  # six killed processes and the last one: one run
    assert load_checkpoint(state / "last.pt")["state"]["wandb_run_id"] == ids.pop()
    logged: dict[int, dict] = {}
    for run in runs:
        rows = wandb_history(run)
        seq = [r["_step"] for r in rows]
        assert seq == sorted(set(seq)), (run.name, seq)  # within a process: each step once, increasing
        for r in rows:
            values = {k: v for k, v in r.items() if not k.startswith("_") and "seconds" not in k and "per_s" not in k}
            # a step logged before a kill and again after the resume has the same values (same computation)
            assert logged.setdefault(r["_step"], values) == values, r["_step"]
    # a SIGKILLed process loses the rows its W&B service had not written yet (steps before the kill's checkpoint are
    # not logged again); what is there continues without a gap up to the last step
    assert sorted(logged) == list(range(min(logged), steps + 1)), sorted(logged)
    (one,) = glob.glob(str(straight / "wandb" / "offline-run-*"))
    rows = wandb_history(Path(one))
    assert [r["_step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        if r["_step"] in logged:
            assert logged[r["_step"]] == {k: v for k, v in r.items() if not k.startswith("_") and "seconds" not in k
                                          and "per_s" not in k}, r["_step"]


# --------------------------------------------------------------------------------------


def test_generator_killed_six_times_ends_bit_identical_with_one_wandb_run(tmp_path):
    from test_generator_train import cli_args, make_shards, settings

    steps, every = 16, 3
    kw = {"steps": steps, "checkpoint_every": every, "val_every": 4, "log_every": 1}
    env = {**ENV, "WANDB_MODE": "offline"}
    cmds = {}
    for d in ("straight", "killed"):
        make_shards(tmp_path / d)
        o = settings(tmp_path / d, **kw)
        o["run.wandb.mode"] = "offline"
        cmds[d] = ["train_generator", "embedded_nbp", "--params", str(PARAMS), *cli_args(o)]
    assert nbp(cmds["straight"], env) == 0
    state = {d: tmp_path / d / "checkpoints" / "train_generator" / "embedded_nbp" for d in cmds}
    output = {d: tmp_path / d / "train_generator" / "embedded_nbp" for d in cmds}
    faults = schedule(random.Random(13), "train_generator", "embedded_nbp", steps, every)
    at = kill_chain(cmds["killed"], env, faults, state["killed"], output["killed"], every, steps)
    assert at[-1] == steps  # the export kill came after the final checkpoint: the rerun only exports
    a, b = (load_checkpoint(state[d] / "last.pt") for d in cmds)
    same_rng(a.pop("rng"), b.pop("rng"))
    same(a, b, "last.pt")
    same(*(torch.load(output[d] / "generator.pt", weights_only=True) for d in cmds), "generator.pt")
    ha, hb = (pd.read_csv(output[d] / "history.csv") for d in cmds)
    assert list(hb["step"]) == [4, 8, 12, 16]  # no row twice after six resumes
    pd.testing.assert_frame_equal(ha.drop(columns="tokens_per_s"), hb.drop(columns="tokens_per_s"), check_exact=True)
    check_wandb(state["killed"], state["straight"], steps)


def test_tokenizer_killed_six_times_ends_bit_identical(tmp_path):
    from test_tokenizer_train import _cli, make_clip_cache

    steps, every = 18, 3
    kw = {"steps": steps, "checkpoint_every": every, "disc_start": 5, "image_steps": 2, "image_batch_size": 6}
    for d in ("straight", "killed"):
        make_clip_cache(tmp_path / d / "prepare" / "embedded")
    assert nbp(_cli(tmp_path / "straight", **kw)[3:], ENV) == 0  # [3:]: without `python -m nbp`
    state = {d: tmp_path / d / "checkpoints" / "train_tokenizer" / "embedded" for d in ("straight", "killed")}
    output = {d: tmp_path / d / "train_tokenizer" / "embedded" for d in ("straight", "killed")}
    faults = schedule(random.Random(7), "train_tokenizer", "embedded", steps, every)
    at = kill_chain(_cli(tmp_path / "killed", **kw)[3:], ENV, faults, state["killed"], output["killed"], every, steps)
    assert at[-1] == steps
    a, b = (load_checkpoint(state[d] / "last.pt") for d in output)
    same_rng(a.pop("rng"), b.pop("rng"))
    same(a, b, "last.pt")
    same(*(torch.load(output[d] / "tokenizer.pt", weights_only=True) for d in output), "tokenizer.pt")
    ha, hb = (pd.read_csv(output[d] / "history.csv") for d in output)
    assert hb["step"].is_unique and hb["step"].iloc[-1] == steps
    cols = [c for c in ha.columns if c != "seconds"]
    pd.testing.assert_frame_equal(ha[cols], hb[cols], check_exact=True)
