"""Faults of the machine (issue 13 item 4): a full disk, a read-only folder and Slurm's SIGTERM lose nothing.

Full and read-only filesystems are real: a small tmpfs mounted over a folder of the test (we run as root in CI).
Each case asserts one line naming the file, the previous outputs intact and no temporary left beside them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nbp.checkpoint import load_checkpoint, save_checkpoint
from nbp.errors import NbpError
from nbp.generator.data import write_split
from nbp.io import atomic_dir, write_json

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def _mount(args: list[str]) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"mount {' '.join(args)} failed under CI=true: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "1m"):
    """A real filesystem of ``size`` mounted at ``folder`` (created) for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)])
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path, leave: int = 0) -> None:
    """Fill the filesystem of ``folder`` up to ``leave`` free bytes."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave))


def read_only(folder: Path) -> None:
    _mount(["-o", "remount,ro", str(folder)])


def leftovers(folder: Path) -> list[str]:
    """Temporaries of the atomic writers (``.<name>.*.tmp``, ``.<name>.old``) under ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old")))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


CKPT = {"format": "nbp-generator", "version": 1, "model": {"w": torch.arange(6.0)}, "step": 4}
BIG = {**CKPT, "model": {"w": torch.randn(200_000)}, "step": 8}  # 800 kB: does not fit in what is left


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """Failed before the fix with `RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...`."""
    with tmpfs(tmp_path / "fs", "1m") as fs:
        save_checkpoint(fs / "last.pt", CKPT)
        fill(fs, leave=64 << 10)
        with pytest.raises(NbpError) as e:
            save_checkpoint(fs / "last.pt", BIG)
        assert one_line(e) == f"{fs / 'last.pt'}: cannot write (No space left on device); the previous last.pt is intact"
        assert load_checkpoint(fs / "last.pt")["step"] == 4 and torch.equal(load_checkpoint(fs / "last.pt")["model"]["w"],
                                                                           CKPT["model"]["w"])
        assert leftovers(fs) == []
        with pytest.raises(NbpError, match=r"new.pt: cannot write \(No space left on device\); no new.pt was written"):
            save_checkpoint(fs / "new.pt", BIG)
        assert not (fs / "new.pt").exists() and leftovers(fs) == []


def test_metrics_and_token_shards_on_a_full_disk_keep_the_previous_outputs(tmp_path):
    codes = np.arange(2 * 5 * 4 * 4, dtype=np.int16).reshape(2, 5, 4, 4)
    import pandas as pd

    manifest = pd.DataFrame({"clip": [0, 1], "video": ["a", "b"], "label": [0, 1], "class_text": ["x", "y"]})
    with tmpfs(tmp_path / "fs", "1m") as fs:
        write_json(fs / "metrics.json", {"psnr": 24.0})
        with atomic_dir(fs / "tokens") as tmp:
            write_split(tmp / "train", codes, manifest)
        before = (fs / "tokens" / "train" / "tokens.npy").read_bytes()
        fill(fs, leave=16 << 10)
        with pytest.raises(NbpError) as e:
            write_json(fs / "metrics.json", {"psnr": 25.0, "pad": "x" * (64 << 10)})
        assert one_line(e).startswith(f"{fs / 'metrics.json'}: cannot write (No space left on device); the previous")
        assert json.loads((fs / "metrics.json").read_text()) == {"psnr": 24.0}
        with pytest.raises(NbpError) as e:
            with atomic_dir(fs / "tokens") as tmp:
                write_split(tmp / "train", np.zeros((400, 5, 4, 4), np.int16), manifest.iloc[[0] * 400])
        assert one_line(e).startswith(f"{fs / 'tokens'}: cannot write (short write, ")  # numpy's OSError has no errno
        assert str(e.value).endswith("is the disk full?); the previous tokens is intact")
        assert (fs / "tokens" / "train" / "tokens.npy").read_bytes() == before
        with pytest.raises(NbpError) as e:  # a file of a folder output (metrics.json of an evaluation): the folder
            with atomic_dir(fs / "tokens") as tmp:
                write_json(tmp / "meta.json", {"pad": "x" * (64 << 10)})
        assert one_line(e) == (f"{fs / 'tokens'}: cannot write (meta.json: No space left on device); the previous tokens "
                               "is intact")
        assert (fs / "tokens" / "train" / "tokens.npy").read_bytes() == before
        assert sorted(p.name for p in fs.iterdir()) == ["filler", "metrics.json", "tokens"]  # no temporary left


def test_clip_cache_on_a_full_disk_is_one_line_not_a_sigbus(tmp_path, monkeypatch):
    """prepare fills clips.npy through a memory map: on a full tmpfs that was a SIGBUS (the process dies, no message);
    the blocks are now reserved first, so it is one line and the previous clip cache stays."""
    from nbp.config import load_config
    from nbp.data.download import run_download
    from nbp.data.prepare import run_prepare

    monkeypatch.setenv("NBP_PROGRESS", "0")
    spec = {"classes": 2, "train_per_class": 2, "test_per_class": 1, "size": 32, "frames": 12, "fps": 8, "seed": 0}

    def cfg(seed: int):
        return load_config(PARAMS, {"run.out": str(tmp_path / "out"), "run.seed": seed, "download.embedded.embedded": spec,
                                    "prepare.embedded.frames": 5, "prepare.embedded.resolution": 16,
                                    "prepare.embedded.workers": 1, "train_generator.embedded_nbp.block": [1, 1, 1]})

    run_download(cfg(0), "embedded")
    with tmpfs(tmp_path / "out" / "prepare", "2m") as fs:
        run_prepare(cfg(0), "embedded")
        cache = fs / "embedded" / "train" / "clips.npy"
        before = cache.read_bytes()
        fill(fs, leave=len(before) // 2)  # the manifests fit, the clips do not
        with pytest.raises(NbpError) as e:  # in this process: a SIGBUS would end the test run, which fails it too
            run_prepare(cfg(1), "embedded")
        msg = one_line(e)
        assert "No space left on device" in msg and str(fs / "embedded") in msg, msg
        assert cache.read_bytes() == before and leftovers(fs) == []


def test_read_only_folder_is_one_line_and_keeps_the_outputs(tmp_path):
    """Root ignores file modes, so the folder is a read-only mount (as a full quota or a read-only share would be)."""
    with tmpfs(tmp_path / "fs", "1m") as fs:
        save_checkpoint(fs / "last.pt", CKPT)
        write_json(fs / "metrics.json", {"psnr": 24.0})
        read_only(fs)
        with pytest.raises(NbpError) as e:
            save_checkpoint(fs / "last.pt", BIG)
        assert one_line(e) == f"{fs / 'last.pt'}: cannot write (Read-only file system); the previous last.pt is intact"
        with pytest.raises(NbpError, match=r"metrics.json: cannot write \(Read-only file system\); the previous"):
            write_json(fs / "metrics.json", {"psnr": 25.0})
        with pytest.raises(NbpError, match=r"/fs/shards: cannot write \(Read-only file system\); no shards was written"):
            with atomic_dir(fs / "shards") as tmp:
                (tmp / "x").write_text("x")
        assert load_checkpoint(fs / "last.pt")["step"] == 4 and json.loads((fs / "metrics.json").read_text())["psnr"] == 24


# --------------------------------------------------------------------------------------
# a training stage on a full disk, and SIGTERM as Slurm sends it, through the real command line


def _generator(out: Path, **kw) -> list[str]:
    from test_generator_train import cli_args, make_shards, settings

    if not (out / "tokenize").exists():
        make_shards(out)
    return [sys.executable, "-m", "nbp", "train_generator", "embedded_nbp", "--params", str(PARAMS),
            *cli_args(settings(out, **kw))]


ENV = {**os.environ, "NBP_PROGRESS": "0", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _state(out: Path) -> Path:
    return out / "checkpoints" / "train_generator" / "embedded_nbp"


def test_training_on_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    kw = {"steps": 8, "checkpoint_every": 2, "val_every": 2}
    cmd = _generator(out, **kw)
    env = {**ENV, "NBP_FAULT": "step:train_generator@3"}  # a kill after step 3: the rolling checkpoint is at step 2
    assert subprocess.run(cmd, env=env, cwd=REPO, capture_output=True).returncode == -signal.SIGKILL
    saved = _state(out).rename(tmp_path / "saved")
    with tmpfs(_state(out), "32m") as fs:
        for f in saved.iterdir():
            (fs / f.name).write_bytes(f.read_bytes())
        before = (fs / "last.pt").read_bytes()
        fill(fs, leave=(len(before) // 2) & ~4095)
        r = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 1, r.stderr[-2000:]
        err = r.stderr.strip()
        assert err == f"nbp: error: {fs / 'last.pt'}: cannot write (No space left on device); the previous last.pt is intact"
        assert (fs / "last.pt").read_bytes() == before and load_checkpoint(fs / "last.pt")["step"] == 2
        assert leftovers(fs) == [] and not (out / "train_generator" / "embedded_nbp").exists()


def test_sigterm_at_the_time_limit_checkpoints_exits_non_zero_and_the_retry_ends_bit_identical(tmp_path):
    """A real SIGTERM to a real `nbp train_generator` process (as Slurm sends at the time limit): a rolling checkpoint,
    exit 1 with one line (so Snakemake's `retries` reruns it), and the rerun ends with the uninterrupted weights."""
    kw = {"steps": 12, "checkpoint_every": 4, "val_every": 3}
    subprocess.run(_generator(tmp_path / "straight", **kw), env=ENV, cwd=REPO, check=True, capture_output=True)
    cut = tmp_path / "cut"
    cmd = _generator(cut, **kw)
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (_state(cut) / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the first checkpoint (step 4) exists: training is under way
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    ckpt = load_checkpoint(_state(cut) / "last.pt")
    if ckpt["step"] == 12:
        pytest.fail("the run finished before the SIGTERM arrived: a longer run is needed")
    assert proc.returncode == 1
    assert err.strip() == (f"nbp: error: train_generator embedded_nbp: SIGTERM at step {ckpt['step']}; rolling checkpoint "
                           f"written to {_state(cut)}; rerun the stage to resume"), err
    assert not (cut / "train_generator" / "embedded_nbp").exists()
    r = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and f"resumed at step {ckpt['step']}" in r.stdout, r.stdout + r.stderr
    a, b = (torch.load(d / "train_generator" / "embedded_nbp" / "generator.pt", weights_only=True) for d in
            (tmp_path / "straight", cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    la, lb = (load_checkpoint(_state(d) / "last.pt") for d in (tmp_path / "straight", cut))
    assert la["optimizer"]["state"].keys() == lb["optimizer"]["state"].keys()
    for k, s in la["optimizer"]["state"].items():
        assert all(torch.equal(s[n], lb["optimizer"]["state"][k][n]) for n in s)
