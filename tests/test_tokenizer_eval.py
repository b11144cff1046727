"""eval_tokenizer: metrics against an independent computation, codebook statistics, the input/reconstruction grid."""

import json

import numpy as np
import pytest
import torch
from test_tokenizer_train import PARAMS, _quiet, make_clip_cache, overrides  # noqa: F401 (_quiet: autouse fixture)

from nbp.config import load_config
from nbp.tokenizer import load_tokenizer
from nbp.tokenizer.evaluate import codebook_stats, run_eval_tokenizer
from nbp.tokenizer.train import run_train_tokenizer


def test_codebook_stats_known_answers():
    assert codebook_stats(np.array([2, 2, 0, 0])) == (0.5, pytest.approx(2.0))
    assert codebook_stats(np.array([5, 0, 0, 0, 0])) == (0.2, pytest.approx(1.0))
    usage, ppl = codebook_stats(np.array([1, 1, 1, 1, 1, 1, 1, 1]))
    assert usage == 1.0 and ppl == pytest.approx(8.0)


class FakeI3D(torch.nn.Module):
    """Stands in for the Kinetics I3D (its own tests live with the metrics): per-channel mean and std as features."""

    def forward(self, x, return_features=False):
        assert x.shape[1:] == (3, 16, 224, 224) and x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5  # bilinear: float rounding only
        return torch.cat([x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4)), x[:, :, :, ::16, ::16].flatten(2).mean(2) ** 2], 1)


def _reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of Wang et al. (2004) written plainly: an 11x11 Gaussian window (sigma 1.5) via scipy, the valid part of
    each map (5 pixels in from every edge), K1 = 0.01, K2 = 0.03, range 1; averaged over channels, frames and clips."""
    from scipy.ndimage import gaussian_filter

    def blur(img):
        return gaussian_filter(img, 1.5, truncate=5 / 1.5, mode="reflect")[5:-5, 5:-5]

    c1, c2, maps = 0.01**2, 0.03**2, []
    for clip_a, clip_b in zip(a.astype(np.float64), b.astype(np.float64)):  # [3, T, H, W] each
        for c in range(clip_a.shape[0]):
            for t in range(clip_a.shape[1]):
                x, y = clip_a[c, t], clip_b[c, t]
                mx, my = blur(x), blur(y)
                vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
                maps.append(((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(maps))


def test_eval_tokenizer_metrics_and_grid(tmp_path, monkeypatch):
    import nbp.metrics.fvd as fvd
    from nbp.metrics.detector import I3D_FILENAME

    out = tmp_path / "out"
    make_clip_cache(out / "prepare" / "embedded", n_train=4, n_val=6, frames=17)
    (out / "fetch_detector").mkdir(parents=True)
    (out / "fetch_detector" / I3D_FILENAME).write_bytes(b"stand-in")
    monkeypatch.setattr(fvd, "get_i3d", lambda weights=None, device="cpu": FakeI3D())
    o = overrides(out, steps=2, disc="none")
    o.update({"prepare.embedded.frames": 17, "eval_tokenizer.embedded.num_videos": 5, "eval_tokenizer.embedded.batch_size": 2,
              "eval_tokenizer.embedded.grid_videos": 3})
    cfg = load_config(PARAMS, o)
    run_train_tokenizer(cfg, "embedded")
    run_eval_tokenizer(cfg, "embedded")

    m = json.loads((out / "eval_tokenizer" / "embedded" / "metrics.json").read_text())
    assert m["num_videos"] == 5 and m["lpips"] is None and m["latent_grid"] == [5, 4, 4] and m["vocab_size"] == 1000
    # independent recomputation: reconstructions rounded to uint8, per-frame PSNR averaged over frames and clips
    tok = load_tokenizer(out / "train_tokenizer" / "embedded" / "tokenizer.pt")
    real = np.load(out / "prepare" / "embedded" / "val" / "clips.npy")[:5]
    x = torch.from_numpy(real).permute(0, 4, 1, 2, 3).float() / 255
    with torch.no_grad():
        codes = tok.encode_codes(x)
        rec = (tok.decode_codes(codes) * 255).round() / 255
    mse = ((rec.double() - x.double()) ** 2).mean(dim=(1, 3, 4))  # [N, T]
    assert m["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    counts = np.bincount(codes.flatten().numpy(), minlength=1000)
    assert (m["codebook_usage"], m["perplexity"]) == pytest.approx(codebook_stats(counts))
    feats = FakeI3D()(fvd.preprocess(torch.cat([x, rec]), 16, resolution=16)).numpy()
    assert m["rfvd"] == pytest.approx(fvd.frechet_distance(feats[:5], feats[5:]), rel=1e-4)
    assert m["ssim"] == pytest.approx(_reference_ssim(x.numpy(), rec.numpy()), rel=1e-5)

    from nbp.data.video_io import read_video

    grid = read_video(out / "eval_tokenizer" / "embedded" / "recon.mp4")
    # 3 of the 5 clips, spread evenly (0, 2, 4), enlarged 4x to 64 pixels (nearest neighbour)
    assert grid.shape[0] == 17 and grid.shape[1] == 2 + 2 * (64 + 2) and grid.shape[2] == 2 + 3 * (64 + 2)
    big = real.repeat(4, axis=2).repeat(4, axis=3).astype(float)
    for col, clip in enumerate((0, 2, 4)):  # top row: inputs (h264 is lossy: compare loosely)
        x0 = 2 + col * 66
        assert np.abs(grid[:, 2:66, x0:x0 + 64] - big[clip]).mean() < 12
    assert (out / "eval_tokenizer" / "embedded" / "recon.gif").stat().st_size > 0
