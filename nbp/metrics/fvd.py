"""Fréchet Video Distance: I3D features of clips, their statistics, and the Fréchet distance between two sets.

Protocol (the paper's): the first 16 frames of each clip (``sampling='center'`` takes the middle ones), optionally
scored at ``resolution`` (each frame first resized to resolution x resolution, e.g. 64 for the K600 protocol), then
bilinearly resized to 224x224 (``F.interpolate(..., mode='bilinear', align_corners=False)``), values mapped to
[-1, 1]; feature = the Kinetics-400 I3D's 400 logits; FVD = Fréchet distance between the two feature Gaussians
(``scipy.linalg.sqrtm``).

Real-data statistics are computed once per dataset/split/protocol by the ``real_stats`` stage
(``{run.out}/real_stats/{entry}/stats.npz`` with ``mu``, ``sigma``, ``n`` + ``features.npy``).
Under torchrun each rank extracts a contiguous shard; the shards are gathered so every rank gets all features.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nbp.errors import NbpError
from nbp.io import atomic_path
from nbp.metrics.i3d import find_weights, load_i3d
from nbp.tracking import progress

I3D_SIZE = 224
FRAMES = 16
Sampling = Literal["first", "center"]


# --------------------------------------------------------------------------------------
# preprocessing


def to_float_clips(videos: Any) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] or float [B, 3, T, H, W] in [0, 1] (numpy or torch) -> float32 [B, 3, T, H, W] in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(videos)) if isinstance(videos, np.ndarray) else videos
    if not isinstance(x, torch.Tensor) or x.ndim != 5:
        raise NbpError(f"videos: expected a 5-D array, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype == torch.uint8:
        if x.shape[-1] != 3:
            raise NbpError(f"videos: uint8 clips must be [B, T, H, W, 3], got {list(x.shape)}")
        return x.permute(0, 4, 1, 2, 3).float().div_(255.0)  # [B, 3, T, H, W]
    if not x.is_floating_point() or x.shape[1] != 3:
        raise NbpError(f"videos: float clips must be [B, 3, T, H, W] in [0, 1], got {x.dtype} {list(x.shape)}")
    return x.float()


def select_frames(x: torch.Tensor, frames: int, sampling: Sampling = "first") -> torch.Tensor:
    """The ``frames`` first (or centre) frames of float [B, 3, T, H, W]."""
    T = x.shape[2]
    if T < frames:
        raise NbpError(f"videos: clips have {T} frames, the FVD protocol needs {frames}")
    if sampling not in ("first", "center"):
        raise NbpError(f"sampling must be 'first' or 'center', got {sampling!r}")
    start = 0 if sampling == "first" else (T - frames) // 2
    return x[:, :, start:start + frames]


def resize_clips(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (align_corners=False) per-frame resize of float [B, 3, T, H, W] to [B, 3, T, size, size]."""
    B, C, T, H, W = x.shape
    if (H, W) == (size, size):
        return x
    x = x.transpose(1, 2).reshape(B * T, C, H, W)  # [B*T, 3, H, W]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # [B*T, 3, size, size]
    return x.view(B, T, C, size, size).transpose(1, 2)  # [B, 3, T, size, size]


def preprocess(videos: Any, frames: int = FRAMES, resolution: int | None = None, sampling: Sampling = "first") -> torch.Tensor:
    """Clips -> the I3D input float [B, 3, frames, 224, 224] in [-1, 1] (see the module docstring)."""
    x = select_frames(to_float_clips(videos), frames, sampling)
    if resolution:
        x = resize_clips(x, resolution)
    return resize_clips(x, I3D_SIZE) * 2.0 - 1.0


# --------------------------------------------------------------------------------------
# feature extraction

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def get_i3d(weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The I3D, loaded once per (weights, device) in this process."""
    path = Path(weights) if weights is not None else find_weights()
    key = (str(path.resolve()), str(torch.device(device)))
    if key not in _MODELS:
        _MODELS[key] = load_i3d(path, device)
    return _MODELS[key]


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 in cuDNN convolutions while extracting (features match the CPU to float32 rounding)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def _batches(videos: Any, batch_size: int) -> tuple[Iterable, int | None]:
    """Batches of an indexable clip array (numpy, memmap, torch, anything with len and slicing) or an iterable of batches."""
    if hasattr(videos, "__len__") and hasattr(videos, "__getitem__") and not isinstance(videos, (list, tuple)):
        n = len(videos)
        return (videos[i:i + batch_size] for i in range(0, n, batch_size)), n
    return iter(videos), None


class Rows:
    """Rows ``index`` of a numpy/memmap/torch array, itself indexable by slices (a lazy subset of a memmap)."""

    def __init__(self, data: Any, index: np.ndarray):
        self.data, self.index = data, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, s: slice | np.ndarray):
        rows = self.index[s]
        return self.data[torch.from_numpy(rows)] if isinstance(self.data, torch.Tensor) else self.data[rows]


def extract_features(videos: Any, model: torch.nn.Module | None = None, *, batch_size: int = 16,
                     device: str | torch.device = "cpu", frames: int = FRAMES, resolution: int | None = None,
                     sampling: Sampling = "first", pooled: bool = False, weights: str | Path | None = None,
                     distributed: bool | None = None, desc: str = "I3D features") -> np.ndarray:
    """I3D logits (or, with ``pooled``, Mixed_5c pooled features) of clips -> float32 [N, 400] (or [N, 1024]).

    ``videos``: uint8 [N, T, H, W, 3] or float [N, 3, T, H, W] in [0, 1] (numpy/memmap/torch, a ClipCache, or an
    iterable of such batches). Always float32 (no TF32, no autocast). ``distributed`` (default: when a process
    group is up): each rank extracts a contiguous shard of whole batches (so each clip is in the same batch as in
    one process), then all shards are gathered in order on every rank.
    """
    device = torch.device(device)
    model = model if model is not None else get_i3d(weights, device)
    if isinstance(getattr(videos, "frames", None), np.ndarray):  # a ClipCache: its uint8 memmap
        videos = videos.frames
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        return _extract_sharded(videos, model, batch_size=batch_size, device=device, frames=frames,
                                resolution=resolution, sampling=sampling, pooled=pooled, desc=desc)
    batches, total = _batches(videos, batch_size)
    out = []
    bar = progress(total=total, desc=desc, unit="clip")
    with torch.inference_mode(), _exact_fp32(), torch.autocast(device.type, enabled=False):
        for batch in batches:
            x = batch.to(device) if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            y = model(preprocess(x, frames, resolution, sampling), return_features=pooled)
            out.append((y[1] if pooled else y).float().cpu().numpy())
            bar.update(len(x))
    bar.close()
    dim = 1024 if pooled else 400
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), np.float32)


def _extract_sharded(videos: Any, model: torch.nn.Module, **kw) -> np.ndarray:
    rank, world = dist.get_rank(), dist.get_world_size()
    if not (hasattr(videos, "__len__") and hasattr(videos, "__getitem__")):
        raise NbpError("distributed feature extraction needs an indexable clip array, not an iterator of batches")
    n, bs = len(videos), kw["batch_size"]
    nb = -(-n // bs)  # whole batches per rank: every clip sees the same batch as in a single process
    lo, hi = min(n, nb * rank // world * bs), min(n, nb * (rank + 1) // world * bs)
    part = videos[lo:hi] if isinstance(videos, (np.ndarray, torch.Tensor)) else Rows(videos, np.arange(lo, hi))
    feats = torch.from_numpy(extract_features(part, model, distributed=False, **kw))  # [hi - lo, D]
    # all_gather needs equal sizes: pad every shard to the largest, then cut
    sizes = [min(n, nb * (r + 1) // world * bs) - min(n, nb * r // world * bs) for r in range(world)]
    padded = torch.zeros(max(sizes), feats.shape[1], dtype=feats.dtype)
    padded[: len(feats)] = feats
    comm_dev = kw["device"] if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = [torch.zeros_like(padded, device=comm_dev) for _ in range(world)]
    dist.all_gather(gathered, padded.to(comm_dev))
    return torch.cat([g[:k].cpu() for g, k in zip(gathered, sizes)]).numpy()


def fvd_features_of_clips(clips: Any, resolution: int | None = None, batch_size: int = 16,
                          device: str | torch.device = "cpu", frames: int = FRAMES, sampling: Sampling = "first",
                          weights: str | Path | None = None, model: torch.nn.Module | None = None,
                          distributed: bool | None = None) -> np.ndarray:
    """FVD features (I3D logits, float32 [N, 400]) of uint8 [N, T, H, W, 3] or float [N, 3, T, H, W] clips in [0, 1]
    (``distributed``: as :func:`extract_features`; False for a rank's own clips)."""
    return extract_features(clips, model, batch_size=batch_size, device=device, frames=frames, resolution=resolution,
                            sampling=sampling, weights=weights, distributed=distributed)


# --------------------------------------------------------------------------------------
# statistics and the Fréchet distance


def _features(feats: Any, name: str) -> np.ndarray:
    f = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, dtype=np.float64)
    if f.ndim != 2:
        raise NbpError(f"{name}: features must be [N, D], got shape {f.shape}")
    if len(f) < 2:
        raise NbpError(f"{name}: need at least 2 feature vectors for a covariance, got {len(f)}")
    if not np.isfinite(f).all():
        raise NbpError(f"{name}: features contain NaN or inf")
    return f


def feature_stats(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D] with ddof=1), float64."""
    f = _features(feats, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    When the product is singular (sqrtm not finite or inaccurate), ``eps`` is added to both diagonals and the
    square root is taken again. A negligible imaginary part of the square root is dropped; a large one raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise NbpError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if covmean is None:
        offset = np.eye(len(s1)) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
        if covmean is None:
            raise NbpError("Fréchet distance: the covariance product has no usable square root even with eps on the diagonals")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise NbpError(f"Fréchet distance: the square root of the covariance product has an imaginary part of {imag:.3g} "
                           "(are the covariances positive semi-definite?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray | None:
    """scipy's matrix square root, or None when it is not finite or its residual is large."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Matrix is singular and may not have a square root": handled below
        x = scipy.linalg.sqrtm(a)
    if isinstance(x, tuple):  # old scipy with disp=False semantics
        x = x[0]
    if not np.isfinite(x).all():
        return None
    norm = np.linalg.norm(a)
    if norm > 0 and np.linalg.norm(x @ x - a) / norm > 1e-3:
        return None
    return x


def frechet_distance(feats_a: Any, feats_b: Any, eps: float = 1e-6) -> float:
    """FVD between two feature sets [N, D] and [M, D] (means and ddof=1 covariances, float64)."""
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise NbpError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    return frechet_distance_from_stats(mu1, s1, mu2, s2, eps)


def save_stats(path: str | Path, feats: Any, **meta: Any) -> None:
    """``stats.npz`` with ``mu``, ``sigma``, ``n`` (+ protocol keys such as frames, resolution), written atomically."""
    mu, sigma = feature_stats(feats)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, n=np.int64(len(np.asarray(feats))), **{k: np.asarray(v) for k, v in meta.items()})


def stats_info(path: str | Path) -> dict[str, Any]:
    """Every entry of a stats.npz as plain values (``mu``/``sigma`` arrays, ``n`` int, protocol keys)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise NbpError(f"{path}: file not found") from None
    except (ValueError, OSError) as e:
        raise NbpError(f"{path}: not a readable .npz statistics file ({e})") from None
    if "mu" not in out or "sigma" not in out:
        raise NbpError(f"{path}: expected keys 'mu' and 'sigma', got {sorted(out)}")
    return {k: (v.item() if v.ndim == 0 else v) for k, v in out.items()}


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) from a stats.npz."""
    info = stats_info(path)
    return np.asarray(info["mu"], np.float64), np.asarray(info["sigma"], np.float64)


# --------------------------------------------------------------------------------------
# the real_stats stage


def choose_clips(video_ids: Any, n: int, seed: int) -> np.ndarray:
    """``n`` clip indices, one clip per source video first (videos in seeded random order), then random others; sorted."""
    vids = np.asarray(video_ids)
    total = len(vids)
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    _, first = np.unique(vids, return_index=True)  # the first clip of each video
    picked = first[rng.permutation(len(first))][:n]
    if len(picked) < n:
        rest = np.setdiff1d(np.arange(total), picked)
        picked = np.concatenate([picked, rng.permutation(rest)[: n - len(picked)]])
    return np.sort(picked)


__all__ = ["preprocess", "resize_clips", "extract_features", "fvd_features_of_clips", "feature_stats", "frechet_distance",
           "frechet_distance_from_stats", "save_stats", "load_stats", "stats_info", "get_i3d", "Rows"]
