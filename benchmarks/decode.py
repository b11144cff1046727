"""Clip decoding cost: a 17-frame clip (8 fps) from the middle of a 60 s 320x240 video vs from its start.

``nbp.data.video_io.read_clip`` seeks to the key frame before the clip and stops after its last frame.
Compared with decoding from the start up to the clip (what a reader without seeking does) and with
decoding the whole video. Videos: 25 fps, 1500 frames, MPEG-4 part 2 in AVI ('XVID', B-frames, key frame
every 250 frames, as UCF-101's xvid files) and H.264 in MP4 (key frame every 250). Writes (replaces) this
benchmark's section of ``results/speed.md``.

    python benchmarks/decode.py            # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbp.data.video_io import clip_indices, probe, read_clip  # noqa: E402
from nbp.io import write_markdown_section

W, H, FPS, SECONDS = 320, 240, 25, 60


def make_video(path: Path, codec: str, gop: int = 250, bframes: int = 0) -> Path:
    """A textured scene panning and a bright square moving: P/B-frames that cost real decoding."""
    rng = np.random.default_rng(0)
    texture = np.kron(rng.integers(0, 256, (H // 8, 2 * W // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))  # [H, 2W, 3]
    fmt = {".avi": "avi", ".mp4": "mp4"}[path.suffix]
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(FPS))
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "mpeg4":
            s.codec_context.max_b_frames = bframes
            s.codec_context.codec_tag = "XVID"
            s.bit_rate = 1_500_000
        for i in range(FPS * SECONDS):
            x = (2 * i) % W
            img = texture[:, x:x + W].copy()  # [H, W, 3]
            y0, x0 = 40 + int(60 * np.sin(i / 20)), (5 * i) % (W - 40)
            img[y0:y0 + 40, x0:x0 + 40] = 255
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode(None))
    return path


def decode_from_start(path: Path, indices: np.ndarray, size: int) -> np.ndarray:
    """The reader without seeking: decode every frame up to the clip's last one, convert the wanted ones."""
    wanted, out = set(indices.tolist()), []
    with av.open(str(path)) as c:
        for k, f in enumerate(c.decode(video=0)):
            if k in wanted:
                out.append(f.reformat(width=size, height=size, format="rgb24").to_ndarray())
            if k >= indices[-1]:
                break
    return np.stack(out)


def key_frames(path: Path) -> list[int]:
    """Indices of the key frames (from packet timestamps relative to the first frame)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pts = [(pk.pts, pk.is_keyframe) for pk in c.demux(s) if pk.pts is not None]
    p0 = min(p for p, _ in pts)
    return sorted(round((p - p0) * s.time_base * FPS) for p, k in pts if k)


def decode_all(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` after a warm-up: the least disturbed by other work on a shared machine."""
    fn()  # warm-up (file cache, codec init)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--size", type=int, default=128, help="clip resolution (UCF-101 prepare: 128)")
    p.add_argument("--md", default="results/speed.md")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, codec, suffix, bframes in [("MPEG-4 (xvid) AVI", "mpeg4", ".avi", 2), ("H.264 MP4", "libx264", ".mp4", 0)]:
            path = make_video(Path(tmp) / f"v{suffix}", codec, bframes=bframes)
            info = probe(path)
            mid = clip_indices(info.num_frames, info.fps, 17, 8, "center")
            first = clip_indices(info.num_frames, info.fps, 17, 8, "first")
            assert np.array_equal(read_clip(path, 17, 8, "center", a.size), decode_from_start(path, mid, a.size))
            r = {"video": name, "size_mb": path.stat().st_size / 1e6, "mid_start": int(mid[0])}
            r["first"] = timed(lambda: read_clip(path, 17, 8, "first", a.size, info=info), a.repeats)  # noqa: B023
            r["middle"] = timed(lambda: read_clip(path, 17, 8, "center", a.size, info=info), a.repeats)  # noqa: B023
            r["middle_no_seek"] = timed(lambda: decode_from_start(path, mid, a.size), a.repeats)  # noqa: B023
            r["whole"] = timed(lambda: decode_all(path), max(1, a.repeats // 2))  # noqa: B023
            r["first_span"] = int(first[-1]) + 1
            r["key_before_mid"] = max(k for k in key_frames(path) if k <= mid[0])
            r["mid_decoded"] = int(mid[-1]) - r["key_before_mid"] + 1
            rows.append(r)
            print(f"{name}: first {r['first'] * 1e3:.1f} ms, middle {r['middle'] * 1e3:.1f} ms, middle without seeking "
                  f"{r['middle_no_seek'] * 1e3:.1f} ms, whole video {r['whole'] * 1e3:.0f} ms")
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if hasattr(os, "getloadavg"):
        cpu += f", load average {os.getloadavg()[0]:.1f} at the end (other work on the machine inflates times)"
    lines = [
        f"One 17-frame clip at 8 fps (51 source frames), resized to {a.size}x{a.size}, from a {SECONDS} s {W}x{H} video at "
        f"{FPS} fps (key frame every 250 frames), best of {a.repeats} runs, one process, PyAV {av.__version__}, {cpu}. "
        "`read_clip` seeks to the key frame before the clip and stops after its last frame; 'no seek' decodes from the "
        "start up to the clip; the last column decodes all 1500 frames.",
        "",
        "| video | file MB | clip from the start (ms) | clip from the middle (ms) | middle, no seek (ms) | whole video (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['video']} | {r['size_mb']:.1f} | {r['first'] * 1e3:.1f} | {r['middle'] * 1e3:.1f} | "
                     f"{r['middle_no_seek'] * 1e3:.1f} | {r['whole'] * 1e3:.0f} |")
    lines += [""] + [f"{r['video']}: the middle clip is source frames {r['mid_start']}..{r['mid_start'] + 50}; the seek lands "
                     f"on the key frame at {r['key_before_mid']}, so {r['mid_decoded']} frames are decoded (51 from the start, "
                     f"{r['mid_start'] + 51} without seeking)." for r in rows]
    lines += ["", "Command: `python benchmarks/decode.py`", ""]
    title = "Video decoding: a clip from the middle vs from the start (benchmarks/decode.py)"
    write_markdown_section(Path(a.md), "decode", title, "\n".join(lines))
    print(f"wrote {a.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
