"""Frame-quality metrics for tokenizer reconstructions: PSNR, SSIM, LPIPS (pure functions).

Inputs are float tensors [..., 3, T, H, W] in [0, 1] (a video, or a batch of videos). Each metric is computed per
frame and averaged over the T frames, giving one value per video: shape [...].

- PSNR: 10 log10(1 / MSE) per frame (inf for identical frames).
- SSIM: Wang et al. 2004 as ``tf.image.ssim``: 11x11 Gaussian window (sigma 1.5), VALID filtering, K1 0.01,
  K2 0.03, per channel, averaged over positions and channels.
- LPIPS (v0.1, VGG16): needs two weight files: the torchvision VGG16 ImageNet state dict (keys
  ``features.N.weight/bias``) and the LPIPS linear heads (``vgg.pth`` of the ``lpips`` package, keys
  ``lin{k}.model.1.weight``). Found as arguments, else ``NBP_LPIPS_VGG`` / ``NBP_LPIPS_LIN``, else in the
  ``fetch_lpips`` stage's folder (``folder=``, see :mod:`nbp.metrics.lpips_weights`); without them :func:`lpips`
  raises "LPIPS weights unavailable" and :func:`lpips_or_none` returns None (reported as null in metrics files).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp.checkpoint import read_torch_file
from nbp.errors import NbpError
from nbp.metrics import LPIPS_LIN_FILENAME, LPIPS_VGG_FILENAME, VGG16_CONVS


def _frames(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Check shapes; -> frames [N*T, 3, H, W] of both, and the leading shape [...]."""
    if a.shape != b.shape:
        raise NbpError(f"{name}: shapes differ: {list(a.shape)} vs {list(b.shape)}")
    if a.ndim < 4 or a.shape[-4] != 3:
        raise NbpError(f"{name}: expected float [..., 3, T, H, W], got {list(a.shape)}")
    lead = tuple(a.shape[:-4])
    C, T, H, W = a.shape[-4:]
    a = a.reshape(-1, C, T, H, W).transpose(1, 2).reshape(-1, C, H, W).double()  # [N*T, 3, H, W]
    b = b.reshape(-1, C, T, H, W).transpose(1, 2).reshape(-1, C, H, W).double()  # [N*T, 3, H, W]
    return a, b, lead + (T,)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean over frames of the per-frame PSNR in dB -> [...] (inf where every frame is identical)."""
    x, y, shape = _frames(a, b, "psnr")
    mse = (x - y).pow(2).flatten(1).mean(1)  # [N*T]
    per_frame = 10.0 * torch.log10(data_range**2 / mse)  # inf when mse == 0
    return per_frame.view(shape).mean(-1).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    return g / g.sum()  # [size]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean over frames of the per-frame SSIM -> [...] (1 for identical frames)."""
    x, y, shape = _frames(a, b, "ssim")
    H, W = x.shape[-2:]
    if H < win or W < win:
        raise NbpError(f"ssim: frames of {H}x{W} are smaller than the {win}x{win} window")
    C = x.shape[1]
    g = _gaussian_window(win, sigma).to(x.device)
    gh = g.view(1, 1, win, 1).repeat(C, 1, 1, 1)  # [C, 1, win, 1]
    gw = g.view(1, 1, 1, win).repeat(C, 1, 1, 1)  # [C, 1, 1, win]

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, VALID
        return F.conv2d(F.conv2d(z, gh, groups=C), gw, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))  # [N*T, C, H', W']
    return s.flatten(1).mean(1).view(shape).mean(-1).float()


# --------------------------------------------------------------------------------------
# LPIPS (VGG16, v0.1)

# VGG16 "features" conv indices (torchvision numbering) and the ReLU outputs LPIPS taps: relu1_2 ... relu5_3
_VGG_CONVS = list(VGG16_CONVS)
_TAPS = (2, 7, 14, 21, 28)  # conv index whose ReLU output is a tapped layer
_POOL_AFTER = (2, 7, 14, 21)  # max-pool 2x2 after these convs' ReLU
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPS(nn.Module):
    """LPIPS with a VGG16 trunk: per tapped layer, unit-normalise channels, squared difference, 1x1 head, spatial mean; sum."""

    def __init__(self):
        super().__init__()
        self.features = nn.ModuleDict({str(i): nn.Conv2d(cin, cout, 3, padding=1) for i, cin, cout in _VGG_CONVS})
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x * 2 - 1 - self.shift) / self.scale
        out = []
        for i, _, _ in _VGG_CONVS:
            x = F.relu(self.features[str(i)](x))
            if i in _TAPS:
                out.append(x)
            if i in _POOL_AFTER:
                x = F.max_pool2d(x, 2, 2)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Frames [N, 3, H, W] in [0, 1] -> distance [N]."""
        d = 0.0
        for lin, fa, fb in zip(self.lins, self.taps(a), self.taps(b)):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = d + lin((fa - fb) ** 2).mean(dim=(1, 2, 3))  # [N]
        return d


def _weight_paths(vgg: str | Path | None, lin: str | Path | None, folder: str | Path | None = None) -> tuple[Path, Path]:
    """The two files: the arguments, else the environment, else the fetch_lpips files in ``folder`` (when there)."""

    def fetched(name: str) -> Path | None:
        return Path(folder) / name if folder is not None and (Path(folder) / name).is_file() else None

    vgg = vgg or os.environ.get("NBP_LPIPS_VGG") or fetched(LPIPS_VGG_FILENAME)
    lin = lin or os.environ.get("NBP_LPIPS_LIN") or fetched(LPIPS_LIN_FILENAME)
    if not vgg or not lin:
        where = f"; {folder} has none: run `nbp fetch_lpips`" if folder is not None else ""
        raise NbpError("LPIPS weights unavailable: give the VGG16 ImageNet state dict and the LPIPS vgg.pth heads "
                       f"(NBP_LPIPS_VGG, NBP_LPIPS_LIN, or the fetch_lpips stage){where}")
    for p, what in ((vgg, "NBP_LPIPS_VGG"), (lin, "NBP_LPIPS_LIN")):
        if not Path(p).is_file():
            raise NbpError(f"LPIPS weights unavailable: {what}: {p} does not exist")
    return Path(vgg), Path(lin)


_LPIPS: dict[tuple[str, str, str], LPIPS] = {}


def load_lpips(vgg: str | Path | None = None, lin: str | Path | None = None, device: str | torch.device = "cpu",
               folder: str | Path | None = None) -> LPIPS:
    """The LPIPS network from the two weight files (tensors only, ``weights_only=True``)."""
    vgg, lin = _weight_paths(vgg, lin, folder)
    key = (str(vgg), str(lin), str(device))
    if key in _LPIPS:
        return _LPIPS[key]
    model = LPIPS()
    vsd = read_torch_file(vgg, "LPIPS VGG16 state dict (NBP_LPIPS_VGG)")
    lsd = read_torch_file(lin, "LPIPS heads file (NBP_LPIPS_LIN)")
    for p, sd_ in ((vgg, vsd), (lin, lsd)):
        if not isinstance(sd_, dict):
            raise NbpError(f"{p}: expected a state dict, got {type(sd_).__name__}")
    sd = {}
    for i, _, _ in _VGG_CONVS:
        for kind in ("weight", "bias"):
            k = f"features.{i}.{kind}"
            if k not in vsd:
                raise NbpError(f"{vgg}: missing {k} (expected a torchvision VGG16 state dict)")
            sd[f"features.{i}.{kind}"] = vsd[k]
    for j in range(5):
        k = f"lin{j}.model.1.weight"
        if k not in lsd:
            raise NbpError(f"{lin}: missing {k} (expected the LPIPS v0.1 vgg.pth)")
        sd[f"lins.{j}.weight"] = lsd[k]
    sd["shift"], sd["scale"] = model.shift, model.scale
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise NbpError(f"LPIPS weights do not fit VGG16: {str(e).splitlines()[0]}") from None
    model = model.eval().requires_grad_(False).to(device)
    _LPIPS[key] = model
    return model


def lpips(a: torch.Tensor, b: torch.Tensor, vgg: str | Path | None = None, lin: str | Path | None = None,
          batch_size: int = 64, folder: str | Path | None = None) -> torch.Tensor:
    """Mean over frames of LPIPS(VGG16) -> [...]; raises NbpError("LPIPS weights unavailable ...") without weights."""
    model = load_lpips(vgg, lin, a.device, folder)
    if a.shape != b.shape or a.ndim < 4 or a.shape[-4] != 3:
        raise NbpError(f"lpips: expected two float [..., 3, T, H, W] of equal shape, got {list(a.shape)}, {list(b.shape)}")
    C, T, H, W = a.shape[-4:]
    lead = tuple(a.shape[:-4])
    x = a.reshape(-1, C, T, H, W).transpose(1, 2).reshape(-1, C, H, W).float()  # [N*T, 3, H, W]
    y = b.reshape(-1, C, T, H, W).transpose(1, 2).reshape(-1, C, H, W).float()  # [N*T, 3, H, W]
    with torch.no_grad():
        d = torch.cat([model(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return d.view(lead + (T,)).mean(-1)


def lpips_available(vgg: str | Path | None = None, lin: str | Path | None = None,
                    folder: str | Path | None = None) -> bool:
    try:
        _weight_paths(vgg, lin, folder)
        return True
    except NbpError:
        return False


def lpips_or_none(a: torch.Tensor, b: torch.Tensor, **kw) -> float | None:
    """The mean LPIPS over all videos, or None when the weights are unavailable (a metrics file then says null)."""
    if not lpips_available(kw.get("vgg"), kw.get("lin"), kw.get("folder")):
        return None
    return float(lpips(a, b, **kw).mean())
