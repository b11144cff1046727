"""Causal 3-D CNN video tokenizer (MAGVIT-v2 reproduction, NBP.md section 4) with an FSQ bottleneck.

Layout: videos are ``[B, C, T, H, W]`` (contiguous, channels in dim 1) in every layer; nothing is permuted
between layers. Group norm is taken per frame by a reshape (``[B, G, C/G, T, H*W]``, statistics over C/G and
H*W; ``norm: pixel`` takes them over C alone at each position), not by folding time into the batch, so no layer
copies its input to change layout; the only data
movement besides the convolutions is the replicate padding of each causal convolution and the depth-to-space
shuffle of the decoder's up-sampling.

Encoder (stage widths ``w_i = channels * channel_mult[i]``)::

    CausalConv3d(3 -> w_0); for each stage i: enc_res[i] x Res(-> w_i), then (all but the last stage)
    CausalConv3d(w_i -> w_i, stride (2 if temporal_down[i] else 1, 2, 2)); GroupNorm; Swish; Conv3d(w_last -> D, k1)

Decoder (the mirror)::

    CausalConv3d(D -> w_last); for each stage j (deepest first): dec_res[j] x Res(-> w), then (all but the last)
    CausalConv3d(w -> w * ft*2*2), DepthToSpace(ft, 2, 2); GroupNorm; Swish; CausalConv3d(w_0 -> 3)

The ``base`` preset is the released architecture exactly (17x128x128 -> 5x16x16, FSQ [8,8,8,5,5,5]); its module
order matches the released ``encoder_layers.N`` / ``decoder_layers.N`` indices (see ``released.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp.tokenizer.fsq import FSQ

NORMS = ("frame", "pixel")


@dataclass(frozen=True)
class TokenizerConfig:
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    enc_res: tuple[int, ...] = (4, 4, 4, 8)  # residual units per encoder stage (shallow -> deep)
    dec_res: tuple[int, ...] = (8, 4, 4, 4)  # residual units per decoder stage (deep -> shallow)
    temporal_down: tuple[bool, ...] = (False, True, True)  # per encoder down-sampling (and mirrored up-sampling)
    levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)  # FSQ levels; latent channels = len(levels)
    norm_groups: int = 32
    # frame: GroupNorm statistics over each frame (the released model); pixel: LayerNorm over the channels of
    # each position (no statistics across space, so a code depends only on its receptive field)
    norm: str = "frame"
    in_channels: int = 3

    def __post_init__(self):
        n = len(self.channel_mult)
        if len(self.enc_res) != n or len(self.dec_res) != n or len(self.temporal_down) != n - 1:
            raise ValueError(f"tokenizer config: channel_mult, enc_res, dec_res need {n} entries and temporal_down {n - 1}")
        if self.norm not in NORMS:
            raise ValueError(f"tokenizer config: norm {self.norm!r} is not one of {NORMS}")
        for w in self.widths if self.norm == "frame" else ():
            if w % self.norm_groups:
                raise ValueError(f"tokenizer config: width {w} is not divisible by norm_groups {self.norm_groups}")
        w = self.widths
        for i in range(1, n):
            if w[i] != w[i - 1] and self.enc_res[i] == 0:
                raise ValueError(f"tokenizer config: encoder stage {i} changes width and needs >= 1 residual unit")
            if w[n - 1 - i] != w[n - i] and self.dec_res[i] == 0:
                raise ValueError(f"tokenizer config: decoder stage {i} changes width and needs >= 1 residual unit")

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_mult)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_down)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"tokenizer config: unknown keys {sorted(unknown)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


PRESETS: dict[str, TokenizerConfig] = {
    # the released MAGVIT-v2 reproduction: 17x128x128 -> 5x16x16, 64,000 codes
    "base": TokenizerConfig(),
    # the embedded experiment: 17x32x32 -> 5x8x8 (spatial factor 4, temporal 4), 1,000 codes; narrow, one residual
    # unit per stage, none at full resolution in the encoder: ~0.35 s per step of 8 clips x 9 frames on 2 CPU cores.
    # Per-position norms: with per-frame group norm the black background's codes depended on the object's class
    # (one class's clips all had the same top-left code), which a generator then has to learn as noise.
    "small": TokenizerConfig(
        channels=16,
        channel_mult=(1, 2, 4),
        enc_res=(0, 1, 1),
        dec_res=(1, 1, 1),
        temporal_down=(True, True),
        levels=(8, 5, 5, 5),
        norm_groups=8,
        norm="pixel",
    ),
}


def preset(name: str, res_blocks: int | None = None, **overrides) -> TokenizerConfig:
    """A preset with the given fields replaced (None: the preset's); ``res_blocks`` sets every level's depth."""
    if name not in PRESETS:
        raise KeyError(f"unknown tokenizer preset {name!r} (known: {', '.join(PRESETS)})")
    base = PRESETS[name]
    if res_blocks is not None:
        n = len(base.channel_mult)
        overrides = {**overrides, "enc_res": (res_blocks,) * n, "dec_res": (res_blocks,) * n}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------------------------------------------
# layers


class CausalConv3d(nn.Module):
    """Replicate-pad time by 2*(k//2) frames at the front only and space by k//2 on both sides, then Conv3d."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        self.stride = tuple(stride)
        p = kernel // 2
        self.pad = (p, p, p, p, 2 * p, 0)  # F.pad order: (W left, W right, H top, H bottom, T front, T back)
        fan_in = cin * kernel**3
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad[0] or self.pad[4]:
            x = F.pad(x, self.pad, mode="replicate")
        return F.conv3d(x, self.weight, self.bias, self.stride)


class FrameGroupNorm(nn.Module):
    """GroupNorm applied to each frame separately (statistics over channels-in-group x H x W, per b, g, t)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        g = x.view(B, self.groups, C // self.groups, T, H * W)  # [B, G, C/G, T, HW]
        gs = g.float() if g.dtype in (torch.float16, torch.bfloat16) else g
        var, mean = torch.var_mean(gs, dim=(2, 4), keepdim=True, correction=0)  # [B, G, 1, T, 1]
        g = ((gs - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        y = g.view(B, C, T, H * W)  # [B, C, T, HW]
        y = torch.addcmul(self.bias.view(1, C, 1, 1), y, self.weight.view(1, C, 1, 1))
        return y.view(B, C, T, H, W)  # [B, C, T, H, W]


class PixelNorm(nn.Module):
    """LayerNorm over the channels of each (b, t, h, w) position, with a per-channel affine."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.layer_norm on a channels-last copy is faster on CPU but rounds differently, and the embedded tokenizer's
        # result depends on rounding (measurements: README); the committed results were made with this form
        C = x.shape[1]
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var, mean = torch.var_mean(xs, dim=1, keepdim=True, correction=0)  # [B, 1, T, H, W]
        y = ((xs - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        return torch.addcmul(self.bias.view(1, C, 1, 1, 1), y, self.weight.view(1, C, 1, 1, 1))


def make_norm(kind: str, groups: int, channels: int) -> nn.Module:
    return FrameGroupNorm(groups, channels) if kind == "frame" else PixelNorm(channels)


class Swish(nn.Module):
    """x * sigmoid(beta * x) with a learned per-channel slope beta (init 1), stored as [1, C, 1, 1, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class ResBlock(nn.Module):
    """Norm, Swish, CausalConv3d(a->b), norm, Swish, CausalConv3d(b->b), plus a 1x1x1 causal skip when a != b
    (norm: per-frame group norm or per-position norm, ``TokenizerConfig.norm``)."""

    def __init__(self, cin: int, cout: int, groups: int, norm: str = "frame"):
        super().__init__()
        self.norm1, self.act1, self.conv1 = make_norm(norm, groups, cin), Swish(cin), CausalConv3d(cin, cout)
        self.norm2, self.act2, self.conv2 = make_norm(norm, groups, cout), Swish(cout), CausalConv3d(cout, cout)
        self.skip = CausalConv3d(cin, cout, kernel=1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.conv2(self.act2(self.norm2(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class DepthToSpace(nn.Module):
    """Channels split as (ft, fh, fw, C_out) with C_out fastest; drops the first ft-1 output frames."""

    def __init__(self, factors: tuple[int, int, int]):
        super().__init__()
        self.factors = tuple(factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fh, fw = self.factors
        B, C, T, H, W = x.shape
        c = C // (ft * fh * fw)
        x = x.view(B, ft, fh, fw, c, T, H, W)  # [B, ft, fh, fw, c, T, H, W]
        x = x.permute(0, 4, 5, 1, 6, 2, 7, 3)  # [B, c, T, ft, H, fh, W, fw]
        x = x.reshape(B, c, T * ft, H * fh, W * fw)  # [B, c, T*ft, H*fh, W*fw]
        return x[:, :, ft - 1:] if ft > 1 else x

    def extra_repr(self) -> str:
        return f"factors={self.factors}"


# --------------------------------------------------------------------------------------
# encoder / decoder / tokenizer


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        w, g = cfg.widths, cfg.norm_groups
        layers: list[nn.Module] = [CausalConv3d(cfg.in_channels, w[0])]
        cur = w[0]
        for i, n_res in enumerate(cfg.enc_res):
            for _ in range(n_res):
                layers.append(ResBlock(cur, w[i], g, cfg.norm))
                cur = w[i]
            if i < len(w) - 1:
                layers.append(CausalConv3d(cur, cur, stride=(2 if cfg.temporal_down[i] else 1, 2, 2)))
        layers += [make_norm(cfg.norm, g, cur), Swish(cur), nn.Conv3d(cur, len(cfg.levels), kernel_size=1)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        w, g, n = cfg.widths, cfg.norm_groups, len(cfg.widths)
        cur = w[-1]
        layers: list[nn.Module] = [CausalConv3d(len(cfg.levels), cur)]
        for j, n_res in enumerate(cfg.dec_res):
            for _ in range(n_res):
                layers.append(ResBlock(cur, w[n - 1 - j], g, cfg.norm))
                cur = w[n - 1 - j]
            if j < n - 1:
                f = (2 if cfg.temporal_down[n - 2 - j] else 1, 2, 2)
                layers += [CausalConv3d(cur, cur * f[0] * f[1] * f[2]), DepthToSpace(f)]
        layers += [make_norm(cfg.norm, g, cur), Swish(cur), CausalConv3d(cur, cfg.in_channels)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    @property
    def last_layer_weight(self) -> torch.Tensor:
        return self.layers[-1].weight


class VideoTokenizer(nn.Module):
    """Video float [B, 3, T, H, W] in [0, 1] <-> integer codes [B, T', H', W'] (T = 1 + k * temporal_factor)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.fsq = FSQ(cfg.levels)

    @property
    def vocab_size(self) -> int:
        return self.fsq.vocab_size

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        s, t = self.config.spatial_factor, self.config.temporal_factor
        if (frames - 1) % t or height % s or width % s:
            raise ValueError(f"video {frames}x{height}x{width}: need frames = 1 + k*{t} and sides divisible by {s}")
        return 1 + (frames - 1) // t, height // s, width // s

    # ---- the seed-compatible API ---------------------------------------------------------
    def encode(self, video: torch.Tensor, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (codes in [-1, 1] [B, D, T', H', W'], indices [B, T', H', W'] int32); quantize=False: (latents, None)."""
        z = self.encoder(video)
        if not quantize:
            return z, None
        q = self.fsq(z)
        return q, self.fsq.codes_to_indices(q)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(quant)

    def decode_from_code_indices(self, indices: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fsq.indices_to_codes(indices).to(self._dtype()))

    # ---- the nbp API -----------------------------------------------------------------------
    def encode_codes(self, video: torch.Tensor) -> torch.Tensor:
        return self.encode(video)[1]

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode_from_code_indices(codes).clamp_(0, 1)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction [B, 3, T, H, W], quantized codes [B, D, T', H', W'])."""
        q = self.fsq(self.encoder(video))
        return self.decoder(q), q

    def _dtype(self) -> torch.dtype:
        return self.decoder.layers[0].weight.dtype
