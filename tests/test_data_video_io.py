"""Clip sampling and video I/O: frame indices checked on videos whose frames show their own index."""

from __future__ import annotations

import av
import numpy as np
import pytest
from helpers_data import frame_index, index_frame, write_index_video

from nbp.data import video_io as V

# 17 frames at 8 fps from 25 fps: floor(i * 25 / 8)
FIRST_25_TO_8 = [0, 3, 6, 9, 12, 15, 18, 21, 25, 28, 31, 34, 37, 40, 43, 46, 50]
# from 30 fps: floor(i * 3.75)
FIRST_30_TO_8 = [0, 3, 7, 11, 15, 18, 22, 26, 30, 33, 37, 41, 45, 48, 52, 56, 60]


def test_clip_indices_hand_computed():
    assert V.clip_indices(200, 25, 17, 8, "first").tolist() == FIRST_25_TO_8
    assert V.clip_indices(200, 30, 17, 8, "first").tolist() == FIRST_30_TO_8
    # centre: (200 - 51) // 2 = 74 frames of slack before
    assert V.clip_indices(200, 25, 17, 8, "center").tolist() == [74 + i for i in FIRST_25_TO_8]
    # random: uniform start in [0, 200 - 51]
    expected_start = int(np.random.default_rng(7).integers(0, 150))
    want = [expected_start + i for i in FIRST_25_TO_8]
    assert V.clip_indices(200, 25, 17, 8, "random", np.random.default_rng(7)).tolist() == want
    assert V.clip_indices(200, 25, 17, 8, "random", 7).tolist() == want
    # a source slower than the target is not resampled; neither is any source without a target fps
    assert V.clip_indices(30, 5, 17, 8, "first").tolist() == list(range(17))
    assert V.clip_indices(30, 25, 17, None, "center").tolist() == list(range(6, 23))
    # 16 fps (K600) from 30 fps: floor(i * 1.875)
    assert V.clip_indices(100, 30, 5, 16, "first").tolist() == [0, 1, 3, 5, 7]
    # exactly long enough, then one frame short
    assert V.clip_indices(51, 25, 17, 8, "center").tolist() == FIRST_25_TO_8
    with pytest.raises(V.VideoTooShortError, match="needs 51"):
        V.clip_indices(50, 25, 17, 8, "center")


def test_random_starts_cover_the_valid_range():
    rng = np.random.default_rng(0)
    starts = {int(V.clip_indices(60, 25, 17, 8, "random", rng)[0]) for _ in range(400)}
    assert starts == set(range(10))  # 60 - 51 + 1 valid starts, all reachable, none outside


CASES = [
    # suffix, codec, fps, n, gop, bframes
    (".avi", "mpeg4", 25, 200, 25, 2),  # xvid-like B-frames: timestamps start at 1 and seeks land after the target
    (".avi", "mpeg4", 25, 200, 12, 0),
    (".mp4", "libx264", 30, 200, 60, 0),
    (".webm", "libvpx-vp9", 25, 120, 30, 0),
]


@pytest.mark.parametrize("suffix,codec,fps,n,gop,bframes", CASES, ids=[f"{c[1]}{c[0]}-gop{c[4]}-b{c[5]}" for c in CASES])
def test_read_clip_returns_the_hand_computed_frames(tmp_path, suffix, codec, fps, n, gop, bframes):
    path = write_index_video(tmp_path / f"v{suffix}", n, fps, codec, gop, bframes)
    info = V.probe(path)
    assert (info.num_frames, info.fps, info.width, info.height) == (n, fps, 64, 64)
    first = FIRST_25_TO_8 if fps == 25 else FIRST_30_TO_8
    span = first[-1] + 1
    for start, offset in [("first", 0), ("center", (n - span) // 2), ("random", None)]:
        clip, idx = V.read_clip(path, 17, fps=8, start=start, rng=np.random.default_rng(3), return_indices=True)
        if offset is None:
            offset = int(np.random.default_rng(3).integers(0, n - span + 1))
        want = [offset + i for i in first]
        assert idx.tolist() == want
        assert clip.shape == (17, 64, 64, 3) and clip.dtype == np.uint8
        assert [frame_index(f) for f in clip] == want, start
    # the last possible clip ends on the last frame
    last = V.read_frames(path, [n - 3, n - 2, n - 1])
    assert [frame_index(f) for f in last] == [n - 3, n - 2, n - 1]


def test_seek_decodes_about_one_gop_not_the_whole_video(tmp_path, monkeypatch):
    path = write_index_video(tmp_path / "long.avi", 1500, 25, "mpeg4", gop=50)  # 60 s
    seen = []
    real = V._indexed

    def counting(*args, **kwargs):
        for k, f in real(*args, **kwargs):
            seen.append(k)
            yield k, f

    monkeypatch.setattr(V, "_indexed", counting)
    clip, idx = V.read_clip(path, 17, fps=8, start="center", return_indices=True)
    assert [frame_index(f) for f in clip] == idx.tolist() == [724 + i for i in FIRST_25_TO_8]
    # decoding starts at the last key frame at or before 724 (GOP 50: 700 at the latest) and stops at 774
    assert 700 <= min(seen) <= 724 and max(seen) == 774 and len(seen) == 774 - min(seen) + 1


def test_resize_full_and_short_side_crop(tmp_path):
    # 128 x 64 frames: left quarter red, middle half green, right quarter blue
    frame = np.zeros((64, 128, 3), np.uint8)
    frame[:, :32] = (255, 0, 0)
    frame[:, 32:96] = (0, 255, 0)
    frame[:, 96:] = (0, 0, 255)
    path = tmp_path / "wide.mp4"
    V.write_video(path, np.stack([frame] * 20), fps=10)
    full = V.read_clip(path, 4, size=32, resize="full")
    crop = V.read_clip(path, 4, size=32, resize="short_side_crop")
    assert full.shape == crop.shape == (4, 32, 32, 3)
    # full: the whole width squashed, so both side colours are still there
    assert full[0, 16, 2, 0] > 200 and full[0, 16, 29, 2] > 200 and full[0, 16, 16, 1] > 200
    # crop: short side 64 -> 32 (width 64), centre 32 columns = the green middle only
    assert (crop[0, :, 2:30, 1] > 200).all() and (crop[0, :, 2:30, 0] < 60).all() and (crop[0, :, 2:30, 2] < 60).all()


def test_write_mp4_and_gif_round_trip(tmp_path):
    video = np.stack([index_frame(i) for i in range(12)])
    mp4 = V.write_video(tmp_path / "a.mp4", video, fps=8)
    back = V.read_video(mp4)
    assert back.shape == video.shape
    assert [frame_index(f) for f in back] == list(range(12))
    with av.open(str(mp4)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    gif = V.write_video(tmp_path / "a.gif", video, fps=8)
    with av.open(str(gif)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert [frame_index(f) for f in frames] == list(range(12))
    assert np.abs(np.stack(frames).astype(int) - video).mean() < 2
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))  # atomic: no leftovers


def test_mp4_falls_back_to_mpeg4_without_an_h264_encoder(tmp_path, monkeypatch):
    monkeypatch.setitem(V._CODECS, ".mp4", ("no_such_h264_encoder", "mpeg4"))
    video = np.stack([index_frame(i) for i in range(6)])
    p = V.write_video(tmp_path / "fallback.mp4", video, fps=8)
    with av.open(str(p)) as c:
        assert c.streams.video[0].codec_context.name == "mpeg4"
    assert [frame_index(f) for f in V.read_video(p)] == list(range(6))


def test_write_avi_is_xvid_and_odd_sizes_are_padded(tmp_path):
    video = np.full((5, 33, 47, 3), 128, np.uint8)
    p = V.write_video(tmp_path / "odd.avi", video, fps=25)
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        assert s.codec_context.codec_tag == "XVID" and (s.codec_context.width, s.codec_context.height) == (48, 34)
    with pytest.raises(ValueError):
        V.write_video(tmp_path / "bad.mp4", video.astype(np.float32))


def test_video_grid_layout():
    N, T, H, W = 3, 2, 4, 5
    clips = np.zeros((N, T, H, W, 3), np.uint8)
    for i in range(N):
        clips[i] = 50 * (i + 1)
    g = V.video_grid(clips, ncols=2, pad=1, pad_value=255)
    assert g.shape == (T, 1 + 2 * (H + 1), 1 + 2 * (W + 1), 3)
    assert (g[:, 1:5, 1:6] == 50).all() and (g[:, 1:5, 7:12] == 100).all() and (g[:, 6:10, 1:6] == 150).all()
    assert (g[:, 6:10, 7:12] == 255).all()  # the empty fourth slot
    assert (g[:, 0] == 255).all() and (g[:, :, 6] == 255).all()  # padding lines
    # float [N, 3, T, H, W] in [0, 1] gives the same grid
    f = clips.transpose(0, 4, 1, 2, 3).astype(np.float32) / 255.0
    assert np.array_equal(V.video_grid(f, ncols=2, pad=1), g)
    # min_side: tiles enlarged by the smallest integer factor reaching it (4 -> 8: x2), nearest neighbour
    big = V.video_grid(clips, ncols=2, pad=1, min_side=7)
    assert big.shape == (T, 1 + 2 * (2 * H + 1), 1 + 2 * (2 * W + 1), 3)
    assert (big[:, 1:9, 1:11] == 50).all() and (big[:, 1:9, 12:22] == 100).all() and (big[:, 9] == 255).all()


def test_bad_files_raise_clear_errors(tmp_path):
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(V.EmptyVideoError, match="empty.avi: empty file"):
        V.probe(empty)
    with pytest.raises(V.VideoError, match="junk.mp4"):
        V.read_clip(junk, 4)
    with pytest.raises(V.VideoError, match="no such file"):
        V.probe(tmp_path / "missing.avi")
    good = write_index_video(tmp_path / "t.avi", 40, 8, gop=4)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.avi"
    trunc.write_bytes(data[: len(data) // 3])
    with pytest.raises(V.VideoError, match="trunc.avi"):
        V.read_clip(trunc, 17, 8, "center")
    with pytest.raises(V.VideoTooShortError, match="needs 65"):
        V.read_clip(good, 17, 2)  # 40 frames at 8 fps; 17 frames at 2 fps take every 4th: 65 frames
