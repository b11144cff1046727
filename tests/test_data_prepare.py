"""The prepare stage: clip cache contents, the report of planted bad videos, atomic failure; the ClipCache reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nbp.config import load_config
from nbp.data.clips import MANIFEST_COLUMNS, ClipCache
from nbp.data.download import run_download
from nbp.data.prepare import run_prepare
from nbp.data.video_io import read_frames, write_video
from nbp.errors import NbpError

REPO = Path(__file__).resolve().parents[1]
SPEC = {"classes": 4, "train_per_class": 3, "test_per_class": 2, "size": 48, "frames": 24, "fps": 8, "seed": 0}
CORRUPT = "GreenSquareDrop/v_GreenSquareDrop_g02_c01.avi"  # truncated
JUNK = "RedCircleSlide/v_RedCircleSlide_g02_c03.avi"  # an AVI header and nothing decodable
SHORT = "BlueTriangleDiagonal/v_BlueTriangleDiagonal_g02_c02.avi"
MISSING = "YellowStarSpin/v_YellowStarSpin_g02_c03.avi"
EMPTY = "RedCircleSlide/v_RedCircleSlide_g01_c02.avi"  # in the test list (val)


def _cfg(out: Path, **prepare):
    over = {"run.out": str(out), "download.embedded.embedded": SPEC}
    over.update({f"prepare.embedded.{k}": v for k, v in prepare.items()})
    return load_config(REPO / "params.yaml", overrides=over)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NBP_PROGRESS", "0")
    out = tmp_path_factory.mktemp("prep") / "out"
    cfg = _cfg(out, workers=1, max_bad_fraction=0.5, train_clips_per_video=2, resolution=64)
    run_download(cfg, "embedded")
    videos = out / "download" / "embedded" / "UCF-101"
    data = (videos / CORRUPT).read_bytes()
    (videos / CORRUPT).write_bytes(data[: len(data) // 3])
    (videos / JUNK).write_bytes(b"RIFF\x10\x00\x00\x00AVI LIST" + bytes(range(256)) * 8)
    write_video(videos / SHORT, np.zeros((5, 48, 48, 3), np.uint8), fps=8)
    (videos / MISSING).unlink()
    (videos / EMPTY).write_bytes(b"")
    run_prepare(cfg, "embedded")
    yield cfg, out
    mp.undo()


def test_report_lists_the_planted_bad_videos(prepared):
    _, out = prepared
    report = json.loads((out / "prepare" / "embedded" / "report.json").read_text())
    skipped = {(s["split"], s["video"]): (s["kind"], s["reason"]) for s in report["skipped"]}
    assert set(skipped) == {("train", CORRUPT), ("train", JUNK), ("train", SHORT), ("train", MISSING), ("val", EMPTY)}
    assert skipped[("train", CORRUPT)][0] == "corrupt" and skipped[("train", CORRUPT)][1].startswith(("truncated", "unreadable"))
    assert skipped[("train", JUNK)] == ("empty", "no video stream")
    assert skipped[("train", SHORT)] == ("too_short", "too short: 5 frames (0.62 s at 8 fps); "
                                                      "a clip of 17 frames at 8 fps needs 17")
    assert skipped[("train", MISSING)] == ("corrupt", "no such file")
    assert skipped[("val", EMPTY)] == ("empty", "empty file (0 bytes)")
    assert report["splits"]["train"] == {"videos": 12, "ok": 8, "skipped": 4, "bad_fraction": 0.333333, "clips": 16,
                                         "skipped_by_kind": {"corrupt": 2, "empty": 1, "too_short": 1}, "not_downloaded": 0}
    assert report["splits"]["val"]["ok"] == 7 and report["splits"]["val"]["clips"] == 7


def test_cache_holds_the_decoded_resized_clips(prepared):
    _, out = prepared
    root = out / "prepare" / "embedded"
    classes = json.loads((root / "classes.json").read_text())
    assert classes[:2] == [{"label": 0, "name": "RedCircleSlide", "text": "red circle slide"},
                           {"label": 1, "name": "GreenSquareDrop", "text": "green square drop"}]
    for split, per_video in (("train", 2), ("val", 1)):
        clips = np.load(root / split / "clips.npy", mmap_mode="r")
        man = pd.read_csv(root / split / "manifest.csv")
        assert list(man.columns) == MANIFEST_COLUMNS
        assert clips.dtype == np.uint8 and clips.shape == (len(man), 17, 64, 64, 3)
        assert man["clip"].tolist() == list(range(len(man)))
        assert (man.groupby("video").size() == per_video).all()
        assert {CORRUPT, JUNK, SHORT, MISSING, EMPTY}.isdisjoint(man["video"])
        assert (man["fps"] == 8.0).all() and (man["num_frames"] == 24).all()
        assert man["start"].between(0, 24 - 17).all()
        if split == "val":
            assert (man["start"] == (24 - 17) // 2).all()  # centre clips
        for row in man.itertuples():
            src = out / "download" / "embedded" / "UCF-101" / row.video
            assert np.array_equal(clips[row.clip], read_frames(src, range(row.start, row.start + 17), size=64))
            assert row.class_name.lower().startswith(row.class_text.split()[0])


def test_clip_cache_reader(prepared):
    _, out = prepared
    cache = ClipCache(out / "prepare" / "embedded", "train")
    man = pd.read_csv(out / "prepare" / "embedded" / "train" / "manifest.csv")
    assert len(cache) == 16 and cache.shape == (17, 64, 64)
    assert cache.labels.dtype == np.int64 and cache.labels.tolist() == man["label"].tolist()
    assert cache.class_texts == man["class_text"].tolist() and cache.video_ids == man["video"].tolist()
    texts = ["red circle slide", "green square drop", "blue triangle diagonal", "yellow star spin"]
    assert [c["text"] for c in cache.classes] == texts
    clip, label = cache[5]
    assert clip.shape == (17, 64, 64, 3) and clip.flags.writeable and label == man["label"][5]
    batch = cache.batch([7, 2, 7])
    assert np.array_equal(batch[0], cache.frames[7]) and np.array_equal(batch[1], cache.frames[2])
    x = ClipCache.to_tensor(batch)
    assert x.shape == (3, 3, 17, 64, 64) and x.dtype == torch.float32
    assert torch.equal(x[1, :, 4], torch.from_numpy(batch[1, 4]).permute(2, 0, 1).float() / 255)
    assert ClipCache.to_tensor(batch[0]).shape == (1, 3, 17, 64, 64)
    with pytest.raises(NbpError, match="run `nbp prepare` first"):
        ClipCache(out / "prepare" / "nothing", "train")


@pytest.mark.slow
def test_cache_does_not_depend_on_the_number_of_workers(prepared, tmp_path):
    _, out = prepared
    other = tmp_path / "out"
    other.mkdir()
    (other / "download").symlink_to(out / "download")
    run_prepare(_cfg(other, workers=2, max_bad_fraction=0.5, train_clips_per_video=2, resolution=64), "embedded")
    for split in ("train", "val"):
        for name in ("clips.npy", "manifest.csv"):
            a = (out / "prepare" / "embedded" / split / name).read_bytes()
            assert a == (other / "prepare" / "embedded" / split / name).read_bytes(), (split, name)


def test_too_many_bad_videos_fail_without_output(prepared, tmp_path):
    _, out = prepared
    other = tmp_path / "out"
    (other / "prepare" / "embedded").mkdir(parents=True)
    (other / "prepare" / "embedded" / "old.txt").write_text("previous output")
    (other / "download").symlink_to(out / "download")
    with pytest.raises(NbpError, match=r"4 of 12 train videos are bad \(33.3% > max_bad_fraction 10.0%.*logs/prepare/embedded"):
        run_prepare(_cfg(other, workers=1, max_bad_fraction=0.1), "embedded")
    assert sorted(p.name for p in (other / "prepare").iterdir()) == ["embedded"]  # no temporary folder left
    assert [p.name for p in (other / "prepare" / "embedded").iterdir()] == ["old.txt"]  # the previous output is kept
    log = json.loads((other / "logs" / "prepare" / "embedded" / "report.json").read_text())
    assert len(log["skipped"]) == 5
