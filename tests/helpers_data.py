"""Test helpers for the data tests: videos whose frames encode their own index."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BITS = 16  # a 4 x 4 grid of black/white blocks: frame index in binary, robust to lossy compression


def index_frame(i: int, size: int = 64, width: int | None = None) -> np.ndarray:
    """uint8 [size, width, 3]: bit k of ``i`` is the k-th block (row-major) white."""
    width = width or size
    g = int(np.sqrt(BITS))
    bh, bw = size // g, width // g
    img = np.zeros((size, width, 3), np.uint8)
    for k in range(BITS):
        if (i >> k) & 1:
            r, c = divmod(k, g)
            img[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = 255
    return img


def frame_index(img: np.ndarray) -> int:
    """Read back the index drawn by index_frame (from a possibly resized, compressed frame)."""
    g = int(np.sqrt(BITS))
    h, w = img.shape[0] // g * g, img.shape[1] // g * g
    m = img[:h, :w].mean(-1).reshape(g, h // g, g, w // g).mean((1, 3)).reshape(-1)  # [g*g] block means
    return int(sum(int(v > 127) << k for k, v in enumerate(m)))


def write_index_video(path: str | Path, n: int, fps: float, codec: str = "mpeg4", gop: int = 12, bframes: int = 0,
                      size: int = 64, width: int | None = None) -> Path:
    """A video of ``n`` frames showing their own index, encoded with the given codec settings."""
    path = Path(path)
    fmt = {".avi": "avi", ".mp4": "mp4", ".webm": "webm", ".mkv": "matroska"}[path.suffix]
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = width or size, size, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "mpeg4":
            s.codec_context.max_b_frames = bframes
            s.bit_rate = 2_000_000
            if fmt == "avi":
                s.codec_context.codec_tag = "XVID"
        for i in range(n):
            c.mux(s.encode(av.VideoFrame.from_ndarray(index_frame(i, size, width), format="rgb24")))
        c.mux(s.encode(None))
    return path
