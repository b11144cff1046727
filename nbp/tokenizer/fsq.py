"""Finite Scalar Quantization (FSQ) with the released MAGVIT-v2 reproduction's exact rules (NBP.md section 4).

Per channel d with L = levels[d]:

- ``half_l = (L - 1) * (1 - 1e-3) / 2``, ``offset = 0.5`` if L is even else 0, ``shift = tan(offset / half_l)``
- ``bounded = tanh(z + shift) * half_l - offset``; ``q = round(bounded)`` (half to even), straight-through gradient
- ``code = q / (L // 2)`` in [-1, 1]
- ``index = sum_d (code_d * (L_d // 2) + L_d // 2) * basis_d`` with ``basis = cumprod([1] + levels[:-1])``:
  the first channel is the least significant digit. Indices are int32.

Tensors keep channels in dim 1 (``[B, D, T, H, W]``); indices drop that dim (``[B, T, H, W]``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class FSQ(nn.Module):
    """Quantizer without learned parameters (and without persistent buffers: the released files hold none)."""

    def __init__(self, levels: tuple[int, ...] | list[int], eps: float = 1e-3):
        super().__init__()
        self.levels = tuple(int(v) for v in levels)
        if any(v < 2 for v in self.levels):
            raise ValueError(f"FSQ levels must be >= 2, got {self.levels}")
        half_l = [(v - 1) * (1 - eps) / 2 for v in self.levels]
        offset = [0.5 if v % 2 == 0 else 0.0 for v in self.levels]
        basis = [1]
        for v in self.levels[:-1]:
            basis.append(basis[-1] * v)
        self.vocab_size = basis[-1] * self.levels[-1]
        if self.vocab_size > 2**31 - 1:
            raise ValueError(f"FSQ vocabulary {self.vocab_size} does not fit int32")
        D = len(self.levels)
        as_col = lambda v, dt: torch.tensor(v, dtype=dt).view(1, D, 1, 1, 1)  # noqa: E731  [1, D, 1, 1, 1]
        self.register_buffer("half_l", as_col(half_l, torch.float32), persistent=False)
        self.register_buffer("offset", as_col(offset, torch.float32), persistent=False)
        self.register_buffer("shift", as_col([math.tan(o / h) for o, h in zip(offset, half_l)], torch.float32), persistent=False)
        self.register_buffer("half_width", as_col([v // 2 for v in self.levels], torch.float32), persistent=False)
        self.register_buffer("levels_t", as_col(self.levels, torch.int32), persistent=False)
        self.register_buffer("basis", as_col(basis, torch.int32), persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Continuous latents [B, D, T, H, W] -> codes in [-1, 1] (same shape), straight-through gradient."""
        bounded = torch.tanh(z.float() + self.shift) * self.half_l - self.offset
        q = bounded + (torch.round(bounded) - bounded).detach()
        return (q / self.half_width).to(z.dtype)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, D, T, H, W] -> int32 indices [B, T, H, W]."""
        digits = torch.round(codes.float() * self.half_width + self.half_width).to(torch.int32)  # [B, D, T, H, W]
        return (digits * self.basis).sum(dim=1, dtype=torch.int32)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Integer indices [B, T, H, W] -> float codes [B, D, T, H, W]."""
        idx = indices.to(torch.int32).unsqueeze(1)  # [B, 1, T, H, W]
        digits = torch.div(idx, self.basis, rounding_mode="floor") % self.levels_t  # [B, D, T, H, W]
        return (digits.float() - self.half_width) / self.half_width

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, vocab_size={self.vocab_size}"
