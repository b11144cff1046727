"""``nbp train_tokenizer``: train the causal tokenizer (or import a released one).

Losses: reconstruction (L1/L2) + perceptual (I3D features / LPIPS / none) + hinge PatchGAN with the VQGAN
adaptive weight from ``disc_start`` on (+ optional LeCam). AdamW, linear warm-up then cosine, gradient
clipping, optional EMA, an image warm-up on single frames, gradient accumulation, DDP under torchrun (gloo on
CPU, nccl on GPU), bf16 autocast on GPU. ``batch_size`` (and ``image_batch_size``) is the global batch, as the
paper reports it: each rank's micro-batch is ``batch_size / (world size x grad_accum)``.

The loop, rolling checkpoints, resume, history, W&B and the non-finite guard are :mod:`nbp.training`'s; the data
order is a pure function of (seed, sample counter), so a resumed CPU run ends with the same weights as an
uninterrupted one, bit for bit. Outputs (atomically, at the end): ``tokenizer.pt`` (EMA weights when enabled),
``history.csv``, ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nbp import dag
from nbp.checkpoint import inputs_fingerprint, save_checkpoint
from nbp.config import Config, ConfigError, TrainTokenizerConfig, to_dict
from nbp.data.clips import ClipCache
from nbp.data.video_io import write_video
from nbp.distributed import DistInfo, cleanup_distributed, init_distributed, resolve_device
from nbp.errors import NbpError
from nbp.io import atomic_dir, write_json
from nbp.tokenizer import tokenizer_checkpoint
from nbp.tokenizer.discriminator import build_discriminator
from nbp.tokenizer.losses import LeCam, adaptive_weight, build_perceptual, hinge_d_loss, hinge_g_loss, recon_loss
from nbp.tokenizer.model import VideoTokenizer, preset
from nbp.tokenizer.released import import_released
from nbp.training import Cadence, LoopState, Training, fit, resume_params, warmup_cosine, write_history

TRAIN_FORMAT = "nbp-tokenizer-train"


def run_train_tokenizer(cfg: Config, name: str, paths: dag.StagePaths | None = None) -> None:
    paths = paths or dag.resolve(cfg, "train_tokenizer", name)
    tcfg: TrainTokenizerConfig = cfg.entry("train_tokenizer", name)
    if tcfg.source == "released":
        import_released(cfg, name, tcfg, paths)
        return
    train = ClipCache(paths.need("clips"), "train")
    device = resolve_device(cfg.run.device)
    info = init_distributed(device)
    try:
        train_tokenizer(cfg, name, train.frames, device, info, paths)
    finally:
        cleanup_distributed()


# --------------------------------------------------------------------------------------
# pieces


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


def model_config_for(tcfg: TrainTokenizerConfig, key: str = "train_tokenizer"):
    mcfg = preset(tcfg.preset, channels=tcfg.channels, norm=tcfg.norm, res_blocks=tcfg.res_blocks)
    if mcfg.temporal_factor != tcfg.temporal_factor:
        raise ConfigError(f"{key}.temporal_factor", f"{tcfg.temporal_factor} differs from preset "
                          f"{tcfg.preset!r}'s temporal factor {mcfg.temporal_factor}")
    return mcfg


def micro_batch(total: int, world: int, accum: int, key: str, src: str) -> int:
    """Each rank's micro-batch of a global batch ``total`` (ConfigError naming ``key`` when it does not divide)."""
    if total % (world * accum):
        raise ConfigError(key, f"{total} is not divisible by world size {world} x grad_accum {accum}", src)
    return total // (world * accum)


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


# --------------------------------------------------------------------------------------
# the training


class TokenizerTraining(Training):
    train_format = TRAIN_FORMAT
    shown = ("recon",)

    def __init__(self, cfg: Config, name: str, frames, device: torch.device, info: DistInfo, paths: dag.StagePaths):
        self.cfg, self.name, self.stage, self.frames, self.device, self.info, self.paths = (
            cfg, name, "train_tokenizer", frames, device, info, paths)
        t = self.t = cfg.entry("train_tokenizer", name)
        key = f"train_tokenizer.{name}"
        self.mcfg = model_config_for(t, key)
        N, T, H, W, _ = frames.shape
        self._check_sizes(key, N, T, H, W)
        self.micro = micro_batch(t.batch_size, info.world_size, t.grad_accum, f"{key}.batch_size", cfg.params_file)
        self.image_micro = micro_batch(t.image_batch_size, info.world_size, t.grad_accum, f"{key}.image_batch_size",
                                       cfg.params_file) if t.image_steps else 0
        self.length = t.train_frames or T
        self.inputs_id = inputs_fingerprint(paths.inputs["clips"] / "train")
        self.bf16 = device.type == "cuda" and t.bf16
        torch.manual_seed(t.seed)
        np.random.seed(t.seed)
        self.model = VideoTokenizer(self.mcfg).to(device)
        self.disc = build_discriminator(t.disc, t.disc_channels, t.disc_layers)
        if self.disc is not None:
            _check_disc_fits(self.disc, T, H, W, key)
            self.disc = self.disc.to(device)
        self.lecam = LeCam().to(device)
        self.ema = [p.detach().clone() for p in self.model.parameters()] if t.ema > 0 else None
        weights = t.i3d_weights or _existing(paths.inputs["detector"])
        self.perceptual = (build_perceptual(t.perceptual, device, weights, paths.inputs.get("lpips"))
                           if t.perceptual != "none" else None)  # LPIPS: fetch_lpips's files (env vars override)
        self.opt_g = self._adamw(self.model.parameters())
        self.opt_d = self._adamw(self.disc.parameters()) if self.disc is not None else None
        self.net, self.net_d = self.model, self.disc  # DDP wrappers under torchrun
        if info.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
            self.net_d = DDP(self.disc, device_ids=ids) if self.disc is not None else None
        self.order = DataOrder(N, t.seed, t.hflip, T - self.length)
        self.image_order = DataOrder(N, t.seed, t.hflip, T - 1)  # image warm-up: one random frame of each clip
        self.samples = 0  # the data position: samples drawn so far, over all ranks
        self.last_batch = None  # (inputs, reconstructions) of the last step, for W&B

    def _check_sizes(self, key: str, N: int, T: int, H: int, W: int) -> None:
        t, m = self.t, self.mcfg
        if (T - 1) % m.temporal_factor or H % m.spatial_factor or W % m.spatial_factor:
            raise NbpError(f"clips of {T}x{H}x{W} do not fit the tokenizer (frames 1 + k*{m.temporal_factor}, "
                           f"sides divisible by {m.spatial_factor})")
        length = t.train_frames or T
        if length > T or (length - 1) % m.temporal_factor:
            raise ConfigError(f"{key}.train_frames", f"{length} must be 1 + k*{m.temporal_factor} and at most the clips' {T}")
        if t.image_steps and t.disc != "none" and t.disc_start < t.image_steps:
            raise ConfigError(f"{key}.disc_start", f"{t.disc_start} falls inside the image warm-up (image_steps "
                              f"{t.image_steps}); start the discriminator on videos")
        if N < t.batch_size:
            raise NbpError(f"{key}.batch_size: {t.batch_size} is more than the {N} training clips")

    def _adamw(self, params):
        return torch.optim.AdamW(params, lr=self.t.lr, betas=tuple(self.t.betas), weight_decay=self.t.weight_decay)

    def describe(self) -> dict:
        return {"config": self.mcfg.to_dict(), "params": resume_params(to_dict(self.t)), "inputs": self.inputs_id}

    def _lr(self, step: int) -> float:
        t = self.t
        return warmup_cosine(step, lr=t.lr, min_lr=t.min_lr, warmup=t.warmup_steps, total=t.steps)

    def set_lr(self, step: int) -> float:
        """The tokenizer's rate; the discriminator runs the same schedule from its own first step (``disc_start``)."""
        lr = self._lr(step)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        if self.opt_d is not None and step >= self.t.disc_start:
            for group in self.opt_d.param_groups:
                group["lr"] = self._lr(step - self.t.disc_start)
        return lr

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def generator_pass(self, x: torch.Tensor, use_gan: bool, image: bool, logs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct ``x`` [b, 3, T, H, W]; -> (the generator loss, the reconstruction)."""
        t, n = self.t, self.t.grad_accum
        with self._autocast():
            recon, _ = self.net(x)
        recon = recon.float()
        rec = recon_loss(x, recon, t.recon_loss)
        nll = rec
        if self.perceptual is not None and not (image and t.perceptual == "i3d"):  # I3D needs videos
            with self._autocast():
                p = self.perceptual(x, recon).float()
            nll = nll + t.perceptual_weight * p
            _acc(logs, "perceptual", p, n)
        loss = nll
        if use_gan:
            self.disc.requires_grad_(False)
            with self._autocast():
                g = hinge_g_loss(self.disc(recon).float())
            w = adaptive_weight(nll, g, self.model.decoder.last_layer_weight) * t.disc_weight
            loss = nll + w * g
            _acc(logs, "g_loss", g, n)
            _acc(logs, "d_weight", w, n)
        _acc(logs, "recon", rec, n)
        _acc(logs, "loss", loss, n)
        return loss, recon

    def discriminator_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]], logs: dict) -> None:
        """One discriminator update on the step's (real, reconstructed) micro-batches."""
        t = self.t
        self.disc.requires_grad_(True)
        for m, (x, fake) in enumerate(micro):
            sync = contextlib.nullcontext() if (not self.info.enabled or m == len(micro) - 1) else self.net_d.no_sync()
            with sync:
                with self._autocast():
                    logits = self.net_d(torch.cat([x, fake])).float()  # one pass: real and fake together
                real, fake_l = logits[: len(x)], logits[len(x):]
                d_loss = hinge_d_loss(real, fake_l)
                if t.lecam_weight > 0:
                    d_loss = d_loss + t.lecam_weight * self.lecam(real, fake_l)
                    self.lecam.update(real, fake_l)
                (d_loss / len(micro)).backward()
            _acc(logs, "d_loss", d_loss, len(micro))
            _acc(logs, "logits_real", real.mean(), len(micro))
            _acc(logs, "logits_fake", fake_l.mean(), len(micro))
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), t.grad_clip)
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)

    def train_step(self, step: int) -> dict[str, float]:
        t, info = self.t, self.info
        use_gan = self.disc is not None and step >= t.disc_start
        image = step < t.image_steps  # image warm-up: batches of single frames
        bs, length, order = (self.image_micro, 1, self.image_order) if image else (self.micro, self.length, self.order)
        micro, logs = [], {}
        for m in range(t.grad_accum):
            start = self.samples + (m * info.world_size + info.rank) * bs
            x = batch_tensor(self.frames, *order.indices(start, bs), length, self.device)
            sync = contextlib.nullcontext() if (not info.enabled or m == t.grad_accum - 1) else self.net.no_sync()
            with sync:
                loss, recon = self.generator_pass(x, use_gan, image, logs)
                (loss / t.grad_accum).backward()
            if use_gan:
                micro.append((x, recon.detach()))
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.model.parameters()):
                    e.lerp_(p.detach(), 1 - t.ema)
        if use_gan:
            self.discriminator_step(micro, logs)
        self.samples += bs * t.grad_accum * info.world_size
        self.last_batch = (x, recon.detach())
        if info.enabled:  # the mean over ranks (grad_norm is global already)
            keys = sorted(k for k in logs if k != "grad_norm")
            v = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(v)
            logs.update({k: float(x) / info.world_size for k, x in zip(keys, v.tolist())})
        return logs

    def history_row(self, state: LoopState) -> dict:
        means = {k: float(np.mean(v)) for k, v in state.window.items() if k != "seconds"}
        return {"step": state.step, **means, "seconds": round(state.seconds, 3)}

    def on_checkpoint(self, step: int) -> None:
        """Inputs above reconstructions of the last batch, as a W&B video."""
        path = self.tracker.media_path() if self.tracker is not None and self.last_batch is not None else None
        if path is not None:
            frames = _recon_grid(*self.last_batch).transpose(0, 2, 3, 1)  # [T, 2H, n*W, 3]
            write_video(path, np.ascontiguousarray(frames), fps=8)
            self.tracker.log({"train/reconstruction": self.tracker.video(path)}, step=step)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema, "lecam": self.lecam.state_dict(),
                "disc": self.disc.state_dict() if self.disc is not None else None, "opt_g": self.opt_g.state_dict(),
                "opt_d": self.opt_d.state_dict() if self.opt_d is not None else None,
                "data": {"seed": self.t.seed, "samples": self.samples}}

    def load_state_dict(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"], strict=True)
        self.opt_g.load_state_dict(ck["opt_g"])
        if self.disc is not None:
            self.disc.load_state_dict(ck["disc"], strict=True)
            self.opt_d.load_state_dict(ck["opt_d"])
        self.lecam.load_state_dict(ck["lecam"])
        if self.ema is not None:
            for e, v in zip(self.ema, ck["ema"]):
                e.copy_(v)
        self.samples = ck["data"]["samples"]

    def export(self, state: LoopState) -> None:
        if not self.info.is_main:
            return
        if self.ema is not None:
            with torch.no_grad():
                for p, e in zip(self.model.parameters(), self.ema):
                    p.copy_(e)
        _, T, H, W, _ = self.frames.shape
        final = state.history[-1] if state.history else {}
        model, t, paths = self.model, self.t, self.paths
        metrics = {
            "source": "train", "steps": state.step, "train_seconds": round(state.seconds, 2),
            "final_recon_loss": final.get("recon"), "final_loss": final.get("loss"),
            "params": sum(p.numel() for p in model.parameters()), "vocab_size": model.vocab_size,
            "latent_grid": list(model.latent_grid(T, H, W)), "device": str(self.device), "world_size": self.info.world_size,
            "ema": t.ema > 0, "wandb_run_id": state.wandb_run_id,
        }
        with atomic_dir(paths.folder) as tmp:
            save_checkpoint(tmp / paths.name("tokenizer"), tokenizer_checkpoint(
                model, preset=t.preset, source="train", step=state.step, dataset=t.dataset,
                clip={"frames": T, "height": H, "width": W}, train_config=to_dict(t), wandb_run_id=state.wandb_run_id))
            write_history(tmp / paths.name("history"), state.history)
            write_json(tmp / paths.name("metrics"), metrics)


def _existing(path: Path) -> str | None:
    return str(path) if path.is_file() else None


def train_tokenizer(cfg: Config, name: str, frames, device: torch.device, info: DistInfo | None = None,
                    paths: dag.StagePaths | None = None) -> Path:
    """Train on uint8 clips ``frames`` [N, T, H, W, 3]; returns the output folder."""
    paths = paths or dag.resolve(cfg, "train_tokenizer", name)
    info = info or DistInfo()
    t = cfg.entry("train_tokenizer", name)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the cores, shared by this machine's ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))))
    training = TokenizerTraining(cfg, name, frames, device, info, paths)
    cadence = Cadence(t.steps, row_every=t.log_every, log_every=t.log_every, checkpoint_every=t.checkpoint_every)
    wandb = {"project": cfg.run.wandb.project, "entity": cfg.run.wandb.entity, "mode": cfg.run.wandb.mode,
             "config": {"train_tokenizer": to_dict(t), "model": training.mcfg.to_dict()}}
    fit(training, cadence, paths.state, wandb)
    return paths.folder
