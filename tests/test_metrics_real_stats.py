"""The real_stats stage on a small clip cache written here in the documented prepare format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbp import dag
from nbp.config import load_config
from nbp.errors import NbpError
from nbp.metrics.detector import I3D_FILENAME, cached_i3d_weights
from nbp.metrics.fvd import feature_stats, fvd_features_of_clips, load_stats, stats_info
from nbp.metrics.real_stats import run_real_stats

REPO = Path(__file__).resolve().parents[1]


def moving_squares(n: int, t: int = 17, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 [n, t, size, size, 3]: a coloured square per clip moving with its own velocity."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, t, size, size, 3), np.uint8)
    out[...] = rng.integers(0, 80, size=(n, 1, 1, 1, 3), dtype=np.uint8)
    for i in range(n):
        y, x = rng.integers(0, size // 2, size=2)
        vy, vx = rng.integers(-2, 3, size=2)
        color = rng.integers(120, 256, size=3)
        for f in range(t):
            y0, x0 = (y + vy * f) % (size - 8), (x + vx * f) % (size - 8)
            out[i, f, y0:y0 + 8, x0:x0 + 8] = color
    return out


def write_clip_cache(root: Path, split: str, clips: np.ndarray, videos: list[str]) -> None:
    """The `prepare` output contract: classes.json, {split}/clips.npy, {split}/manifest.csv."""
    (root / split).mkdir(parents=True, exist_ok=True)
    classes = [{"label": 0, "name": "MovingSquare", "text": "moving square"}]
    (root / "classes.json").write_text(json.dumps(classes))
    np.save(root / split / "clips.npy", clips)
    pd.DataFrame({"clip": range(len(clips)), "video": videos, "label": 0, "class_name": "MovingSquare",
                  "class_text": "moving square", "fps": 8.0, "num_frames": 40, "start": 0}).to_csv(
        root / split / "manifest.csv", index=False)


@pytest.fixture
def pipeline(tmp_path):
    out = tmp_path / "out"
    clips = moving_squares(5)
    write_clip_cache(out / "prepare" / "embedded", "train", clips, ["v0", "v0", "v1", "v2", "v2"])
    (out / "fetch_detector").mkdir(parents=True)
    shutil.copyfile(cached_i3d_weights(), out / "fetch_detector" / I3D_FILENAME)
    cfg = load_config(REPO / "params.yaml", overrides={
        "run.out": str(out), "run.device": "cpu",
        "real_stats.embedded": {"dataset": "embedded", "split": "train", "num_videos": 3, "resolution": 32, "batch_size": 2}})
    return cfg, clips


def test_real_stats_stage(pipeline):
    cfg, clips = pipeline
    out = run_real_stats(cfg, "embedded")
    assert out == Path(dag.folder(cfg, "real_stats", "embedded"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n"] == 3 and meta["frames"] == 16 and meta["resolution"] == 32
    picked = meta["clips"]
    assert len({["v0", "v0", "v1", "v2", "v2"][i] for i in picked}) == 3  # one clip per source video
    feats = np.load(out / "features.npy")
    assert feats.shape == (3, 400) and feats.dtype == np.float32
    # the stage's features are the API's features of the chosen clips (first 16 of 17 frames)
    direct = fvd_features_of_clips(clips[picked], resolution=32, batch_size=3)
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-4)
    mu, sigma = load_stats(out / "stats.npz")
    mu2, sigma2 = feature_stats(feats)
    np.testing.assert_allclose(mu, mu2)
    np.testing.assert_allclose(sigma, sigma2)
    info = stats_info(out / "stats.npz")
    assert info["n"] == 3 and info["split"] == "train" and info["dataset"] == "embedded"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_real_stats_needs_the_detector(pipeline):
    cfg, _ = pipeline
    (Path(dag.folder(cfg, "fetch_detector", None)) / I3D_FILENAME).unlink()
    with pytest.raises(NbpError, match="fetch_detector"):
        run_real_stats(cfg, "embedded")
    assert not Path(dag.folder(cfg, "real_stats", "embedded")).exists()
