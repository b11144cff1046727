"""FVD sanity check on a prepared dataset: two disjoint halves of real clips vs real vs shuffled-frame clips.

The real clips of a split are cut into two halves by source video (alternating within each class, so no video is on
both sides). FVD(half A, half B) is the floor a perfect generator would reach at this sample size; FVD(half A,
half B with its frames shuffled in time) shows that the detector sees motion, not just appearance.

    nbp download embedded && nbp prepare embedded && nbp fetch_detector
    python benchmarks/fvd_sanity.py                     # out/prepare/embedded/train -> out/fvd_sanity/embedded/
    nbp fvd out/fvd_sanity/embedded/half_a_features.npy out/fvd_sanity/embedded/half_b_features.npy

Writes ``half_a.npy``, ``half_b.npy``, ``half_b_shuffled.npy`` (uint8 clips, usable with ``nbp fvd``), their I3D
features (``*_features.npy``) and ``fvd.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from nbp.data.clips import ClipCache
from nbp.metrics.fvd import frechet_distance, fvd_features_of_clips


def halves(cache: ClipCache) -> tuple[np.ndarray, np.ndarray]:
    """Clip indices of two video-disjoint halves, balanced per class."""
    vids = np.asarray(cache.video_ids)
    a, b = [], []
    for label in np.unique(cache.labels):
        videos = sorted(set(vids[cache.labels == label]))
        for k, v in enumerate(videos):
            (a if k % 2 == 0 else b).extend(np.flatnonzero(vids == v).tolist())
    return np.sort(a), np.sort(b)


def shuffle_frames(clips: np.ndarray, seed: int) -> np.ndarray:
    """Each clip's frames in a random temporal order (its own permutation)."""
    rng = np.random.default_rng(seed)
    return np.stack([c[rng.permutation(len(c))] for c in clips])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="out/prepare/embedded", help="a prepared dataset folder")
    p.add_argument("--split", default="train")
    p.add_argument("--out", default="out/fvd_sanity/embedded")
    p.add_argument("--resolution", type=int, default=64, help="score at this size (the embedded real_stats protocol)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cache = ClipCache(a.root, a.split)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ia, ib = halves(cache)
    sets = {"half_a": cache.batch(ia), "half_b": cache.batch(ib)}
    sets["half_b_shuffled"] = shuffle_frames(sets["half_b"], a.seed)
    feats, t0 = {}, time.time()
    for name, clips in sets.items():
        np.save(out / f"{name}.npy", clips)
        feats[name] = fvd_features_of_clips(clips, resolution=a.resolution, batch_size=a.batch_size, device=a.device)
        np.save(out / f"{name}_features.npy", feats[name])
    result = {
        "dataset": a.root, "split": a.split, "clips_a": len(ia), "clips_b": len(ib), "resolution": a.resolution,
        "frames": 16, "fvd_real_halves": frechet_distance(feats["half_a"], feats["half_b"]),
        "fvd_real_vs_shuffled": frechet_distance(feats["half_a"], feats["half_b_shuffled"]),
        "fvd_half_b_vs_its_shuffle": frechet_distance(feats["half_b"], feats["half_b_shuffled"]),
        "extract_seconds": round(time.time() - t0, 1),
    }
    (out / "fvd.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
