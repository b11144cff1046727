"""PSNR, SSIM, LPIPS on [..., 3, T, H, W] videos in [0, 1]: known answers and an independent SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from nbp.errors import NbpError
from nbp.metrics.image import _VGG_CONVS, lpips, lpips_or_none, psnr, ssim


def _video(shape=(2, 3, 4, 16, 16), seed=0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.9


def test_psnr_known_answers():
    a = _video()
    assert psnr(a, a).shape == (2,) and torch.isinf(psnr(a, a)).all()
    torch.testing.assert_close(psnr(a, a + 0.1), torch.full((2,), 20.0))  # MSE 0.01 -> 20 dB
    b = a.clone()
    b[0, :, 1] += 0.01  # one of four frames of video 0 at 40 dB, the others identical -> inf mean
    assert torch.isinf(psnr(a, b)[0])
    b = a + torch.tensor([0.1, 0.01, 0.1, 0.1]).view(1, 1, 4, 1, 1)  # per-frame 20, 40, 20, 20 dB
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 25.0))
    torch.testing.assert_close(psnr(a[0], a[0] + 0.1), torch.tensor(20.0))  # a single video [3, T, H, W]


def test_ssim_known_answers():
    a = _video()
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    # constant frames: only the luminance term is left, (2 m1 m2 + c1) / (m1^2 + m2^2 + c1)
    x, y = torch.full((3, 2, 12, 12), 0.2), torch.full((3, 2, 12, 12), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert float(ssim(x, y)) == pytest.approx(expected, rel=1e-6)
    assert float(ssim(a, 1 - a).mean()) < 0.2
    with pytest.raises(NbpError, match="smaller than"):
        ssim(torch.zeros(3, 2, 8, 8), torch.zeros(3, 2, 8, 8))
    with pytest.raises(NbpError, match="shapes differ"):
        ssim(torch.zeros(3, 2, 16, 16), torch.zeros(3, 3, 16, 16))


def _ssim_numpy(x: np.ndarray, y: np.ndarray) -> float:
    """Independent SSIM of one [3, H, W] frame: 2-D Gaussian window, 'valid' convolution, scipy."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for a, b in zip(x, y):
        f = lambda z: convolve2d(z, w, mode="valid")  # noqa: E731
        ma, mb = f(a), f(b)
        va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
        vals.append((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(vals))


def test_ssim_matches_independent_numpy():
    a = _video((3, 2, 24, 20), seed=1)
    b = (a + 0.15 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    expected = np.mean([_ssim_numpy(a[:, t].double().numpy(), b[:, t].double().numpy()) for t in range(2)])
    assert float(ssim(a, b)) == pytest.approx(expected, rel=1e-6)


def test_lpips_unavailable_is_clear(monkeypatch):
    monkeypatch.delenv("NBP_LPIPS_VGG", raising=False)
    monkeypatch.delenv("NBP_LPIPS_LIN", raising=False)
    a = _video()
    with pytest.raises(NbpError, match="LPIPS weights unavailable"):
        lpips(a, a)
    assert lpips_or_none(a, a) is None
    with pytest.raises(NbpError, match="LPIPS weights unavailable: NBP_LPIPS_VGG"):
        lpips(a, a, vgg="/nonexistent/vgg16.pth", lin="/nonexistent/vgg.pth")


@pytest.fixture
def lpips_files(tmp_path):
    """Random weights saved in the two documented formats (torchvision VGG16 state dict, LPIPS v0.1 heads)."""
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for i, cin, cout in _VGG_CONVS:
        vgg[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        vgg[f"features.{i}.bias"] = torch.zeros(cout)
    vgg["classifier.0.weight"] = torch.zeros(1)  # other torchvision keys are ignored
    lin = {f"lin{j}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for j, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    return tmp_path / "vgg16.pth", tmp_path / "vgg.pth"


def test_lpips_with_weights(lpips_files, monkeypatch):
    vgg, lin = lpips_files
    a, b = _video((2, 3, 2, 16, 16), seed=3), _video((2, 3, 2, 16, 16), seed=4)
    d_aa = lpips(a, a, vgg=vgg, lin=lin)
    assert d_aa.shape == (2,) and torch.all(d_aa.abs() < 1e-6)
    d_ab = lpips(a, b, vgg=vgg, lin=lin)
    assert torch.all(d_ab > 0)
    torch.testing.assert_close(lpips(b, a, vgg=vgg, lin=lin), d_ab)
    # per-frame mean: the distance of a video equals the mean over its frames
    per_frame = torch.stack([lpips(a[:, :, t:t + 1], b[:, :, t:t + 1], vgg=vgg, lin=lin) for t in range(2)]).mean(0)
    torch.testing.assert_close(d_ab, per_frame)
    monkeypatch.setenv("NBP_LPIPS_VGG", str(vgg))
    monkeypatch.setenv("NBP_LPIPS_LIN", str(lin))
    assert lpips_or_none(a, b) == pytest.approx(float(d_ab.mean()))


def test_lpips_wrong_files(lpips_files, tmp_path):
    vgg, lin = lpips_files
    a = _video((1, 3, 1, 16, 16))
    with pytest.raises(NbpError, match="lin0.model.1.weight"):
        lpips(a, a, vgg=vgg, lin=vgg)
    with pytest.raises(NbpError, match="features.0.weight"):
        lpips(a, a, vgg=lin, lin=lin)
