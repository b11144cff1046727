"""Import of the released MAGVIT-v2 reproduction tokenizers (``magvit2_ucf.pt``, ``magvit2_k600.pt``).

Released format (NBP.md section 3): a torch pickle ``{'model_state_dict': {...}}`` whose keys are
``module.encoder_layers.N...`` / ``module.decoder_layers.N...``. Layer N of each ModuleList is one of

- CausalConv3d: ``.conv.weight``, ``.conv.bias``                     -> our ``CausalConv3d.weight/bias``
- residual unit: ``.fn.0`` GroupNorm, ``.fn.1.beta`` Swish, ``.fn.2.conv`` CausalConv3d, ``.fn.3``, ``.fn.4.beta``,
  ``.fn.5.conv``, ``.residual_fn.0.conv`` (width change)            -> our ``ResBlock.norm1/act1/conv1/norm2/act2/conv2/skip``
- GroupNorm ``.weight/.bias``, Swish ``.beta``, final plain Conv3d ``.weight/.bias``; DepthToSpace has none.

Every parameter mapping is named below, per layer type; loading is strict: a missing, unexpected or
mis-shaped key is an :class:`NbpError` naming the key (never ``strict=False``).

Sizes: without an explicit config, the base width (``channels``) is read from the first convolution's shape
(:func:`config_from_state`), and the depth from the keys: the released residual counts per stage, or else the
one uniform count per stage (as ``train_tokenizer.*.res_blocks`` sets) whose keys the file has. So a narrower or
shallower file of the released architecture (e.g. a smoke-test file) imports; the rest is the released
architecture's (widths per stage, checked key by key and shape by shape; GroupNorm(32) and the FSQ levels, which
no shape records: only the number of levels is checked).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.nn as nn

from nbp.checkpoint import read_torch_file
from nbp.config import ConfigError, to_dict
from nbp.data.fetch import lock_for, obtain
from nbp.errors import NbpError
from nbp.tokenizer import tokenizer_checkpoint
from nbp.tokenizer.fsq import FSQ
from nbp.tokenizer.model import PRESETS, CausalConv3d, DepthToSpace, FrameGroupNorm, ResBlock, Swish, VideoTokenizer
from nbp.training import export_released

PREFIX = "module."

# (released suffix, our suffix) for each layer type
CONV_KEYS = [("conv.weight", "weight"), ("conv.bias", "bias")]
RES_KEYS = [
    ("fn.0.weight", "norm1.weight"),
    ("fn.0.bias", "norm1.bias"),
    ("fn.1.beta", "act1.beta"),
    ("fn.2.conv.weight", "conv1.weight"),
    ("fn.2.conv.bias", "conv1.bias"),
    ("fn.3.weight", "norm2.weight"),
    ("fn.3.bias", "norm2.bias"),
    ("fn.4.beta", "act2.beta"),
    ("fn.5.conv.weight", "conv2.weight"),
    ("fn.5.conv.bias", "conv2.bias"),
]
RES_SKIP_KEYS = [("residual_fn.0.conv.weight", "skip.weight"), ("residual_fn.0.conv.bias", "skip.bias")]
NORM_KEYS = [("weight", "weight"), ("bias", "bias")]
SWISH_KEYS = [("beta", "beta")]
PLAIN_CONV_KEYS = [("weight", "weight"), ("bias", "bias")]


def _layer_keys(layer: nn.Module) -> list[tuple[str, str]]:
    if isinstance(layer, CausalConv3d):
        return CONV_KEYS
    if isinstance(layer, ResBlock):
        return RES_KEYS + (RES_SKIP_KEYS if layer.skip is not None else [])
    if isinstance(layer, FrameGroupNorm):
        return NORM_KEYS
    if isinstance(layer, Swish):
        return SWISH_KEYS
    if isinstance(layer, nn.Conv3d):
        return PLAIN_CONV_KEYS
    if isinstance(layer, DepthToSpace):
        return []
    raise TypeError(f"no released key mapping for {type(layer).__name__}")


def key_mapping(model: VideoTokenizer) -> dict[str, str]:
    """released key (with ``module.``) -> our state-dict key, for every parameter of ``model``."""
    mapping = {}
    for released_list, ours in (("encoder_layers", model.encoder.layers), ("decoder_layers", model.decoder.layers)):
        ours_name = "encoder.layers" if released_list == "encoder_layers" else "decoder.layers"
        for n, layer in enumerate(ours):
            for r, o in _layer_keys(layer):
                mapping[f"{PREFIX}{released_list}.{n}.{r}"] = f"{ours_name}.{n}.{o}"
    return mapping


def convert_state_dict(released: dict[str, torch.Tensor], model: VideoTokenizer, source: str = "released file") -> dict:
    """Map a released ``model_state_dict`` onto ``model``'s keys, checking names and shapes strictly."""
    mapping = key_mapping(model)
    ours = model.state_dict()
    for k in released:
        if k not in mapping:
            raise NbpError(f"{source}: unexpected key {k!r} (not part of the released base tokenizer)")
    out = {}
    for rk, ok in mapping.items():
        if rk not in released:
            raise NbpError(f"{source}: missing key {rk!r}")
        t = released[rk]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(ours[ok].shape):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise NbpError(f"{source}: key {rk!r} has shape {shape}, expected {tuple(ours[ok].shape)}")
        out[ok] = t
    unmapped = set(ours) - set(out)
    if unmapped:  # a model parameter no released key fills (cannot happen for the base preset)
        raise NbpError(f"{source}: no released key for parameter {sorted(unmapped)[0]!r}")
    return out


def to_released_state_dict(model: VideoTokenizer) -> dict[str, torch.Tensor]:
    """Our weights in the released key layout (the inverse mapping; used to export and in tests)."""
    ours = model.state_dict()
    return {rk: ours[ok].detach().clone() for rk, ok in key_mapping(model).items()}


def config_from_state(state: dict, base=None, source: str = "released file"):
    """The released architecture (``base``, default the ``base`` preset, per-frame norms) at the width this state
    dict has: ``channels`` = output channels of ``encoder_layers.0`` / ``channel_mult[0]``. The number of latent
    channels (the last encoder layer's outputs) must be the number of FSQ levels."""
    base = dataclasses.replace(base or PRESETS["base"], norm="frame")
    first = state.get(f"{PREFIX}encoder_layers.0.conv.weight")
    if not isinstance(first, torch.Tensor) or first.ndim != 5:
        raise NbpError(f"{source}: missing key {PREFIX + 'encoder_layers.0.conv.weight'!r} (a 5-D convolution weight)")
    width = int(first.shape[0])
    if width % base.channel_mult[0]:
        raise NbpError(f"{source}: first convolution has {width} channels, not a multiple of {base.channel_mult[0]}")
    layers = [int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(PREFIX)}encoder_layers\.(\d+)\.", k))]
    last = state.get(f"{PREFIX}encoder_layers.{max(layers)}.weight")
    if isinstance(last, torch.Tensor) and last.ndim == 5 and last.shape[0] != len(base.levels):
        raise NbpError(f"{source}: {last.shape[0]} latent channels, the released FSQ has {len(base.levels)} levels "
                       f"{list(base.levels)} (levels are not in the weights)")
    try:
        cfg = dataclasses.replace(base, channels=width // base.channel_mult[0])
    except ValueError as e:
        raise NbpError(f"{source}: base width {width // base.channel_mult[0]} read from "
                       f"{PREFIX}encoder_layers.0.conv.weight does not fit the released architecture ({e})") from None
    return _depth_from_keys(state, cfg)


def _released_keys(cfg) -> set[str]:
    with torch.device("meta"):
        return set(key_mapping(VideoTokenizer(cfg)))


def _depth_from_keys(state: dict, cfg):
    """``cfg`` if the file's keys are its released keys; else the one uniform depth (the same number of residual
    units at every stage, as the ``res_blocks`` key sets) whose keys they are; else ``cfg`` (the strict key check
    then names the difference)."""
    keys = {k for k in state if k.startswith((f"{PREFIX}encoder_layers.", f"{PREFIX}decoder_layers."))}
    if keys == _released_keys(cfg):
        return cfg
    n = len(cfg.channel_mult)
    fits = []
    for r in range(1, 9):  # a stage that changes width needs one unit: depth 0 is not an architecture
        c = dataclasses.replace(cfg, enc_res=(r,) * n, dec_res=(r,) * n)
        if keys == _released_keys(c):
            fits.append(c)
    return fits[0] if len(fits) == 1 else cfg


def is_released_checkpoint(obj) -> bool:
    return isinstance(obj, dict) and "model_state_dict" in obj and "format" not in obj


def load_released(path: str | Path, device: str | torch.device = "cpu", config=None) -> VideoTokenizer:
    """Build the ``base`` tokenizer (at the file's width, unless ``config`` is given) and fill it from a released
    ``magvit2_*.pt`` (weights_only load, strict keys)."""
    path = Path(path)
    obj = read_torch_file(path, "released tokenizer file")
    if not is_released_checkpoint(obj):
        raise NbpError(f"{path}: not a released tokenizer (expected a dict with 'model_state_dict')")
    return model_from_released_state(obj["model_state_dict"], device=device, config=config, source=str(path))


def model_from_released_state(state: dict, device="cpu", config=None, source: str = "released file") -> VideoTokenizer:
    """Keys are checked against a parameter-free (meta) model first, so a bad file fails before any allocation.

    Released files always have per-frame group norms: ``config`` gives the sizes (None: the released architecture
    at the width read from the shapes, :func:`config_from_state`), the norm is ``frame``."""
    cfg = dataclasses.replace(config, norm="frame") if config is not None else config_from_state(state, source=source)
    with torch.device("meta"):
        shell = VideoTokenizer(cfg)
    mapped = convert_state_dict(state, shell, source)
    mapped = {k: v.to(torch.float32).contiguous() for k, v in mapped.items()}
    shell.load_state_dict(mapped, strict=True, assign=True)  # takes the file's tensors: no random init of 370M weights
    shell.fsq = FSQ(cfg.levels)  # its constant (non-persistent) buffers were built on the meta device
    return shell.to(device).eval()


def import_released(cfg, name: str, tcfg, paths) -> Path:
    """Stage ``train_tokenizer`` with ``source: released``: fetch (URL) or read (path) a ``magvit2_*.pt``, convert it
    strictly, write our ``tokenizer.pt``, an empty ``history.csv`` and ``metrics.json``."""
    src = tcfg.checkpoint
    if src is None:
        raise ConfigError(f"train_tokenizer.{name}.checkpoint", "source is 'released' but no checkpoint is given")
    path, sha = obtain(src, paths.state, lock_for(cfg))
    model = load_released(path)
    p = cfg.prepare[tcfg.dataset]
    ckpt = tokenizer_checkpoint(model, preset="base", source="released", released_file=src, sha256=sha, dataset=tcfg.dataset,
                                clip={"frames": p.frames, "height": p.resolution, "width": p.resolution},
                                train_config=to_dict(tcfg))
    export_released(paths, "tokenizer", ckpt, {
        "source": "released", "checkpoint": src, "sha256": sha, "params": sum(q.numel() for q in model.parameters()),
        "vocab_size": model.vocab_size, "latent_grid": list(model.latent_grid(p.frames, p.resolution, p.resolution))})
    return paths.folder
