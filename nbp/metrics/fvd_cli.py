"""``nbp fvd REAL GEN``: FVD between two sets of videos, as a user scores any model's samples.

Each side is a folder of videos (mp4, avi, webm, mkv, mov, gif; searched recursively, sorted by path), a
``.npz`` statistics file (``mu``, ``sigma``, e.g. ``out/real_stats/ucf101/stats.npz``), a ``.npy`` feature file
[N, 400], or a ``.npy`` uint8 clip array [N, T, H, W, 3].
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nbp.data.video_io import read_clip
from nbp.distributed import resolve_device
from nbp.errors import NbpError
from nbp.io import load_array, write_json
from nbp.metrics.fvd import (
    extract_features,
    feature_stats,
    frechet_distance_from_stats,
    get_i3d,
    resize_clips,
    stats_info,
    to_float_clips,
)

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".gif")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("real", help="real videos: a folder of videos, stats .npz, features .npy or clips .npy")
    parser.add_argument("gen", help="generated videos: same kinds as REAL")
    parser.add_argument("--num-videos", type=int, default=None, help="use the first N videos of each folder (default: all)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip scored by the I3D (default: 16)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize frames to RxR before the I3D's 224 resize (the K600 protocol scores at 64)")
    parser.add_argument("--sampling", choices=["first", "center"], default="first",
                        help="which frames of each video: the first ones (default) or the centre ones")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per I3D forward pass (default: 8)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--weights", default=None,
                        help="i3d-kinetics-400.ckpt (default: $NBP_I3D_WEIGHTS, out/fetch_detector, the user cache)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


def list_videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def _stack(clips: list[np.ndarray], paths: list[Path], resolution: int | None):
    """uint8 clips of one size -> [b, T, H, W, 3]; of mixed sizes (with --resolution) -> float [b, 3, T, R, R] in [0, 1]."""
    if all(c.shape == clips[0].shape for c in clips):
        return np.stack(clips)
    if resolution is None:
        i = next(i for i, c in enumerate(clips) if c.shape != clips[0].shape)
        raise NbpError(f"{paths[i]}: frames are {clips[i].shape[1]}x{clips[i].shape[2]}, {paths[0].name} has "
                       f"{clips[0].shape[1]}x{clips[0].shape[2]} (use --resolution to score videos of mixed sizes)")
    import torch

    return torch.cat([resize_clips(to_float_clips(c[None]), resolution) for c in clips])


def folder_batches(folder: Path, num_videos: int | None, frames: int, sampling: str, batch_size: int,
                   resolution: int | None) -> Iterator:
    """Batches of clips from the first ``num_videos`` videos of a folder (streamed: never all in memory)."""
    paths = list_videos(folder)
    if not paths:
        raise NbpError(f"{folder}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    if num_videos is not None:
        if len(paths) < num_videos:
            raise NbpError(f"{folder}: {len(paths)} videos, --num-videos asks for {num_videos}")
        paths = paths[:num_videos]
    if len(paths) < 2:
        raise NbpError(f"{folder}: {len(paths)} video, FVD needs at least 2 in each set")
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        yield _stack([read_clip(p, frames, start=sampling) for p in chunk], chunk, resolution)  # uint8 [frames, H, W, 3] each


def side_stats(src: str, args, model_fn, side: str = "videos") -> tuple[np.ndarray, np.ndarray, int, str]:
    """(mu, sigma, n, kind) of one side of the comparison (``side``: "real" or "gen", named in errors)."""
    p = Path(src)
    if not p.exists():
        raise NbpError(f"{p}: no such file or folder ({side} set)")

    def at_least_two(n: int, what: str) -> None:
        if n < 2:
            raise NbpError(f"{p}: the {side} set has {n} {what}, FVD needs at least 2 in each set")

    if p.is_dir():
        clips = folder_batches(p, args.num_videos, args.frames, args.sampling, args.batch_size, args.resolution)
        kind = "videos"
    elif p.suffix == ".npz":
        info = stats_info(p)
        if "n" in info:
            at_least_two(int(info["n"]), "videos behind its statistics")
        return np.asarray(info["mu"]), np.asarray(info["sigma"]), int(info.get("n", 0)), "stats"
    elif p.suffix == ".npy":
        arr = load_array(p, "features/clips array")
        if arr.ndim == 2:
            feats = np.asarray(arr[: args.num_videos])
            at_least_two(len(feats), "feature vectors")
            mu, sigma = feature_stats(feats)
            return mu, sigma, len(feats), "features"
        if arr.ndim != 5 or arr.dtype != np.uint8:
            raise NbpError(f"{p}: expected features [N, D] or uint8 clips [N, T, H, W, 3], got {arr.dtype} {arr.shape}")
        clips, kind = arr[: args.num_videos], "clips"
        at_least_two(len(clips), "clips")
        if clips.shape[1] < args.frames:
            raise NbpError(f"{p}: clips have {clips.shape[1]} frames, the FVD protocol (--frames) needs {args.frames}")
    else:
        raise NbpError(f"{p}: not a folder of videos, a .npz statistics file or a .npy features/clips file")
    model = model_fn()  # its own errors name the weights file
    try:
        feats = extract_features(clips, model, batch_size=args.batch_size, device=args.device_t, frames=args.frames,
                                 resolution=args.resolution, sampling=args.sampling, desc=f"I3D {p.name}")
    except NbpError as e:
        raise NbpError(f"{e} ({side} set)") from None
    mu, sigma = feature_stats(feats)
    return mu, sigma, len(feats), kind


def main(args: argparse.Namespace) -> int:
    if args.frames < 9:
        raise NbpError(f"--frames: the I3D needs at least 9 frames, got {args.frames}")
    if args.num_videos is not None and args.num_videos < 2:
        raise NbpError(f"--num-videos: FVD needs at least 2 videos, got {args.num_videos}")
    args.device_t = resolve_device(args.device)
    t0 = time.time()
    real = side_stats(args.real, args, lambda: get_i3d(args.weights, args.device_t), side="real")
    gen = side_stats(args.gen, args, lambda: get_i3d(args.weights, args.device_t), side="gen")
    fvd = frechet_distance_from_stats(real[0], real[1], gen[0], gen[1])
    result = {
        "fvd": fvd,
        "real": {"path": args.real, "kind": real[3], "n": real[2]},
        "gen": {"path": args.gen, "kind": gen[3], "n": gen[2]},
        "frames": args.frames, "resolution": args.resolution, "sampling": args.sampling,
        "detector": "i3d-kinetics-400 logits", "device": str(args.device_t), "seconds": round(time.time() - t0, 2),
    }
    print(f"FVD {fvd:.4f} (real: {real[2]} {real[3]}, gen: {gen[2]} {gen[3]})")
    if args.out:
        write_json(args.out, result)
    sys.stdout.flush()
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbp fvd", description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))


__all__ = ["add_arguments", "main"]
