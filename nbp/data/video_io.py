"""Video I/O with PyAV: read clips (timestamp resampling, seek, resize) and write mp4/avi/webm/gif and grids.

Clip sampling follows the paper's data pipeline: a clip of ``frames`` frames at ``fps`` frames per
second is taken from the source by timestamps. Target frame ``i`` shows the source frame on screen at
time ``start + i / fps``, i.e. source index ``start + floor(i * src_fps / fps)``; a source slower than
``fps`` is not resampled (step 1). The start is ``first``, ``center`` or ``random`` (uniform over the
valid starts, from a numpy Generator).

Decoding seeks to the key frame before the first needed frame and stops after the last one, so a
17-frame clip from the middle of a long video costs about one GOP of decoding, not the whole video.
Frames are identified by their presentation timestamps relative to the first frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Literal

import av
import numpy as np

from nbp.errors import NbpError
from nbp.io import atomic_path

Start = Literal["first", "center", "random"]
Resize = Literal["full", "short_side_crop"]

# a clip whose first frame lies closer than this to the start is decoded from the start (no seek)
_SEEK_MIN_SECONDS = 0.5
# seek this much earlier again when a container's seek lands after the wanted frame
_SEEK_RETRY_MARGINS = (1.0, 4.0)


class VideoError(NbpError):
    """A video that cannot be read (corrupt, unreadable, no video stream)."""


class EmptyVideoError(VideoError):
    """A readable file with no video stream or no frames."""


class VideoTooShortError(VideoError):
    """Fewer frames than the clip needs."""

    def __init__(self, message: str, num_frames: int | None = None):
        super().__init__(message)
        self.num_frames = num_frames


@dataclass(frozen=True)
class VideoInfo:
    path: str
    fps: float  # nominal frame rate of the video stream
    num_frames: int  # from the container when it says, else duration * fps
    width: int
    height: int
    codec: str

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


# --------------------------------------------------------------------------------------
# sampling


def clip_offsets(frames: int, src_fps: float, fps: float | None = None) -> np.ndarray:
    """Source-frame offsets of a clip's frames from its first frame: floor(i * max(src_fps / fps, 1))."""
    step = max(src_fps / fps, 1.0) if fps else 1.0
    return np.floor(np.arange(frames) * step + 1e-6).astype(np.int64)


def clip_indices(num_frames: int, src_fps: float, frames: int, fps: float | None = None, start: Start = "center",
                 rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Source frame indices of a clip (int64 [frames]); raises VideoTooShortError when it does not fit."""
    offsets = clip_offsets(frames, src_fps, fps)
    span = int(offsets[-1]) + 1
    if num_frames < span:
        at = f" at {fps:g} fps" if fps else ""
        raise VideoTooShortError(
            f"too short: {num_frames} frames ({num_frames / src_fps:.2f} s at {src_fps:g} fps); "
            f"a clip of {frames} frames{at} needs {span}", num_frames)
    slack = num_frames - span
    if start == "first":
        s = 0
    elif start == "center":
        s = slack // 2
    elif start == "random":
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        s = int(gen.integers(0, slack + 1))
    else:
        raise ValueError(f"start must be first, center or random, got {start!r}")
    return s + offsets


# --------------------------------------------------------------------------------------
# reading


def _open(path: str | Path):
    try:
        container = av.open(str(path), "r")
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"{path}: unreadable ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise EmptyVideoError(f"{path}: no video stream")
    return container


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".strip()[:200]


def _rate(stream) -> Fraction:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if r:
            return Fraction(r)
    raise VideoError("unknown frame rate")


def probe(path: str | Path) -> VideoInfo:
    """Frame rate, frame count and size of a video, from its headers (counts packets when they are silent)."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise EmptyVideoError(f"{path}: empty file (0 bytes)")
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            fps = _rate(stream)
            n = int(stream.frames or 0)
            if n <= 0:
                if stream.duration is not None and stream.time_base is not None:
                    seconds = float(stream.duration * stream.time_base)
                elif container.duration is not None:
                    seconds = container.duration / av.time_base
                else:
                    seconds = 0.0
                n = int(round(seconds * fps))
            if n <= 0:  # nothing in the headers: count the packets
                n = sum(1 for p in container.demux(stream) if p.size)
        except VideoError as e:
            raise VideoError(f"{path}: {e}") from None
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"{path}: unreadable ({_reason(e)})") from None
        if n <= 0:
            raise EmptyVideoError(f"{path}: no frames")
        cc = stream.codec_context
        return VideoInfo(str(path), float(fps), n, cc.width, cc.height, cc.name)


def _target_size(w: int, h: int, size: int | None, resize: Resize) -> tuple[int, int]:
    if size is None:
        return w, h
    if resize == "full":
        return size, size
    if resize == "short_side_crop":
        s = size / min(w, h)
        return max(size, round(w * s)), max(size, round(h * s))
    raise ValueError(f"resize must be full or short_side_crop, got {resize!r}")


def _converter(size: int | None, resize: Resize):
    def convert(frame: av.VideoFrame) -> np.ndarray:
        w, h = _target_size(frame.width, frame.height, size, resize)
        img = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR").to_ndarray()  # [h, w, 3]
        if size is not None and (w, h) != (size, size):
            y0, x0 = (h - size) // 2, (w - size) // 2
            img = img[y0:y0 + size, x0:x0 + size]  # [size, size, 3]
        return img

    return convert


def _indexed(frames: Iterable[av.VideoFrame], pts0: int, tb: Fraction, fps: Fraction,
             start: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(source index, frame): index from the presentation timestamp, or by counting when there is none."""
    count = start
    for frame in frames:
        k = count if frame.pts is None else round((frame.pts - pts0) * tb * fps)
        count = k + 1
        yield k, frame


def _collect(indexed: Iterator[tuple[int, av.VideoFrame]], indices: np.ndarray, convert) -> tuple[list | None, int]:
    """Pick the frames at ``indices`` (sorted) from a decoded run; None when the run starts after indices[0].

    A wanted index with no frame of its own (a timestamp gap) takes the frame on screen then (the previous one).
    Returns (frames or None, last index seen).
    """
    out: list = [None] * len(indices)
    ptr, prev, last = 0, None, -1
    for k, frame in indexed:
        if prev is None and k > indices[0]:
            return None, k
        while ptr < len(indices) and indices[ptr] < k:
            out[ptr] = convert(prev if prev is not None else frame)
            ptr += 1
        while ptr < len(indices) and indices[ptr] == k:
            out[ptr] = convert(frame)
            ptr += 1
        last, prev = k, frame
        if ptr == len(indices):
            return out, last
    if ptr < len(indices):
        raise VideoTooShortError(f"too short: stream ends at frame {last + 1}, needs frame {int(indices[-1]) + 1}", last + 1)
    return out, last


def read_frames(path: str | Path, indices: Iterable[int], size: int | None = None, resize: Resize = "full") -> np.ndarray:
    """Decode the frames at the given source indices (non-decreasing) -> uint8 [T, H, W, 3].

    Seeks to the key frame before indices[0] and stops after the last index. When a container's seek
    lands after the wanted frame (or the stream seems to end early after a seek), it seeks earlier,
    and in the end decodes from the start, which is authoritative.
    """
    indices = np.asarray(list(indices), dtype=np.int64)
    if len(indices) == 0 or np.any(np.diff(indices) < 0) or indices[0] < 0:
        raise ValueError("indices must be non-empty, non-negative and sorted")
    convert = _converter(size, resize)
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            fps, tb = _rate(stream), Fraction(stream.time_base)
            decoded = container.decode(stream)
            first = next(decoded, None)
            if first is None:
                raise EmptyVideoError(f"{path}: no frames")
            pts0 = first.pts if first.pts is not None else 0
            start_s = float(indices[0] / fps)
            if start_s >= _SEEK_MIN_SECONDS and first.pts is not None:
                for margin in (0.0, *_SEEK_RETRY_MARGINS):
                    t = max(0.0, start_s - margin)
                    container.seek(pts0 + int(t / tb), stream=stream, backward=True, any_frame=False)
                    try:
                        out, _ = _collect(_indexed(container.decode(stream), pts0, tb, fps, 0), indices, convert)
                    except VideoTooShortError:
                        break  # confirm from the start
                    if out is not None:
                        return np.stack(out)  # [T, H, W, 3]
                    if t == 0.0:
                        break
                container.seek(0, backward=True, any_frame=False)
                decoded = container.decode(stream)
            else:
                decoded = chain([first], decoded)
            out, _ = _collect(_indexed(decoded, pts0, tb, fps, 0), indices, convert)
            if out is None:
                raise VideoError(f"{path}: frame timestamps start after frame {int(indices[0])}")
        except VideoTooShortError as e:
            raise VideoTooShortError(f"{path}: {e}", e.num_frames) from None
        except VideoError:
            raise
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{path}: corrupt ({_reason(e)})") from None
    return np.stack(out)  # [T, H, W, 3]


def read_clip(path: str | Path, frames: int, fps: float | None = None, start: Start = "center", size: int | None = None,
              resize: Resize = "full", rng: np.random.Generator | int | None = None, info: VideoInfo | None = None,
              return_indices: bool = False):
    """A clip of ``frames`` frames at ``fps`` -> uint8 [frames, size, size, 3] (and its source indices if asked).

    ``resize='full'`` squashes the whole frame to size x size (the released pipeline's choice);
    ``'short_side_crop'`` scales the short side to ``size`` and takes the centre square.
    A stream that ends before its header's frame count is re-sampled within the frames really there
    when they are at least 90% of the count, else it is reported as truncated (corrupt).
    """
    info = info or probe(path)
    if isinstance(rng, int) or rng is None:
        rng = np.random.default_rng(rng)
    try:
        idx = clip_indices(info.num_frames, info.fps, frames, fps, start, rng)
    except VideoTooShortError as e:
        raise VideoTooShortError(f"{path}: {e}", e.num_frames) from None
    try:
        clip = read_frames(path, idx, size, resize)
    except VideoTooShortError as e:
        n = e.num_frames or 0
        if n >= info.num_frames:
            raise
        if n < 0.9 * info.num_frames:
            raise VideoError(f"{path}: truncated (the header says {info.num_frames} frames, {n} decode)") from None
        idx = clip_indices(n, info.fps, frames, fps, start, rng)
        clip = read_frames(path, idx, size, resize)
    return (clip, idx) if return_indices else clip


def read_video(path: str | Path, size: int | None = None, resize: Resize = "full") -> np.ndarray:
    """Every frame of a (short) video -> uint8 [T, H, W, 3]."""
    convert = _converter(size, resize)
    with _open(path) as container:
        try:
            frames = [convert(f) for f in container.decode(container.streams.video[0])]
        except (av.FFmpegError, OSError) as e:
            raise VideoError(f"{path}: corrupt ({_reason(e)})") from None
    if not frames:
        raise EmptyVideoError(f"{path}: no frames")
    return np.stack(frames)  # [T, H, W, 3]


# --------------------------------------------------------------------------------------
# writing

_FORMATS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi", ".webm": "webm"}
_CODECS = {".mp4": ("libx264", "mpeg4"), ".mov": ("libx264", "mpeg4"), ".mkv": ("libx264", "mpeg4"),
           ".avi": ("mpeg4",), ".webm": ("libvpx-vp9", "libvpx")}


def to_uint8_video(video) -> np.ndarray:
    """float [N, 3, T, H, W] (or [3, T, H, W]) in [0, 1] (torch or numpy) -> uint8 [N, T, H, W, 3]; uint8 passes through."""
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    if video.ndim == 4:
        video = video[None]  # [1, 3, T, H, W]
    video = np.clip(video, 0.0, 1.0).transpose(0, 2, 3, 4, 1)  # [N, T, H, W, 3]
    return np.round(video * 255.0).astype(np.uint8)


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
    return video


def _add_stream(container, codecs: tuple[str, ...], fps: float, w: int, h: int):
    last = None
    for codec in codecs:
        try:
            options = {"crf": "18", "preset": "medium"} if codec == "libx264" else {}
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        except (av.FFmpegError, ValueError) as e:  # encoder not in this FFmpeg build
            last = e
            continue
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = max(2_000_000, int(w * h * fps * 2))  # high: the quantiser bottoms out
            if container.format.name == "avi":
                stream.codec_context.codec_tag = "XVID"  # UCF-101's FourCC
        return stream
    raise NbpError(f"no encoder available among {', '.join(codecs)} ({last})")


def write_video(path: str | Path, video: np.ndarray, fps: float = 8.0) -> Path:
    """Write uint8 [T, H, W, 3] as .mp4 (h264, mpeg4 fallback), .avi (mpeg4 'XVID'), .webm (vp9) or .gif; atomic."""
    path = Path(path)
    video = _check_video(video)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return write_gif(path, video, fps)
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unsupported video type (use .mp4, .avi, .webm, .mkv, .mov or .gif)")
    if video.shape[1] % 2 or video.shape[2] % 2:  # yuv420p needs even sizes: repeat the last row/column
        video = np.pad(video, ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)), mode="edge")
    T, H, W, _ = video.shape
    with atomic_path(path) as tmp:
        with av.open(str(tmp), "w", format=_FORMATS[suffix]) as container:
            stream = _add_stream(container, _CODECS[suffix], fps, W, H)
            stream.codec_context.thread_count = 1  # byte-identical output for the same frames
            for t in range(T):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(video[t]), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    return path


def write_gif(path: str | Path, video: np.ndarray, fps: float = 8.0) -> Path:
    """Write uint8 [T, H, W, 3] as a looping GIF (a palette per frame); atomic."""
    from PIL import Image

    video = _check_video(video)
    images = [Image.fromarray(f).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) for f in video]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)),
                       loop=0, optimize=False, disposal=1)
    return Path(path)


def video_grid(videos, ncols: int | None = None, pad: int = 2, pad_value: int = 255, min_side: int = 0) -> np.ndarray:
    """Tile clips [N, T, H, W, 3] (uint8, or float [N, 3, T, H, W] in [0, 1]) into one video [T, H', W', 3].

    ``ncols`` clips per row (default: all in one row); a padding of ``pad`` pixels separates the tiles. Clips
    smaller than ``min_side`` are enlarged by an integer factor (nearest neighbour: pixels stay visible as such).
    """
    videos = to_uint8_video(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected [N, T, H, W, 3], got {list(videos.shape)}")
    scale = max(1, -(-min_side // max(1, min(videos.shape[2:4]))))
    if scale > 1:
        videos = videos.repeat(scale, axis=2).repeat(scale, axis=3)  # [N, T, H*s, W*s, 3]
    N, T, H, W, _ = videos.shape
    ncols = min(ncols or N, N)
    nrows = math.ceil(N / ncols)
    grid = np.full((T, pad + nrows * (H + pad), pad + ncols * (W + pad), 3), pad_value, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[:, y:y + H, x:x + W] = videos[i]
    return grid  # [T, H', W', 3]
