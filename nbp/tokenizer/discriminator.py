"""PatchGAN discriminators for tokenizer training (hinge loss in ``losses.py``).

Two variants, one module (``time_kernel`` decides):

- ``frame2d`` (``time_kernel=1``): a per-frame 2-D PatchGAN, written as Conv3d with kernels (1, 4, 4) so frames
  stay in place (no [B*T, C, H, W] copy). It judges texture and sharpness of each frame, which is what an L1/L2
  reconstruction loss blurs; it costs about a third of the 3-D variant, so it is the choice for the CPU-sized
  embedded experiment, where temporal artefacts are small (8 fps, slow rigid motion, a causal decoder that already
  sees the past).
- ``patch3d`` (``time_kernel=3``): a 3-D PatchGAN (kernels (3, 4, 4)) whose patches span 3 frames at each level, so
  it also penalises flicker and temporal inconsistency; used for the UCF-101 / K600 runs (as MAGVIT-v2's
  StyleGAN-style 3-D discriminator judges whole clips).

Both are the pix2pix layout (conv s2, LeakyReLU 0.2, then strided conv + norm + LeakyReLU, then stride-1 layers,
a 1-channel patch map). Normalisation is per-frame GroupNorm instead of BatchNorm: no running statistics, no
dependence on the batch composition (real and fake go through in one concatenated batch) and nothing to
synchronise under DDP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp.tokenizer.model import FrameGroupNorm


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, time_kernel: int = 1, groups: int = 8):
        super().__init__()
        tk, tp = time_kernel, time_kernel // 2
        convs, norms = [nn.Conv3d(in_channels, channels, (tk, 4, 4), stride=(1, 2, 2), padding=(tp, 1, 1))], [None]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2**i, 8)
            stride = (1, 2, 2) if i < layers else (1, 1, 1)
            convs.append(nn.Conv3d(c, c_next, (tk, 4, 4), stride=stride, padding=(tp, 1, 1), bias=False))
            norms.append(FrameGroupNorm(min(groups, c_next), c_next))
            c = c_next
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList([n if n is not None else nn.Identity() for n in norms])
        self.head = nn.Conv3d(c, 1, (tk, 4, 4), stride=1, padding=(tp, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video float [B, 3, T, H, W] in [0, 1] -> patch logits [B, 1, T, H', W']."""
        x = video * 2 - 1
        for conv, norm in zip(self.convs, self.norms):
            x = F.leaky_relu(norm(conv(x)), 0.2)
        return self.head(x)


def build_discriminator(kind: str, channels: int = 64, layers: int = 3) -> PatchDiscriminator | None:
    if kind == "none":
        return None
    if kind not in ("frame2d", "patch3d"):
        raise ValueError(f"unknown discriminator {kind!r}")
    return PatchDiscriminator(channels=channels, layers=layers, time_kernel=1 if kind == "frame2d" else 3)
