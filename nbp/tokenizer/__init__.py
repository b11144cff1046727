"""Video tokenizer: causal 3-D CNN + FSQ (model), training, evaluation and released-checkpoint import."""

from __future__ import annotations

from pathlib import Path

import torch

from nbp.checkpoint import load_checkpoint, read_torch_file
from nbp.errors import NbpError
from nbp.tokenizer.model import PRESETS, TokenizerConfig, VideoTokenizer, preset

FORMAT = "nbp-tokenizer"
FORMAT_VERSION = 1


def tokenizer_checkpoint(model: VideoTokenizer, **extra) -> dict:
    """Our self-describing ``tokenizer.pt`` content (plain data + tensors)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": FORMAT_VERSION, "config": model.config.to_dict(), "model": state, **extra}


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu", source: str = "checkpoint") -> VideoTokenizer:
    try:
        cfg = TokenizerConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise NbpError(f"{source}: bad tokenizer config ({e})") from None
    model = VideoTokenizer(cfg)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise NbpError(f"{source}: weights do not match the tokenizer config ({str(e).splitlines()[0][:300]})") from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> VideoTokenizer:
    """Load our ``tokenizer.pt`` (format ``nbp-tokenizer``) in eval mode."""
    ckpt = load_checkpoint(path, map_location="cpu", expect=FORMAT)
    return model_from_checkpoint(ckpt, device, source=str(path))


def load_magvit2(path: str | Path, resolution: int = 128, device: str | torch.device = "cpu") -> VideoTokenizer:
    """Seed-compatible loader: our ``tokenizer.pt`` or a released ``magvit2_ucf.pt`` / ``magvit2_k600.pt``.

    ``tok.encode(video, quantize=True) -> (quant, codes [B, T', H', W'])``; ``tok.decode_from_code_indices(codes)``.
    The network is fully convolutional; ``resolution`` is checked against its spatial factor.
    """
    from nbp.tokenizer.released import is_released_checkpoint, model_from_released_state  # it imports this package

    path = Path(path)
    obj = read_torch_file(path, "tokenizer file")
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        model = model_from_checkpoint(obj, device, source=str(path))
    elif is_released_checkpoint(obj):
        model = model_from_released_state(obj["model_state_dict"], device=device, source=str(path))
    else:
        raise NbpError(f"{path}: neither an nbp tokenizer nor a released magvit2 checkpoint")
    if resolution % model.config.spatial_factor:
        raise NbpError(f"{path}: resolution {resolution} is not divisible by the spatial factor {model.config.spatial_factor}")
    return model


__all__ = ["PRESETS", "TokenizerConfig", "VideoTokenizer", "load_magvit2", "load_tokenizer", "preset", "tokenizer_checkpoint"]
