"""W&B tracking, offline (no account, no network): scalars and reconstruction videos land in the run folder."""

import glob
import os

import numpy as np
import pytest

from nbp.tracking import Tracker, progress


@pytest.mark.timeout(180)
def test_offline_run_logs_scalars_and_a_video_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    t = Tracker(project="nbp-test", name="unit", config={"a": 1}, mode="offline", dir=str(tmp_path / "wb"))
    assert t.run is not None and t.run_id
    clip = np.zeros((5, 3, 16, 16), dtype=np.uint8)  # [T, C, H, W]
    clip[:, 0, 4:12, 4:12] = 200
    t.log({"train/loss": 0.5, "train/reconstruction": t.video(clip, fps=4)}, step=1)
    run_dir, run_id = t.run.dir, t.run_id
    t.finish()
    encoded = glob.glob(os.path.join(run_dir, "nbp_media", "*.mp4"))
    logged = glob.glob(os.path.join(run_dir, "media", "videos", "**", "*.mp4"), recursive=True)
    assert len(encoded) == 1 and os.path.getsize(encoded[0]) > 0
    assert len(logged) == 1  # W&B copied our file into the run's media

    again = Tracker(project="nbp-test", name="unit", config={"a": 1}, mode="offline", run_id=run_id, dir=str(tmp_path / "wb"))
    assert again.run_id == run_id  # a resumed stage continues the same run
    again.finish()


def test_tracking_off_for_other_ranks_and_when_disabled(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker(project="p", name="n", config={}, mode="offline")
    assert t.run is None and t.run_id is None and t.video(np.zeros((1, 3, 2, 2), np.uint8)) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert Tracker(project="p", name="n", config={}, rank=1).run is None
    monkeypatch.setenv("RANK", "1")
    assert progress(range(3)).disable
