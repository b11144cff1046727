"""Tokenizer training losses: reconstruction, perceptual (I3D features or LPIPS-VGG16), hinge GAN, LeCam,
and the VQGAN adaptive generator weight."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp.errors import NbpError
from nbp.metrics.i3d import load_i3d
from nbp.metrics.image import load_lpips


def recon_loss(x: torch.Tensor, y: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    return F.l1_loss(y, x) if kind == "l1" else F.mse_loss(y, x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN: ||d rec / d w_last|| / (||d g / d w_last|| + 1e-4), clamped to [0, max_weight], no gradient."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_gan.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al. 2021): keeps D's outputs near the EMA of the other side's outputs."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> None:
        self.ema_real.mul_(self.decay).add_(real_logits.float().mean(), alpha=1 - self.decay)
        self.ema_fake.mul_(self.decay).add_(fake_logits.float().mean(), alpha=1 - self.decay)

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        return (F.relu(real_logits - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake_logits).pow(2).mean())


# --------------------------------------------------------------------------------------
# perceptual losses


class I3DPerceptual(nn.Module):
    """Distance between the Kinetics-400 I3D's pooled Mixed_5c features (and logits) of real and reconstructed clips.

    Frames are resized to 224x224 and scaled to [-1, 1] (the FVD detector's input); clips shorter than the
    I3D's 9-frame minimum are repeated in time. The detector is frozen (no gradient to its weights).
    """

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        super().__init__()
        self.i3d = load_i3d(weights, device=device)
        self.i3d.requires_grad_(False)

    def _features(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, C, T, H, W = video.shape
        if T < 9:
            video = video.repeat(1, 1, -(-9 // T), 1, 1)[:, :, : max(9, T)]
        x = F.interpolate(video, size=(video.shape[2], 224, 224), mode="trilinear", align_corners=False)
        return self.i3d(x * 2 - 1, return_features=True)

    def forward(self, real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            lr, fr = self._features(real)
        lf, ff = self._features(recon)
        return F.mse_loss(ff, fr) + F.mse_loss(lf, lr) / lr.shape[1] ** 0.5


def build_perceptual(kind: str, device: torch.device, i3d_weights: str | Path | None = None,
                     lpips_folder: str | Path | None = None) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "i3d":
        return I3DPerceptual(i3d_weights, device=device)
    if kind == "lpips":
        return LPIPSPerceptual(device, lpips_folder)
    raise ValueError(f"unknown perceptual loss {kind!r}")


class LPIPSPerceptual(nn.Module):
    """LPIPS-VGG16 per frame (``nbp.metrics.image``'s network, frozen); its weight files must be present
    (``NBP_LPIPS_VGG`` / ``NBP_LPIPS_LIN``, or in the fetch_lpips stage's ``folder``), else an NbpError says so:
    use ``perceptual: i3d`` or ``none``."""

    def __init__(self, device: str | torch.device = "cpu", folder: str | Path | None = None):
        super().__init__()
        try:
            self.net = load_lpips(device=device, folder=folder)
        except NbpError as e:
            raise NbpError(f"train_tokenizer perceptual 'lpips': {e}; or choose perceptual: i3d / none") from None

    def forward(self, real: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = real.shape
        a = real.transpose(1, 2).reshape(B * T, C, H, W)  # [B*T, 3, H, W]
        b = recon.transpose(1, 2).reshape(B * T, C, H, W)  # [B*T, 3, H, W]
        return self.net(a, b).mean()
