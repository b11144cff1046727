"""Stage ``eval_generator``: sample videos from a generator, score them with gFVD, time them.

Protocols (NBP.md section 6):

- class-conditional (tasks ``class``, ``hybrid``; ``uncond`` draws no labels): ``num_videos`` labels drawn
  from the label distribution of the real split that ``real_stats`` scored, generated, decoded with the
  tokenizer, and compared with the real statistics (``{run.out}/real_stats/{entry}/stats.npz``);
- frame prediction (``frame_pred``): ``num_videos`` real clips of that split, their first
  ``1 + 4 (context_frames - 1)`` frames encoded (2 latent frames = 5 frames), the remaining tokens
  generated, the whole grid decoded and scored at the real statistics' resolution (64 for K600).

Timing is kept apart per phase: ``generate_seconds`` (the sampler), ``encode_seconds`` (context encoding),
``decode_seconds`` (codes -> pixels); the I3D is timed as ``fvd_seconds``. ``fps`` = generated frames per
second with tokenizer encode and decode included (the paper's Table 1); generated frames per video are the
frames after the context (17 for class-conditional, 12 for K600). Each seed of ``seeds`` repeats the
generation; ``gfvd`` is the mean, ``gfvd_std`` the sample standard deviation over seeds. With
``untrained_baseline``, a freshly initialised model of the same size is scored the same way (first seed) as
``gfvd_untrained`` (null otherwise).

Batch ``b`` of seed ``s`` samples from its own generator, seeded from ``SeedSequence([s, b])``
(:func:`batch_generator`). Under torchrun the (seed, batch) units are split contiguously over the ranks, their FVD
features gathered in order, the sample grid rebuilt from every rank's picks, and only rank 0 writes: the metrics
and media equal one process's (the phase seconds are summed over the ranks, so ``fps`` stays per device).

Outputs (atomic): ``metrics.json``, ``samples.mp4`` and ``samples.gif`` (one video per class in label order,
or real clips above their predictions).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbp import dag
from nbp.config import Config, to_dict
from nbp.data.clips import ClipCache
from nbp.data.video_io import to_uint8_video, video_grid, write_gif, write_video
from nbp.distributed import DistInfo, barrier, device_name, gather_rows, init_distributed, resolve_device, share, sum_over_ranks
from nbp.errors import NbpError
from nbp.generator import LoadedGenerator, load_generator
from nbp.generator.model import GPT
from nbp.generator.sampling import codes_of, count_steps, prompt_ids
from nbp.io import atomic_dir, write_json
from nbp.metrics import fvd
from nbp.tokenizer import load_tokenizer
from nbp.tracking import progress

PHASES = ("generate", "encode", "decode", "fvd")


@dataclass
class Timer:
    """Wall time per phase (CUDA work is synchronised before the clock is read)."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextlib.contextmanager
    def __call__(self, phase: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class LazyClips:
    """Clips ``index`` of a ClipCache, read when sliced: ``clips[lo:hi]`` -> uint8 [b, T, H, W, 3]."""

    def __init__(self, cache, index: np.ndarray):
        self.cache, self.index = cache, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.cache.batch(self.index[s])


def context_pixel_frames(latent_frames: int, temporal_factor: int = 4) -> int:
    """Pixel frames that ``latent_frames`` causal latent frames cover (2 -> 5)."""
    return 1 + (latent_frames - 1) * temporal_factor if latent_frames else 0


def draw_labels(real_labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` labels drawn (with replacement) from the empirical label distribution of the real clips."""
    return np.random.default_rng(seed).choice(np.asarray(real_labels, dtype=np.int64), size=n, replace=True)


def batch_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """The random stream of batch ``batch`` of seed ``seed``: a function of the two only, so a video's samples do not
    depend on which rank (or how many) generated the batches before it."""
    state = np.random.SeedSequence([seed, batch]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def generate_videos(gen: LoadedGenerator, tok, *, labels: np.ndarray | None = None, context=None,
                    num: int, batch_size: int, seed: int, device: torch.device, timer: Timer, sampling: dict,
                    temporal_factor: int = 4, desc: str = "generate", batches: Iterable[int] | None = None):
    """Yield (videos float [b, 3, T, H, W] in [0, 1], labels [b] or None, context clips uint8 or None) per batch.

    ``context``: real clips uint8 [num, T, H, W, 3] (or a :class:`LazyClips`) for frame prediction; their first
    frames are encoded. ``batches``: which batches of ``batch_size`` to make (default: all, in order); batch ``b``
    draws from :func:`batch_generator` ``(seed, b)``.
    """
    task = gen.task
    cf = context_pixel_frames(task.context_frames, temporal_factor)
    todo = range(-(-num // batch_size)) if batches is None else list(batches)
    for b in progress(todo, desc=desc, leave=False):
        lo, hi = b * batch_size, min((b + 1) * batch_size, num)
        lab = ctx = None
        if task.task == "frame_pred":
            ctx = context[lo:hi]
            clip = torch.from_numpy(np.ascontiguousarray(ctx[:, :cf])).to(device)  # [b, cf, H, W, 3]
            clip = clip.permute(0, 4, 1, 2, 3).float().div_(255.0)  # [b, 3, cf, H, W]
            with timer("encode"):
                codes = tok.encode_codes(clip).long()  # [b, context_frames, H', W']
            prompt = prompt_ids(task, context=codes)
        elif task.task == "uncond":
            prompt = prompt_ids(task, batch=hi - lo).to(device)
        else:
            lab = labels[lo:hi]
            prompt = prompt_ids(task, labels=torch.as_tensor(lab, device=device))
        with timer("generate"):
            ids = gen.generate(prompt.to(device), generator=batch_generator(seed, b, device), **sampling)
        with timer("decode"):
            videos = tok.decode_codes(codes_of(task, ids))  # [b, 3, T, H, W]
        yield videos, lab, ctx


class GridPicker:
    """Keeps only the videos of the sample grid: the first video of each class (shown in label order), or the
    first ``n`` videos (with their real clips above them for frame prediction)."""

    def __init__(self, n: int):
        self.n, self.by_label, self.videos, self.real = n, {}, [], []

    def add(self, videos: np.ndarray, labels: np.ndarray | None, context: np.ndarray | None) -> None:
        if labels is not None:
            for v, lab in zip(videos, labels.tolist()):
                if len(self.by_label) < self.n:
                    self.by_label.setdefault(lab, v)
            return
        take = self.n - len(self.videos)
        self.videos += list(videos[:take])
        if context is not None:
            self.real += list(context[:take])

    def gathered(self, info: DistInfo, device: torch.device, labelled: bool) -> GridPicker:
        """The picker one process would have built: every rank's picks replayed in rank order (a rank's picks are the
        first ``n`` videos or classes of its share, which hold every pick the whole run makes from that share)."""
        if not info.enabled:
            return self
        vids = list(self.by_label.values()) if labelled else self.videos
        videos = gather_rows(np.stack(vids) if vids else np.empty(0, np.uint8), info, device)  # uint8 [k, T, H, W, 3]
        labels = gather_rows(np.asarray(list(self.by_label), dtype=np.int64), info, device) if labelled else None
        real = gather_rows(np.stack(self.real) if self.real else np.empty(0, np.uint8), info, device)
        out = GridPicker(self.n)
        out.add(videos, labels, real if len(real) else None)
        return out

    def grid(self) -> tuple[np.ndarray, int, list[int]]:
        """(clips uint8 [N, T, H, W, 3], columns, labels shown)."""
        if self.by_label:
            labs = sorted(self.by_label)
            return np.stack([self.by_label[k] for k in labs]), len(labs), labs
        clips = self.videos + self.real
        return np.stack(self.real + self.videos if self.real else clips), len(self.videos), []


def write_grid(out: Path, videos: np.ndarray, fps: float, ncols: int,
               names: tuple[str, str] = ("samples.mp4", "samples.gif")) -> None:
    """The sample grid as a video and a GIF (``names``) in ``out``."""
    grid = video_grid(videos, ncols=ncols, min_side=64)
    write_video(out / names[0], grid, fps=fps)
    write_gif(out / names[1], grid, fps=fps)


def load_pair(cfg: Config, generator: str, gen_path: Path, tok_path: Path, device) -> tuple[LoadedGenerator, Any]:
    """The generator and the tokenizer it was trained on, checked against each other (vocabulary, latent grid)."""
    gen = load_generator(gen_path, device)
    tok = load_tokenizer(tok_path, device)
    if tok.vocab_size != gen.task.video_vocab:
        raise NbpError(f"{gen_path}: generator codes ({gen.task.video_vocab}) do not match {tok_path} ({tok.vocab_size})")
    clip = cfg.prepare[cfg.train_tokenizer[dag.gen_tokenizer(cfg, generator)].dataset]
    tok_grid = tuple(tok.latent_grid(clip.frames, clip.resolution, clip.resolution))
    if tok_grid != tuple(gen.task.layout.grid):
        raise NbpError(f"{gen_path}: blocks laid out on a latent grid {list(gen.task.layout.grid)}, but {tok_path} makes "
                       f"{list(tok_grid)} from {clip.frames}x{clip.resolution}x{clip.resolution} clips")
    return gen, tok


def conditions(task, cache: ClipCache, num: int, seed: int, stats_path: Path):
    """-> (class labels [num] or None, context clips or None): what the ``num`` videos are conditioned on."""
    labels = context = None
    if task.task in ("class", "hybrid"):
        labels = draw_labels(cache.labels, num, seed)
        if labels.max() >= task.num_classes:
            raise NbpError(f"{stats_path}: real labels go up to {labels.max()}, the generator knows {task.num_classes} classes")
    elif task.task == "frame_pred":
        index = np.resize(fvd.choose_clips(cache.video_ids, num, seed), num)  # repeats when the split is smaller
        context = LazyClips(cache, index)  # read per batch: 50,000 K600 clips do not fit in memory
    return labels, context


@dataclass
class Scoring:
    """What each seed's videos are made from and scored against (the same on every rank)."""

    tok: Any
    labels: np.ndarray | None  # class labels [num], or None
    context: Any  # frame prediction: LazyClips [num], else None
    num: int
    batch_size: int
    sampling: dict
    temporal_factor: int
    i3d: torch.nn.Module
    protocol: Any  # the real_stats entry: the FVD protocol
    real: tuple[np.ndarray, np.ndarray]  # the real clips' feature mean and covariance
    device: torch.device
    info: DistInfo


def score_seeds(model: LoadedGenerator, sc: Scoring, seeds: list[int], timer: Timer, keep: GridPicker | None,
                what: str) -> list[float]:
    """gFVD of each seed. The work is (seed, batch) units, seed-major; under torchrun each rank makes a contiguous share
    (:func:`nbp.distributed.share`) and the features are gathered in unit order. ``keep`` sees this rank's seed-0 videos."""
    nb = -(-sc.num // sc.batch_size)
    mine = [divmod(u, nb) for u in share(len(seeds) * nb, sc.info)]  # (seed index, batch)
    rs, feats = sc.protocol, []
    for k in sorted({k for k, _ in mine}):
        batches = [b for kk, b in mine if kk == k]
        for videos, lab, ctx in generate_videos(model, sc.tok, labels=sc.labels, context=sc.context, num=sc.num,
                                                batch_size=sc.batch_size, seed=seeds[k], device=sc.device, timer=timer,
                                                sampling=sc.sampling, temporal_factor=sc.temporal_factor,
                                                desc=f"eval_generator {what} seed {seeds[k]}", batches=batches):
            with timer("fvd"):
                feats.append(fvd.fvd_features_of_clips(videos, resolution=rs.resolution, batch_size=rs.batch_size,
                                                       device=sc.device, frames=rs.frames, model=sc.i3d, distributed=False))
            if k == 0 and keep is not None:
                keep.add(to_uint8_video(videos), lab, ctx)
    every = gather_rows(np.concatenate(feats) if feats else np.empty(0, np.float32), sc.info, sc.device)  # [seeds * num, D]
    out = []
    for k in range(len(seeds)):
        mu, sigma = fvd.feature_stats(every[k * sc.num:(k + 1) * sc.num])
        out.append(fvd.frechet_distance_from_stats(mu, sigma, *sc.real))
    return out


def run_eval_generator(cfg: Config, name: str, paths: dag.StagePaths | None = None) -> Path:
    """Evaluate one ``eval_generator`` entry -> ``{run.out}/eval_generator/{name}/`` (under torchrun: rank 0 writes)."""
    paths = paths or dag.resolve(cfg, "eval_generator", name)
    ec = cfg.entry("eval_generator", name)
    rs = cfg.entry("real_stats", ec.real_stats)
    device = resolve_device(cfg.run.device)
    info = init_distributed(device)
    torch.manual_seed(cfg.run.seed)

    gen_path, tok_path = paths.need("generator"), paths.need("tokenizer")
    gen, tok = load_pair(cfg, ec.generator, gen_path, tok_path, device)
    stats_path = paths.need("real_stats") / "stats.npz"
    real = fvd.load_stats(stats_path)
    task = gen.task
    cache = ClipCache(paths.need("clips"), rs.split)
    labels, context = conditions(task, cache, ec.num_videos, cfg.run.seed, stats_path)
    sampling = dict(temperature=ec.temperature, top_k=ec.top_k, top_p=ec.top_p, cfg=ec.cfg or None, cfg_schedule=ec.cfg_schedule)
    sc = Scoring(tok, labels, context, ec.num_videos, ec.batch_size, sampling, tok.config.temporal_factor,
                 fvd.get_i3d(paths.need("detector"), device), rs, real, device, info)
    timer, picker = Timer(device), GridPicker(ec.grid_videos)
    per_seed = score_seeds(gen, sc, list(ec.seeds), timer, picker, name)
    untrained = None
    if ec.untrained_baseline:  # the same architecture and sampling, freshly initialised (seeded by run.seed)
        torch.manual_seed(cfg.run.seed)
        fresh = LoadedGenerator(GPT(gen.model.config).to(device).eval(), task)
        untrained = score_seeds(fresh, sc, list(ec.seeds)[:1], Timer(device), None, f"{name} (untrained)")[0]
    picker = picker.gathered(info, device, labelled=labels is not None)
    seconds = sum_over_ranks(np.array([timer.seconds[k] for k in PHASES]), info, device)  # device-seconds
    metrics = eval_metrics(cfg, ec, sc, gen, per_seed, untrained, picker, dict(zip(PHASES, seconds.tolist())),
                           {int(c["label"]): c["name"] for c in cache.classes}, (gen_path, tok_path, stats_path))
    if info.is_main:
        clips, ncols, _ = picker.grid()
        with atomic_dir(paths.folder) as tmp:
            write_grid(tmp, clips, cfg.prepare[rs.dataset].fps, ncols=ncols, names=(paths.name("video"), paths.name("grid")))
            write_json(tmp / paths.name("metrics"), metrics)
        print(f"eval_generator {name}: gFVD {metrics['gfvd']:.1f}"
              + (f" +- {metrics['gfvd_std']:.1f}" if len(per_seed) > 1 else "")
              + (f" (untrained: {untrained:.1f})" if untrained is not None else "")
              + f", {metrics['steps']} steps, {metrics['fps']:.2f} frames/s ({metrics['device']})")
    barrier(info)
    return paths.folder


def eval_metrics(cfg: Config, ec, sc: Scoring, gen: LoadedGenerator, per_seed: list[float], untrained: float | None,
                 picker: GridPicker, s: dict[str, float], names: dict[int, str], files: tuple[Path, Path, Path]) -> dict:
    """metrics.json of an evaluation (``s``: seconds per phase, summed over the ranks)."""
    task, tf, rs = gen.task, sc.temporal_factor, sc.protocol
    clips, _, shown = picker.grid()
    frames_per_video = clips.shape[1] - context_pixel_frames(task.context_frames, tf)
    total = sc.num * len(ec.seeds)
    busy = s["generate"] + s["encode"] + s["decode"]
    gen_path, tok_path, stats_path = files
    metrics = {
        "gfvd": float(np.mean(per_seed)), "gfvd_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
        "gfvd_per_seed": per_seed, "seeds": list(ec.seeds), "gfvd_untrained": untrained, "steps": count_steps(task),
        "tokens_per_video": task.num_tokens - task.context_len, "num_videos": sc.num, "frames_per_video": frames_per_video,
        "generate_seconds": round(s["generate"], 3), "encode_seconds": round(s["encode"], 3),
        "decode_seconds": round(s["decode"], 3), "fvd_seconds": round(s["fvd"], 3),
        "fps": total * frames_per_video / busy, "samples_per_second": total / busy,
        "generate_fps": total * frames_per_video / s["generate"], "device": device_name(sc.device),
        "task": task.task, "block": list(task.layout.block), "grid": list(task.layout.grid),
        "protocol": {"real_stats": str(stats_path), "frames": rs.frames, "resolution": rs.resolution,
                     "context_frames": context_pixel_frames(task.context_frames, tf)},
        "sampling": sc.sampling, "generator": str(gen_path), "tokenizer": str(tok_path), "eval_config": to_dict(ec),
        "samples": ([names.get(k, str(k)) for k in shown] if shown else
                    "top: real clips, bottom: their predictions" if task.task == "frame_pred" else "unconditional samples"),
    }
    if sc.info.enabled:
        metrics["world_size"] = sc.info.world_size  # the seconds are summed over the ranks: fps stays per device
    return metrics
