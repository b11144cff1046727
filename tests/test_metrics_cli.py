"""`nbp fvd REAL GEN` on folders of real video files, feature files and statistics files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nbp.cli import main
from nbp.data.video_io import read_clip, write_video
from nbp.metrics.detector import cached_i3d_weights
from nbp.metrics.fvd import feature_stats, frechet_distance, fvd_features_of_clips, save_stats


def _videos(folder: Path, n: int, seed: int, moving: bool) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        v = np.zeros((18, 32, 32, 3), np.uint8)
        v[...] = rng.integers(0, 60, size=3, dtype=np.uint8)
        y, x = rng.integers(0, 20, size=2)
        for f in range(18):
            dy, dx = (f, f) if moving else (0, 0)
            color = (255, 200, 40) if moving else rng.integers(150, 256, size=3)  # static squares flicker instead
            v[f, (y + dy) % 24:(y + dy) % 24 + 8, (x + dx) % 24:(x + dx) % 24 + 8] = color
        write_video(folder / f"clip{i}.mp4", v, fps=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fvd_cli")
    _videos(root / "real", 2, seed=0, moving=True)  # two videos a side: the fewest a covariance allows, and fast
    _videos(root / "gen" / "sub", 2, seed=1, moving=False)  # found recursively
    return root, cached_i3d_weights()


def test_fvd_on_folders_feature_and_stats_files(folders, capsys):
    root, weights = folders
    out = root / "fvd.json"
    rc = main(["fvd", str(root / "real"), str(root / "gen"), "--weights", str(weights), "--device", "cpu",
               "--batch-size", "2", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert "FVD" in capsys.readouterr().out
    assert result["real"] == {"path": str(root / "real"), "kind": "videos", "n": 2}
    assert result["gen"]["n"] == 2 and result["frames"] == 16 and result["sampling"] == "first"
    # the same number from the API on the decoded clips
    real = np.stack([read_clip(p, 16, start="first") for p in sorted((root / "real").glob("*.mp4"))])
    gen = np.stack([read_clip(p, 16, start="first") for p in sorted((root / "gen" / "sub").glob("*.mp4"))])
    fr, fg = fvd_features_of_clips(real, weights=weights), fvd_features_of_clips(gen, weights=weights)
    assert result["fvd"] == pytest.approx(frechet_distance(fr, fg), rel=1e-4)
    assert result["fvd"] > 1.0
    # feature and statistics files give the same number without touching the I3D
    np.save(root / "real_feats.npy", fr)
    save_stats(root / "gen_stats.npz", fg)
    rc = main(["fvd", str(root / "real_feats.npy"), str(root / "gen_stats.npz"), "--out", str(root / "f.json")])
    assert rc == 0
    result2 = json.loads((root / "f.json").read_text())
    assert result2["fvd"] == pytest.approx(frechet_distance(fr, fg), rel=1e-9)
    assert (result2["real"]["kind"], result2["gen"]["kind"]) == ("features", "stats")
    mu, sigma = feature_stats(fr)
    assert np.isfinite(mu).all() and sigma.shape == (400, 400)


def test_fvd_cli_errors(folders, tmp_path, capsys):
    root, weights = folders
    (tmp_path / "empty").mkdir()
    assert main(["fvd", str(tmp_path / "empty"), str(root / "gen"), "--weights", str(weights)]) == 1
    assert "no videos" in capsys.readouterr().err
    assert main(["fvd", str(root / "real"), str(root / "gen"), "--frames", "20", "--weights", str(weights)]) == 1
    assert "too short" in capsys.readouterr().err
    assert main(["fvd", str(root / "real"), str(tmp_path / "nope.npz")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["fvd", str(root / "real"), str(root / "gen"), "--num-videos", "3", "--weights", str(weights)]) == 1
    assert "--num-videos asks for 3" in capsys.readouterr().err
