"""W&B tracking, offline (no account, no network): scalars and reconstruction videos land in the run folder."""

import glob
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from nbp.data.video_io import write_video
from nbp.tracking import Tracker, progress


def history_rows(run_files_dir: str, wait: float = 20.0) -> list[dict]:
    """The history rows of an offline run (waiting up to ``wait`` s for W&B's writer to flush them)."""
    deadline = time.time() + wait
    while not (rows := _history_rows(run_files_dir)) and time.time() < deadline:
        time.sleep(0.2)
    return rows


def _history_rows(run_files_dir: str) -> list[dict]:
    """The history rows of an offline run, read back from its ``run-<id>.wandb`` transaction log.

    The log is W&B's record stream (a LevelDB-style log: a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks with a
    7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of ``wandb_internal_pb2.Record`` protobufs.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = glob.glob(os.path.join(os.path.dirname(run_files_dir), "run-*.wandb"))
    data, block = Path(log).read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        r = pb.Record()
        r.ParseFromString(raw)
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.mark.timeout(180)
def test_offline_run_logs_scalars_and_a_video_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    t = Tracker(project="nbp-test", name="unit", config={"a": 1}, mode="offline", dir=str(tmp_path / "wb"))
    assert t.run is not None and t.run_id
    clip = np.zeros((5, 3, 16, 16), dtype=np.uint8)  # [T, C, H, W]
    clip[:, 0, 4:12, 4:12] = 200
    path = t.media_path()
    write_video(path, np.ascontiguousarray(clip.transpose(0, 2, 3, 1)), fps=4)  # [T, H, W, C]
    t.log({"train/loss": 0.5, "train/reconstruction": t.video(path)}, step=1)
    run_dir, run_id = t.run.dir, t.run_id
    t.finish()
    encoded = glob.glob(os.path.join(run_dir, "nbp_media", "*.mp4"))
    logged = glob.glob(os.path.join(run_dir, "media", "videos", "**", "*.mp4"), recursive=True)
    assert len(encoded) == 1 and os.path.getsize(encoded[0]) > 0
    assert len(logged) == 1  # W&B copied our file into the run's media
    rows = history_rows(run_dir)
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(1, 0.5)]  # the scalar, read back from the run's log
    assert rows[0]["train/reconstruction/_type"] == "video-file"

    again = Tracker(project="nbp-test", name="unit", config={"a": 1}, mode="offline", run_id=run_id, dir=str(tmp_path / "wb"))
    assert again.run_id == run_id  # a resumed stage continues the same run
    again.log({"train/loss": 0.25}, step=2)
    resumed_dir = again.run.dir
    again.finish()
    assert [(r["_step"], r["train/loss"]) for r in history_rows(resumed_dir)] == [(2, 0.25)]


def test_tracking_off_for_other_ranks_and_when_disabled(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker(project="p", name="n", config={}, mode="offline")
    assert t.run is None and t.run_id is None and t.media_path() is None and t.video(None) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert Tracker(project="p", name="n", config={}, rank=1).run is None
    monkeypatch.setenv("RANK", "1")
    assert progress(range(3)).disable
