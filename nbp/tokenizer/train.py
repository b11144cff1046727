"""``nbp train_tokenizer``: train the causal tokenizer (or import a released one).

Losses: reconstruction (L1/L2) + perceptual (I3D features / LPIPS / none) + hinge PatchGAN with the VQGAN
adaptive weight from ``disc_start`` on (+ optional LeCam). AdamW, linear warm-up then cosine, gradient
clipping, optional EMA, gradient accumulation, DDP under torchrun (gloo on CPU, nccl on GPU), bf16 autocast on
GPU. Rolling checkpoint ``{run.out}/checkpoints/train_tokenizer/{name}/last.pt`` every ``checkpoint_every``
steps (atomic; model, EMA, discriminator, optimizers, schedulers, LeCam state, RNG states, data position, W&B
run id, history). A rerun resumes from it; the data order is a pure function of (seed, sample counter), so a
resumed CPU run ends with the same weights as an uninterrupted one, bit for bit.

Outputs (atomically, at the end): ``{run.out}/train_tokenizer/{name}/tokenizer.pt`` (EMA weights when enabled),
``history.csv``, ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from nbp.checkpoint import inputs_fingerprint, load_checkpoint, save_checkpoint
from nbp.config import Config, ConfigError, TrainTokenizerConfig, to_dict
from nbp.distributed import DistInfo, cleanup_distributed, init_distributed, resolve_device
from nbp.errors import NbpError
from nbp.io import atomic_dir, write_json
from nbp.tokenizer import tokenizer_checkpoint
from nbp.tokenizer.discriminator import build_discriminator
from nbp.tokenizer.losses import LeCam, adaptive_weight, build_perceptual, hinge_d_loss, hinge_g_loss, recon_loss
from nbp.tokenizer.model import VideoTokenizer, preset
from nbp.tracking import Tracker, progress

TRAIN_FORMAT = "nbp-tokenizer-train"


def run_train_tokenizer(cfg: Config, name: str) -> None:
    tcfg: TrainTokenizerConfig = cfg.entry("train_tokenizer", name)
    if tcfg.source == "released":
        import_released(cfg, name, tcfg)
        return
    from nbp.data.clips import ClipCache

    prep = cfg.out_dir("prepare", tcfg.dataset)
    if not (prep / "train").is_dir():
        raise NbpError(f"{prep}/train: clip cache not found (run `nbp prepare {tcfg.dataset}` first)")
    train = ClipCache(prep, "train")
    device = resolve_device(cfg.run.device)
    info = init_distributed(device)
    try:
        train_tokenizer(cfg, name, train.frames, device, info)
    finally:
        cleanup_distributed()


# --------------------------------------------------------------------------------------
# pieces


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))


class DataOrder:
    """Which clips (and flips) make up each batch: a pure function of (seed, global sample counter).

    Epoch e visits the clips in ``permutation_e = default_rng([seed, e]).permutation(N)``; sample s of the run is
    ``permutation_{s // N}[s % N]``. Its whole state is the counter, saved in checkpoints.
    """

    def __init__(self, n: int, seed: int, hflip: bool, max_start: int = 0):
        self.n, self.seed, self.hflip, self.max_start = n, seed, hflip, max_start
        self._epoch, self._perm, self._flip, self._start = -1, None, None, None

    def _load_epoch(self, e: int) -> None:
        if e != self._epoch:
            self._perm = np.random.default_rng([self.seed, e]).permutation(self.n)
            aug = np.random.default_rng([self.seed, e, 1])
            self._flip = aug.random(self.n) < 0.5
            self._start = aug.integers(0, self.max_start + 1, self.n)
            self._epoch = e

    def indices(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (clip indices, horizontal flips, first frames) of samples start .. start+count-1."""
        idx, flip, t0 = np.empty(count, dtype=np.int64), np.zeros(count, dtype=bool), np.zeros(count, dtype=np.int64)
        for k in range(count):
            e, pos = divmod(start + k, self.n)
            self._load_epoch(e)
            idx[k] = self._perm[pos]
            flip[k] = self.hflip and self._flip[pos]
            t0[k] = self._start[pos]
        return idx, flip, t0


def batch_tensor(frames, idx: np.ndarray, flip: np.ndarray, t0: np.ndarray, length: int, device: torch.device) -> torch.Tensor:
    """uint8 clips [N, T, H, W, 3] at ``idx``, frames t0..t0+length-1 -> float [B, 3, length, H, W] in [0, 1]."""
    order = np.argsort(idx, kind="stable")  # sorted reads from the memmap
    clips = np.empty((len(idx), length) + tuple(frames.shape[2:]), dtype=np.uint8)
    for j in order:
        clips[j] = frames[idx[j], t0[j]:t0[j] + length]
    if flip.any():
        clips[flip] = clips[flip][:, :, :, ::-1]
    x = torch.from_numpy(clips).to(device)
    x = x.permute(0, 4, 1, 2, 3).float().div_(255.0)  # [B, 3, T, H, W]
    return x.contiguous()


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64)},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_config_for(tcfg: TrainTokenizerConfig, key: str = "train_tokenizer"):
    mcfg = preset(tcfg.preset, channels=tcfg.channels, norm=tcfg.norm)
    if mcfg.temporal_factor != tcfg.temporal_factor:
        raise ConfigError(f"{key}.temporal_factor", f"{tcfg.temporal_factor} differs from preset "
                          f"{tcfg.preset!r}'s temporal factor {mcfg.temporal_factor}")
    return mcfg


# the train-config keys that change the result: a checkpoint made with other values is not resumed
_RESUME_KEYS = ("preset", "channels", "norm", "steps", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay",
                "betas", "grad_clip", "train_frames", "image_steps", "image_batch_size", "recon_loss", "perceptual",
                "perceptual_weight", "disc", "disc_channels", "disc_layers", "disc_weight", "disc_start", "lecam_weight",
                "ema", "hflip", "seed")


@dataclass
class _State:
    step: int = 0
    samples: int = 0
    seconds: float = 0.0
    run_id: str | None = None


# --------------------------------------------------------------------------------------
# training


def train_tokenizer(cfg: Config, name: str, frames, device: torch.device, info: DistInfo | None = None) -> Path:
    """Train on uint8 clips ``frames`` [N, T, H, W, 3]; returns the output folder."""
    tcfg: TrainTokenizerConfig = cfg.entry("train_tokenizer", name)
    info = info or DistInfo()
    key = f"train_tokenizer.{name}"
    mcfg = model_config_for(tcfg, key)
    N, T, H, W, _ = frames.shape
    if (T - 1) % mcfg.temporal_factor or H % mcfg.spatial_factor or W % mcfg.spatial_factor:
        raise NbpError(f"clips of {T}x{H}x{W} do not fit the tokenizer (frames 1 + k*{mcfg.temporal_factor}, "
                       f"sides divisible by {mcfg.spatial_factor})")
    length = tcfg.train_frames or T
    if length > T or (length - 1) % mcfg.temporal_factor:
        raise ConfigError(f"{key}.train_frames", f"{length} must be 1 + k*{mcfg.temporal_factor} and at most the clips' {T}")
    if tcfg.image_steps and tcfg.disc != "none" and tcfg.disc_start < tcfg.image_steps:
        raise ConfigError(f"{key}.disc_start", f"{tcfg.disc_start} falls inside the image warm-up (image_steps "
                          f"{tcfg.image_steps}); start the discriminator on videos")
    if N < tcfg.batch_size:
        raise NbpError(f"{key}.batch_size: {tcfg.batch_size} is more than the {N} training clips")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the cores, shared by this machine's ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))))
    use_bf16 = device.type == "cuda" and tcfg.bf16
    ckpt_path = Path(cfg.run.out) / "checkpoints" / "train_tokenizer" / name / "last.pt"
    out = cfg.out_dir("train_tokenizer", name)

    torch.manual_seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    random.seed(tcfg.seed)
    model = VideoTokenizer(mcfg).to(device)
    disc = build_discriminator(tcfg.disc, tcfg.disc_channels, tcfg.disc_layers)
    if disc is not None:
        _check_disc_fits(disc, T, H, W, key)
        disc = disc.to(device)
    lecam = LeCam().to(device)
    ema = [p.detach().clone() for p in model.parameters()] if tcfg.ema > 0 else None
    perceptual = build_perceptual(tcfg.perceptual, device, _i3d_weights(cfg, tcfg)) if tcfg.perceptual != "none" else None

    def adamw(params):
        return torch.optim.AdamW(params, lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay)

    def schedule(opt):
        min_ratio = tcfg.min_lr / tcfg.lr
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tcfg.warmup_steps, tcfg.steps, min_ratio))

    opt_g, opt_d = adamw(model.parameters()), adamw(disc.parameters()) if disc is not None else None
    sched_g, sched_d = schedule(opt_g), schedule(opt_d) if opt_d is not None else None
    st = _State()
    history: list[dict] = []
    window: dict[str, list[float]] = {}  # per-step values since the last history row

    inputs_id = inputs_fingerprint(cfg.out_dir("prepare", tcfg.dataset) / "train")
    ck = None
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, map_location="cpu", expect=TRAIN_FORMAT)
        saved = ck["train_config"]
        stale = [k for k in _RESUME_KEYS if to_dict(getattr(tcfg, k)) != saved.get(k)]
        stale += ["training clips"] if ck.get("inputs") != inputs_id else []
        if stale:  # an upstream change (DVC/Snakemake rerun): the old run is not resumed, training starts over
            if info.is_main:
                print(f"train_tokenizer {name}: rolling checkpoint {ckpt_path} was made with other "
                      f"{', '.join(stale)}; starting over")
                ckpt_path.unlink()
            if info.enabled:
                dist.barrier()
            ck = None
    if ck is not None:
        model.load_state_dict(ck["model"], strict=True)
        opt_g.load_state_dict(ck["opt_g"])
        sched_g.load_state_dict(ck["sched_g"])
        if disc is not None:
            disc.load_state_dict(ck["disc"], strict=True)
            opt_d.load_state_dict(ck["opt_d"])
            sched_d.load_state_dict(ck["sched_d"])
        lecam.load_state_dict(ck["lecam"])
        if ema is not None:
            for e, v in zip(ema, ck["ema"]):
                e.copy_(v)
        set_rng_state(ck["rng"])
        st = _State(step=ck["step"], samples=ck["data"]["samples"], seconds=ck["train_seconds"], run_id=ck.get("wandb_run_id"))
        history = list(ck["history"])
        window.update({k: list(v) for k, v in ck.get("log_window", {}).items()})

    raw_model, raw_disc = model, disc
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        model = DDP(model, device_ids=ids)
        disc = DDP(disc, device_ids=ids) if disc is not None else None
    last_layer = raw_model.decoder.last_layer_weight

    tracker = Tracker(project=cfg.run.wandb.project, entity=cfg.run.wandb.entity, mode=cfg.run.wandb.mode,
                      name=f"train_tokenizer/{name}", config={"train_tokenizer": to_dict(tcfg), "model": mcfg.to_dict()},
                      run_id=st.run_id, dir=str(ckpt_path.parent), rank=info.rank)
    st.run_id = tracker.run_id or st.run_id
    order = DataOrder(N, tcfg.seed, tcfg.hflip, T - length)
    image_order = DataOrder(N, tcfg.seed, tcfg.hflip, T - 1)  # image warm-up: one random frame of each clip
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    def save(step: int) -> None:
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "format": TRAIN_FORMAT, "version": 1, "config": mcfg.to_dict(), "train_config": to_dict(tcfg),
                "model": raw_model.state_dict(), "ema": ema, "disc": raw_disc.state_dict() if raw_disc is not None else None,
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict() if opt_d is not None else None,
                "sched_g": sched_g.state_dict(), "sched_d": sched_d.state_dict() if sched_d is not None else None,
                "lecam": lecam.state_dict(), "step": step, "rng": rng_state(), "data": {"seed": tcfg.seed, "samples": st.samples},
                "wandb_run_id": st.run_id, "history": history, "log_window": window, "train_seconds": st.seconds,
                "inputs": inputs_id,
            })
        if info.enabled:
            dist.barrier()

    bar = progress(total=tcfg.steps, initial=st.step, desc=f"train_tokenizer {name}", unit="step")
    t0 = time.perf_counter()
    while st.step < tcfg.steps:
        step = st.step
        use_gan = disc is not None and step >= tcfg.disc_start
        image = step < tcfg.image_steps  # image warm-up: batches of single frames
        bs, frames_now, order_now = (tcfg.image_batch_size, 1, image_order) if image else (tcfg.batch_size, length, order)
        micro = []  # (x, recon) of each micro-batch, for the discriminator update
        logs: dict[str, float] = {}
        for m in range(tcfg.grad_accum):
            start = st.samples + (m * info.world_size + info.rank) * bs
            x = batch_tensor(frames, *order_now.indices(start, bs), frames_now, device)
            sync = contextlib.nullcontext() if (not info.enabled or m == tcfg.grad_accum - 1) else model.no_sync()
            with sync:
                with autocast():
                    recon, _ = model(x)
                recon = recon.float()
                rec = recon_loss(x, recon, tcfg.recon_loss)
                nll = rec
                if perceptual is not None and not (image and tcfg.perceptual == "i3d"):  # I3D needs videos
                    with autocast():
                        p = perceptual(x, recon).float()
                    nll = nll + tcfg.perceptual_weight * p
                    _acc(logs, "perceptual", p, tcfg.grad_accum)
                loss = nll
                if use_gan:
                    raw_disc.requires_grad_(False)
                    with autocast():
                        g = hinge_g_loss(raw_disc(recon).float())
                    w = adaptive_weight(nll, g, last_layer) * tcfg.disc_weight
                    loss = nll + w * g
                    _acc(logs, "g_loss", g, tcfg.grad_accum)
                    _acc(logs, "d_weight", w, tcfg.grad_accum)
                (loss / tcfg.grad_accum).backward()
            _acc(logs, "recon", rec, tcfg.grad_accum)
            _acc(logs, "loss", loss, tcfg.grad_accum)
            if use_gan:
                micro.append((x, recon.detach()))
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip))
        logs["lr"] = opt_g.param_groups[0]["lr"]
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        sched_g.step()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, raw_model.parameters()):
                    e.lerp_(p.detach(), 1 - tcfg.ema)
        if use_gan:
            raw_disc.requires_grad_(True)
            for m, (x, fake) in enumerate(micro):
                sync = contextlib.nullcontext() if (not info.enabled or m == len(micro) - 1) else disc.no_sync()
                with sync:
                    with autocast():
                        logits = disc(torch.cat([x, fake])).float()  # one pass: real and fake together
                    real, fake_l = logits[: len(x)], logits[len(x):]
                    d_loss = hinge_d_loss(real, fake_l)
                    if tcfg.lecam_weight > 0:
                        d_loss = d_loss + tcfg.lecam_weight * lecam(real, fake_l)
                        lecam.update(real, fake_l)
                    (d_loss / len(micro)).backward()
                _acc(logs, "d_loss", d_loss, len(micro))
                _acc(logs, "logits_real", real.mean(), len(micro))
                _acc(logs, "logits_fake", fake_l.mean(), len(micro))
            torch.nn.utils.clip_grad_norm_(raw_disc.parameters(), tcfg.grad_clip)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)
            sched_d.step()

        if info.enabled:  # history holds the mean over ranks (grad_norm and lr are global already)
            keys = sorted(k for k in logs if k not in ("grad_norm", "lr"))
            v = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(v)
            logs.update({k: float(x) / info.world_size for k, x in zip(keys, v.tolist())})
        st.step += 1
        st.samples += bs * tcfg.grad_accum * info.world_size
        now = time.perf_counter()
        st.seconds += now - t0
        t0 = now
        for k, v in logs.items():
            window.setdefault(k, []).append(v)
        bar.update(1)
        if st.step % tcfg.log_every == 0 or st.step == tcfg.steps:
            row = {"step": st.step, **{k: float(np.mean(v)) for k, v in window.items()}, "seconds": round(st.seconds, 3)}
            window.clear()
            history.append(row)
            bar.set_postfix(recon=f"{row['recon']:.4f}")
            tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=st.step)
        if st.step % tcfg.checkpoint_every == 0 or st.step == tcfg.steps:
            if tracker.run is not None:
                grid = _recon_grid(x, recon.detach())
                tracker.log({"train/reconstruction": tracker.video(grid, fps=8)}, step=st.step)
            save(st.step)
    bar.close()

    if info.is_main:
        if ema is not None:
            with torch.no_grad():
                for p, e in zip(raw_model.parameters(), ema):
                    p.copy_(e)
        _write_outputs(cfg, name, tcfg, raw_model, history, st, frames.shape, device, info)
    tracker.finish()
    if info.enabled:
        dist.barrier()
    return out


def _check_disc_fits(disc: nn.Module, T: int, H: int, W: int, key: str) -> None:
    """A discriminator too deep for the frame size fails here, with the key to change, not mid-training."""
    try:
        with torch.device("meta"):
            copy.deepcopy(disc).to("meta")(torch.empty(1, 3, T, H, W))
    except RuntimeError:
        raise ConfigError(f"{key}.disc_layers", f"{disc.__class__.__name__} with {len(disc.convs) - 1} layers "
                          f"does not fit {H}x{W} frames: use fewer layers") from None


def _acc(logs: dict, key: str, value, n: int) -> None:
    logs[key] = logs.get(key, 0.0) + float(value.detach() if isinstance(value, torch.Tensor) else value) / n


def _recon_grid(x: torch.Tensor, recon: torch.Tensor, n: int = 4):
    """Inputs above reconstructions -> uint8 [T, 3, 2H, n*W] for W&B."""
    both = torch.cat([x[:n], recon[:n].clamp(0, 1)], dim=3)  # [n, 3, T, 2H, W]
    grid = torch.cat(list(both), dim=3)  # [3, T, 2H, n*W]
    return (grid.permute(1, 0, 2, 3) * 255).round().to(torch.uint8).cpu().numpy()  # [T, 3, 2H, n*W]


def _i3d_weights(cfg: Config, tcfg: TrainTokenizerConfig) -> str | None:
    if tcfg.i3d_weights:
        return tcfg.i3d_weights
    from nbp.metrics.detector import I3D_FILENAME

    p = cfg.out_dir("fetch_detector") / I3D_FILENAME
    return str(p) if p.is_file() else None


def _write_outputs(cfg: Config, name: str, tcfg: TrainTokenizerConfig, model: VideoTokenizer, history: list[dict],
                   st: _State, shape, device: torch.device, info: DistInfo) -> None:
    out = cfg.out_dir("train_tokenizer", name)
    _, T, H, W, _ = shape
    final = history[-1] if history else {}
    metrics = {
        "source": "train", "steps": st.step, "train_seconds": round(st.seconds, 2),
        "final_recon_loss": final.get("recon"), "final_loss": final.get("loss"),
        "params": sum(p.numel() for p in model.parameters()), "vocab_size": model.vocab_size,
        "latent_grid": list(model.latent_grid(T, H, W)), "device": str(device), "world_size": info.world_size,
        "ema": tcfg.ema > 0, "wandb_run_id": st.run_id,
    }
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp / "tokenizer.pt", tokenizer_checkpoint(
            model, preset=tcfg.preset, source="train", step=st.step, dataset=tcfg.dataset,
            clip={"frames": T, "height": H, "width": W}, train_config=to_dict(tcfg), wandb_run_id=st.run_id))
        _write_history(tmp / "history.csv", history)
        write_json(tmp / "metrics.json", metrics)


def _write_history(path: Path, history: list[dict]) -> None:
    keys = ["step"] + sorted({k for row in history for k in row} - {"step"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow(row)


# --------------------------------------------------------------------------------------
# released import


def import_released(cfg: Config, name: str, tcfg: TrainTokenizerConfig) -> Path:
    """source: released -> fetch (URL) or read (path) a ``magvit2_*.pt``, convert strictly, write our tokenizer.pt."""
    from nbp.data.download import fetch, sha256_file
    from nbp.tokenizer.released import load_released

    src = tcfg.checkpoint
    if src is None:
        raise ConfigError(f"train_tokenizer.{name}.checkpoint", "source is 'released' but no checkpoint is given")
    if "://" in src:
        dest = Path(cfg.run.out) / "checkpoints" / "train_tokenizer" / name / Path(src.split("?")[0]).name
        path = fetch(src, dest)
    else:
        path = Path(src)
    model = load_released(path)
    out = cfg.out_dir("train_tokenizer", name)
    p = cfg.prepare[tcfg.dataset]
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp / "tokenizer.pt", tokenizer_checkpoint(
            model, preset="base", source="released", released_file=src, sha256=sha256_file(path), dataset=tcfg.dataset,
            clip={"frames": p.frames, "height": p.resolution, "width": p.resolution}, train_config=to_dict(tcfg)))
        _write_history(tmp / "history.csv", [])
        write_json(tmp / "metrics.json", {
            "source": "released", "checkpoint": src, "sha256": sha256_file(path),
            "params": sum(q.numel() for q in model.parameters()), "vocab_size": model.vocab_size,
            "latent_grid": list(model.latent_grid(p.frames, p.resolution, p.resolution)),
        })
    return out
