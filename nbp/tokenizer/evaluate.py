"""``nbp eval_tokenizer``: reconstruction quality of a tokenizer on the validation split.

Metrics (``{run.out}/eval_tokenizer/{name}/metrics.json``): rFVD (I3D features of the real clips vs their
reconstructions, the FVD protocol of ``nbp.metrics.fvd`` at the dataset's resolution), PSNR, SSIM, LPIPS (null
when its weights are unavailable), codebook usage (fraction of the vocabulary used, perplexity of the code
histogram), encode/decode speed. Reconstructions are rounded to uint8, as a stored video would be, before any
metric. ``recon.mp4`` / ``recon.gif``: ``grid_videos`` inputs spread evenly over the validation clips (top row)
above their reconstructions, enlarged to at least 64 pixels.
Everything streams batch by batch: only features, per-clip scores and the grid clips stay in memory.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from nbp import dag
from nbp.config import Config
from nbp.data.clips import ClipCache
from nbp.data.video_io import video_grid, write_video
from nbp.distributed import resolve_device, sync
from nbp.errors import NbpError
from nbp.io import atomic_dir, write_json
from nbp.metrics import fvd
from nbp.metrics.image import lpips, lpips_available, psnr, ssim
from nbp.tokenizer import load_tokenizer
from nbp.tracking import progress


def codebook_stats(counts: np.ndarray) -> tuple[float, float]:
    """(fraction of codes used, perplexity exp(H) of the code histogram)."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts[counts > 0] / total
    return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum()))


def run_eval_tokenizer(cfg: Config, name: str, paths: dag.StagePaths | None = None) -> Path:
    paths = paths or dag.resolve(cfg, "eval_tokenizer", name)
    ecfg = cfg.entry("eval_tokenizer", name)
    tcfg = cfg.entry("train_tokenizer", ecfg.tokenizer)
    tok_path, weights, clips = paths.need("tokenizer"), paths.need("detector"), paths.need("clips")
    device = resolve_device(cfg.run.device)
    model = load_tokenizer(tok_path, device)
    val = ClipCache(clips, "val")
    n = min(ecfg.num_videos, len(val))
    if n < 2:
        raise NbpError(f"{clips}/val: {len(val)} clips, rFVD needs at least 2")
    T, H, W = val.shape
    i3d = fvd.get_i3d(weights, device)
    lpips_folder = paths.inputs.get("lpips")  # fetch_lpips's files, when it fetched them (env vars override)
    with_lpips = lpips_available(folder=lpips_folder)

    counts = np.zeros(model.vocab_size, dtype=np.int64)
    scores: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
    feats_real, feats_rec, grid_real, grid_rec = [], [], [], []
    shown = np.unique(np.linspace(0, n - 1, min(ecfg.grid_videos, n)).round().astype(int))  # spread over the classes
    enc_s = dec_s = 0.0
    bar = progress(total=n, desc=f"eval_tokenizer {name}", unit="clip")
    for lo in range(0, n, ecfg.batch_size):
        real_u8 = val.batch(np.arange(lo, min(n, lo + ecfg.batch_size)))  # uint8 [B, T, H, W, 3]
        x = ClipCache.to_tensor(real_u8).to(device)  # [B, 3, T, H, W]
        with torch.inference_mode():
            t0 = time.perf_counter()
            codes = model.encode_codes(x)  # [B, T', H', W']
            sync(device)
            t1 = time.perf_counter()
            rec = model.decode_codes(codes)  # [B, 3, T, H, W] in [0, 1]
            sync(device)
            t2 = time.perf_counter()
        enc_s, dec_s = enc_s + t1 - t0, dec_s + t2 - t1
        rec_u8 = (rec * 255).round_().to(torch.uint8)  # [B, 3, T, H, W]
        recf = rec_u8.float() / 255
        counts += np.bincount(codes.flatten().cpu().numpy(), minlength=model.vocab_size)
        scores["psnr"].append(psnr(x, recf).cpu().numpy())
        scores["ssim"].append(ssim(x, recf).cpu().numpy())
        if with_lpips:
            scores["lpips"].append(lpips(x, recf, folder=lpips_folder).cpu().numpy())
        with torch.inference_mode():  # one I3D pass over real and reconstructed clips (FVD protocol at the data's size)
            both = torch.cat([torch.from_numpy(real_u8).to(device), rec_u8.permute(0, 2, 3, 4, 1)])  # uint8 [2B, T, H, W, 3]
            f = i3d(fvd.preprocess(both, fvd.FRAMES, resolution=H, sampling="first")).float().cpu().numpy()  # [2B, 400]
        feats_real.append(f[: len(x)])
        feats_rec.append(f[len(x):])
        pick = shown[(shown >= lo) & (shown < lo + len(x))] - lo
        if len(pick):
            grid_real.append(real_u8[pick])
            grid_rec.append(rec_u8[torch.from_numpy(pick)].permute(0, 2, 3, 4, 1).cpu().numpy())  # uint8 [k, T, H, W, 3]
        bar.update(len(x))
    bar.close()

    usage, perplexity = codebook_stats(counts)
    psnr_all = np.concatenate(scores["psnr"])
    metrics = {
        "rfvd": fvd.frechet_distance(np.concatenate(feats_real), np.concatenate(feats_rec)),
        "psnr": float(np.mean(psnr_all[np.isfinite(psnr_all)])) if np.isfinite(psnr_all).any() else float("inf"),
        "ssim": float(np.mean(np.concatenate(scores["ssim"]))),
        "lpips": float(np.mean(np.concatenate(scores["lpips"]))) if with_lpips else None,
        "codebook_usage": usage,
        "perplexity": perplexity,
        "vocab_size": model.vocab_size,
        "num_videos": n,
        "frames": T,
        "resolution": H,
        "latent_grid": list(model.latent_grid(T, H, W)),
        "encode_clips_per_second": n / max(enc_s, 1e-9),
        "decode_clips_per_second": n / max(dec_s, 1e-9),
        "device": str(device),
        "tokenizer": str(tok_path),
    }
    grid = video_grid(np.concatenate(grid_real + grid_rec), ncols=len(shown), min_side=64)
    out = paths.folder
    fps = float(cfg.prepare[tcfg.dataset].fps)
    with atomic_dir(out) as tmp:
        write_json(tmp / paths.name("metrics"), metrics)
        write_video(tmp / paths.name("video"), grid, fps=fps)
        write_video(tmp / paths.name("grid"), grid, fps=fps)
    print(f"eval_tokenizer {name}: rFVD {metrics['rfvd']:.2f}  PSNR {metrics['psnr']:.2f}  SSIM {metrics['ssim']:.4f}  "
          f"codebook {usage:.1%} (perplexity {perplexity:.1f})  -> {out}")
    return out

