"""Fréchet distance known answers, statistics files, FVD preprocessing and batching (no I3D needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nbp.errors import NbpError
from nbp.metrics.fvd import (
    choose_clips,
    extract_features,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    load_stats,
    preprocess,
    save_stats,
    stats_info,
)


def _sets(n=400, d=12, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.7 + rng.normal(size=d)
    return a, b


def _fd_by_eigh(a: np.ndarray, b: np.ndarray) -> float:
    """Independent: tr sqrt(S1 S2) = sum sqrt(eig(R S2 R)) with R = S1^(1/2) from a symmetric eigendecomposition."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r @ s2 @ r)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def test_identical_sets_give_zero():
    a, _ = _sets()
    assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_shift_adds_squared_norm():
    a, b = _sets()
    d = np.array([0.5, -1.0, 2.0] + [0.25] * 9)
    assert frechet_distance(a, a + d) == pytest.approx(float(d @ d), rel=1e-9, abs=1e-8)
    # shifting one set moves only the mean term: |mu_b + d - mu_a|^2 replaces |mu_b - mu_a|^2
    dm = b.mean(0) - a.mean(0)
    expected = frechet_distance(a, b) + float((dm + d) @ (dm + d) - dm @ dm)
    assert frechet_distance(a, b + d) == pytest.approx(expected, rel=1e-9)


def test_equals_independent_eigendecomposition_and_is_symmetric():
    a, b = _sets()
    fd = frechet_distance(a, b)
    assert fd > 1.0
    assert fd == pytest.approx(_fd_by_eigh(a, b), rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-9)


def test_zero_covariance_known_answer():
    """A set of identical vectors has S = 0, so FVD = |mu1 - mu2|^2 + tr(S2) exactly."""
    _, b = _sets()
    a = np.tile(np.arange(12.0), (5, 1))
    expected = float(((a[0] - b.mean(0)) ** 2).sum() + np.trace(np.cov(b, rowvar=False)))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_singular_covariances_are_handled():
    """Fewer samples than dimensions (as with a few hundred clips vs 400 logits): rank-deficient covariances."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 60)), rng.normal(size=(12, 60)) + 0.3
    fd = frechet_distance(a, b)
    assert np.isfinite(fd)
    assert fd == pytest.approx(_fd_by_eigh(a, b), rel=1e-3)
    assert frechet_distance(b, a) == pytest.approx(fd, rel=1e-3)


def test_large_imaginary_part_raises():
    """A 'covariance' with a negative eigenvalue makes sqrt(S1 S2) complex: that is an error, not a number."""
    mu = np.zeros(2)
    with pytest.raises(NbpError, match="imaginary"):
        frechet_distance_from_stats(mu, np.diag([1.0, -1.0]), mu, np.eye(2))


def test_bad_inputs_raise():
    with pytest.raises(NbpError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(NbpError, match="differ"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(NbpError, match="do not match"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_roundtrip(tmp_path):
    a, b = _sets()
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False, ddof=1))
    save_stats(tmp_path / "stats.npz", a, frames=16, resolution=64, split="train")
    mu2, sigma2 = load_stats(tmp_path / "stats.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    info = stats_info(tmp_path / "stats.npz")
    assert (info["n"], info["frames"], info["resolution"], info["split"]) == (400, 16, 64, "train")
    assert frechet_distance_from_stats(mu2, sigma2, *feature_stats(b)) == pytest.approx(frechet_distance(a, b), rel=1e-12)
    with pytest.raises(NbpError, match="not found"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", m=np.zeros(3))
    with pytest.raises(NbpError, match="'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")


def test_preprocess_values_frames_and_sizes():
    clips = np.zeros((2, 20, 8, 8, 3), np.uint8)
    clips[:, :, :, :, 0] = np.arange(20, dtype=np.uint8)[None, :, None, None] * 10  # red = 10 * frame index
    clips[1, :, :, :, 1] = 255
    x = preprocess(clips)
    assert x.shape == (2, 3, 16, 224, 224)
    # values: 0 -> -1, 255 -> 1; frame i keeps its red value (constant frames survive the resize exactly)
    np.testing.assert_allclose(x[0, 0, :, 100, 100].numpy(), np.arange(16) * 10 / 127.5 - 1, atol=1e-6)
    assert torch.all(x[0, 1] == -1) and torch.all(x[1, 1] == 1)
    xc = preprocess(clips, sampling="center")  # frames 2..17
    np.testing.assert_allclose(xc[0, 0, :, 0, 0].numpy(), (np.arange(16) + 2) * 10 / 127.5 - 1, atol=1e-6)
    # float [B, 3, T, H, W] in [0, 1] gives the same as uint8
    xf = preprocess(torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255)
    torch.testing.assert_close(xf, x)
    with pytest.raises(NbpError, match="needs 16"):
        preprocess(clips[:, :10])


def test_preprocess_resolution_is_bilinear_in_two_steps():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, size=(1, 16, 32, 32, 3), dtype=np.uint8)
    x = preprocess(clips, resolution=16)
    frames = torch.from_numpy(clips[0]).permute(0, 3, 1, 2).float() / 255  # [T, 3, 32, 32]
    ref = F.interpolate(F.interpolate(frames, size=(16, 16), mode="bilinear", align_corners=False),
                        size=(224, 224), mode="bilinear", align_corners=False) * 2 - 1  # [T, 3, 224, 224]
    torch.testing.assert_close(x[0].transpose(0, 1), ref)
    assert not torch.allclose(preprocess(clips), x)  # scoring at 16 loses detail


class _MeanModel(torch.nn.Module):
    """A stand-in detector: per-channel mean and per-frame means of channel 0 -> [B, 3 + T]."""

    def forward(self, x, return_features=False):
        return torch.cat([x.mean(dim=(2, 3, 4)), x[:, 0].mean(dim=(2, 3))], dim=1)


def test_extract_features_batches_in_order():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, size=(5, 16, 8, 8, 3), dtype=np.uint8)
    model = _MeanModel()
    full = model(preprocess(clips)).numpy()
    for bs in (2, 8):
        np.testing.assert_allclose(extract_features(clips, model, batch_size=bs), full, atol=1e-6)
    batches = (clips[i:i + 2] for i in range(0, 5, 2))  # an iterable of batches works too
    np.testing.assert_allclose(extract_features(batches, model), full, atol=1e-6)


def test_choose_clips_prefers_distinct_videos():
    vids = ["a", "a", "b", "b", "c", "c", "d"]
    picked = choose_clips(vids, 4, seed=0)
    assert len(picked) == 4 and len({vids[i] for i in picked}) == 4
    assert list(picked) == sorted(picked)
    np.testing.assert_array_equal(picked, choose_clips(vids, 4, seed=0))
    assert len(set(choose_clips(vids, 6, seed=3))) == 6
    np.testing.assert_array_equal(choose_clips(vids, 10, seed=0), np.arange(7))
