"""The embedded dataset: seeded videos of moving shapes, written as real videos in the UCF-101 layout.

Each class has its own shape, colour and motion (the first eight differ in all three); every video
varies position, direction, speed, phase and size. Shapes are drawn with anti-aliased edges from signed
distance functions, large (radius ~ 0.22 x frame) on a black background, so a small tokenizer can
reconstruct them and a tiny generator can learn them. Videos are MPEG-4 part 2 in AVI with the
'XVID' FourCC (as UCF-101's), and the split files follow the official format
(``classInd.txt``, ``trainlist01.txt``, ``testlist01.txt``; CRLF line ends), so the UCF-101 reader reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbp.data.video_io import write_video

CLIPS_PER_GROUP = 4  # videos per "group" (the gXX of UCF-101 names)


@dataclass(frozen=True)
class ShapeClass:
    name: str  # CamelCase, as UCF-101 class names
    shape: str
    colour: tuple[int, int, int]
    motion: str


RED, GREEN, BLUE, YELLOW = (230, 50, 50), (60, 200, 70), (60, 100, 245), (240, 220, 50)
MAGENTA, CYAN, ORANGE, WHITE = (225, 60, 225), (60, 220, 230), (250, 150, 40), (235, 235, 235)

CLASSES: list[ShapeClass] = [
    ShapeClass("RedCircleSlide", "circle", RED, "slide"),
    ShapeClass("GreenSquareDrop", "square", GREEN, "drop"),
    ShapeClass("BlueTriangleDiagonal", "triangle", BLUE, "diagonal"),
    ShapeClass("YellowStarSpin", "star", YELLOW, "spin"),
    ShapeClass("MagentaCrossOrbit", "cross", MAGENTA, "orbit"),
    ShapeClass("CyanRingPulse", "ring", CYAN, "pulse"),
    ShapeClass("OrangeDiamondZigzag", "diamond", ORANGE, "zigzag"),
    ShapeClass("WhiteBarSwing", "bar", WHITE, "swing"),
    ShapeClass("BlueCircleOrbit", "circle", BLUE, "orbit"),
    ShapeClass("RedSquareSpin", "square", RED, "spin"),
    ShapeClass("GreenStarSlide", "star", GREEN, "slide"),
    ShapeClass("YellowTrianglePulse", "triangle", YELLOW, "pulse"),
]


# --------------------------------------------------------------------------------------
# shapes: signed distance (negative inside), in pixels, in the shape's own rotated frame


def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _triangle(u: np.ndarray, v: np.ndarray, r: float, phase: float = 0.0) -> np.ndarray:
    """Equilateral triangle with circumradius r (apothem r/2): the max over its three edge half-planes."""
    d = [u * math.cos(phase + math.pi / 2 + k * 2 * math.pi / 3) + v * math.sin(phase + math.pi / 2 + k * 2 * math.pi / 3)
         for k in range(3)]
    return np.maximum(np.maximum(d[0], d[1]), d[2]) - r / 2


def shape_sdf(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "square":
        return _box(u, v, 0.85 * r, 0.85 * r)
    if shape == "bar":
        return _box(u, v, 1.3 * r, 0.38 * r)
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) / math.sqrt(2) - 0.8 * r
    if shape == "triangle":
        return _triangle(u, v, 1.1 * r)
    if shape == "star":  # hexagram: two triangles
        return np.minimum(_triangle(u, v, 1.15 * r), _triangle(u, v, 1.15 * r, math.pi))
    if shape == "cross":
        return np.minimum(_box(u, v, r, 0.34 * r), _box(u, v, 0.34 * r, r))
    if shape == "ring":
        return np.abs(np.hypot(u, v) - 0.75 * r) - 0.28 * r
    raise ValueError(f"unknown shape {shape!r}")


# --------------------------------------------------------------------------------------
# motion: centre, angle and scale at each frame


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Reflect positions into [lo, hi] (a ball bouncing between two walls)."""
    span = hi - lo
    m = np.mod(p - lo, 2 * span)
    return lo + np.where(m <= span, m, 2 * span - m)


def _trajectory(motion: str, t: np.ndarray, size: int, r: float, rng: np.random.Generator):
    """(cx, cy, angle, scale) arrays [T] for one video."""
    speed = size * 0.045 * rng.uniform(0.8, 1.2)  # pixels per frame
    sign = rng.choice([-1.0, 1.0])
    phase = rng.uniform(0, 2 * math.pi)
    scale = np.ones_like(t)
    angle = np.full_like(t, rng.uniform(-0.15, 0.15))
    reach = r * (1.35 if motion == "pulse" else 1.35 if motion == "swing" else 1.2)  # furthest extent from the centre
    lo, hi = reach + 1, size - reach - 1
    mid = size / 2 + rng.uniform(-0.08, 0.08, size=2) * size
    if motion == "slide":
        cx, cy = _bounce(rng.uniform(lo, hi) + sign * speed * t, lo, hi), np.full_like(t, rng.uniform(lo, hi))
    elif motion == "drop":
        cx, cy = np.full_like(t, rng.uniform(lo, hi)), _bounce(rng.uniform(lo, hi) + sign * speed * t, lo, hi)
    elif motion == "diagonal":
        sy = rng.choice([-1.0, 1.0])
        cx = _bounce(rng.uniform(lo, hi) + sign * speed * t / math.sqrt(2) * 1.3, lo, hi)
        cy = _bounce(rng.uniform(lo, hi) + sy * speed * t / math.sqrt(2) * 1.3, lo, hi)
    elif motion == "spin":
        cx, cy = np.full_like(t, mid[0]), np.full_like(t, mid[1])
        angle = phase + sign * 0.3 * rng.uniform(0.8, 1.2) * t
    elif motion == "orbit":
        radius = size * 0.17
        w = sign * speed / radius
        cx, cy = mid[0] + radius * np.cos(phase + w * t), mid[1] + radius * np.sin(phase + w * t)
    elif motion == "pulse":
        cx, cy = np.full_like(t, mid[0]), np.full_like(t, mid[1])
        scale = 1.0 + 0.3 * np.sin(phase + 2 * math.pi * t / rng.uniform(7, 10))
    elif motion == "zigzag":
        cx = _bounce(rng.uniform(lo, hi) + sign * speed * 0.8 * t, lo, hi)
        cy = mid[1] + size * 0.18 * (2 / math.pi) * np.arcsin(np.sin(phase + 2 * math.pi * t / 8))  # triangle wave
    elif motion == "swing":
        cx, cy = np.full_like(t, mid[0]), np.full_like(t, mid[1])
        angle = 0.9 * np.sin(phase + 2 * math.pi * t / rng.uniform(8, 11))
    else:
        raise ValueError(f"unknown motion {motion!r}")
    return cx, cy, angle, scale


def render_video(cls: ShapeClass, size: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """One video of a class -> uint8 [frames, size, size, 3]."""
    r = size * 0.22 * rng.uniform(0.9, 1.1)
    t = np.arange(frames, dtype=np.float64)
    cx, cy, angle, scale = _trajectory(cls.motion, t, size, r, rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    colour = np.asarray(cls.colour, dtype=np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        dx, dy = xx - cx[i], yy - cy[i]
        c, s = math.cos(angle[i]), math.sin(angle[i])
        u, v = c * dx + s * dy, -s * dx + c * dy  # rotate into the shape's frame
        alpha = np.clip(0.5 - shape_sdf(cls.shape, u, v, r * scale[i]), 0.0, 1.0)  # [size, size] coverage
        out[i] = np.round(alpha[..., None] * colour).astype(np.uint8)  # [size, size, 3]
    return out


# --------------------------------------------------------------------------------------
# the dataset in the UCF-101 layout


def video_name(cls: ShapeClass, group: int, clip: int) -> str:
    return f"{cls.name}/v_{cls.name}_g{group:02d}_c{clip:02d}.avi"


def plan(spec) -> list[tuple[str, int, str, int]]:
    """(split, class index, relative path, index in the class's split) of every video."""
    test_groups = math.ceil(spec.test_per_class / CLIPS_PER_GROUP)
    out = []
    for c in range(spec.classes):
        cls = CLASSES[c]
        for j in range(spec.test_per_class):
            out.append(("test", c, video_name(cls, 1 + j // CLIPS_PER_GROUP, 1 + j % CLIPS_PER_GROUP), j))
        for j in range(spec.train_per_class):
            out.append(("train", c, video_name(cls, 1 + test_groups + j // CLIPS_PER_GROUP, 1 + j % CLIPS_PER_GROUP), j))
    return out


def generate(root: str | Path, spec, progress=None) -> dict:
    """Write the videos and split files under ``root`` (``UCF-101/``, ``ucfTrainTestlist/``); returns counts."""
    if not 0 < spec.classes <= len(CLASSES):
        raise ValueError(f"classes must be in 1..{len(CLASSES)}, got {spec.classes}")
    root = Path(root)
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    items = plan(spec)
    it = progress(items, desc="embedded videos", unit="video") if progress else items
    train, test = [], []
    for split, c, rel, j in it:
        rng = np.random.default_rng([spec.seed, c, split == "train", j])
        clip = render_video(CLASSES[c], spec.size, spec.frames, rng)
        (videos / rel).parent.mkdir(parents=True, exist_ok=True)
        write_video(videos / rel, clip, fps=spec.fps)
        (train if split == "train" else test).append((rel, c))
    crlf = "\r\n"
    (lists / "classInd.txt").write_bytes("".join(f"{c + 1} {CLASSES[c].name}{crlf}" for c in range(spec.classes)).encode())
    (lists / "trainlist01.txt").write_bytes("".join(f"{rel} {c + 1}{crlf}" for rel, c in train).encode())
    (lists / "testlist01.txt").write_bytes("".join(f"{rel}{crlf}" for rel, _ in test).encode())
    return {"classes": spec.classes, "train": len(train), "test": len(test)}
