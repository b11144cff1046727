"""``nbp eval_tokenizer``: reconstruction quality of a tokenizer on the validation split.

Metrics (``{run.out}/eval_tokenizer/{name}/metrics.json``): rFVD (I3D features of the real clips vs their
reconstructions, the FVD protocol of ``nbp.metrics.fvd`` at the dataset's resolution), PSNR, SSIM, LPIPS (null
when its weights are unavailable), codebook usage (fraction of the vocabulary used, perplexity of the code
histogram), encode/decode speed. Reconstructions are rounded to uint8, as a stored video would be, before any
metric. ``recon.mp4`` / ``recon.gif``: ``grid_videos`` inputs spread evenly over the validation clips (top row)
above their reconstructions, enlarged to at least 64 pixels.
Everything streams batch by batch: only features, per-clip scores and the grid clips stay in memory.
Under torchrun each rank takes a contiguous share of the batches (whole batches, so every clip sees the arithmetic
of one process); the per-clip rows are gathered in clip order and only rank 0 writes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from nbp import dag
from nbp.config import Config, ConfigError
from nbp.data.clips import ClipCache
from nbp.data.video_io import video_grid, write_video
from nbp.distributed import DistInfo, barrier, gather_rows, init_distributed, resolve_device, share, sum_over_ranks, sync
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


ROWS = ("psnr", "ssim", "lpips", "feats_real", "feats_rec", "grid_real", "grid_rec")  # per-clip results, in clip order


def eval_batch(model, i3d, real_u8: np.ndarray, device: torch.device, lpips_folder, with_lpips: bool) -> dict:
    """One batch of real clips uint8 [B, T, H, W, 3] -> codes, reconstructions and their per-clip scores and features."""
    x = ClipCache.to_tensor(real_u8).to(device)  # [B, 3, T, H, W]
    with torch.inference_mode():
        t0 = time.perf_counter()
        codes = model.encode_codes(x)  # [B, T', H', W']
        sync(device)
        t1 = time.perf_counter()
        rec = model.decode_codes(codes)  # [B, 3, T, H, W] in [0, 1]
        sync(device)
        t2 = time.perf_counter()
    rec_u8 = (rec * 255).round_().to(torch.uint8)  # [B, 3, T, H, W]
    recf = rec_u8.float() / 255
    out = {"codes": codes.flatten().cpu().numpy(), "seconds": (t1 - t0, t2 - t1),
           "psnr": psnr(x, recf).cpu().numpy(), "ssim": ssim(x, recf).cpu().numpy(),
           "rec_u8": rec_u8.permute(0, 2, 3, 4, 1).cpu().numpy()}  # uint8 [B, T, H, W, 3]
    if with_lpips:
        out["lpips"] = lpips(x, recf, folder=lpips_folder).cpu().numpy()
    with torch.inference_mode():  # one I3D pass over real and reconstructed clips (FVD protocol at the data's size)
        both = torch.cat([torch.from_numpy(real_u8).to(device), rec_u8.permute(0, 2, 3, 4, 1)])  # uint8 [2B, T, H, W, 3]
        f = i3d(fvd.preprocess(both, fvd.FRAMES, resolution=real_u8.shape[2], sampling="first")).float().cpu().numpy()
    out["feats_real"], out["feats_rec"] = f[: len(x)], f[len(x):]  # [B, 400] each
    return out


def eval_share(model, i3d, val: ClipCache, n: int, batch_size: int, shown: np.ndarray, device, lpips_folder,
               with_lpips: bool, info: DistInfo, desc: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """This rank's share of the batches of the first ``n`` clips, gathered over the ranks in clip order ->
    (per-clip rows by ``ROWS`` name, code histogram [vocab], summed (encode, decode) seconds)."""
    counts = np.zeros(model.vocab_size, dtype=np.int64)
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ROWS}
    seconds = np.zeros(2)
    starts = range(0, n, batch_size)
    mine = [starts[i] for i in share(len(starts), info)]
    bar = progress(total=sum(min(batch_size, n - lo) for lo in mine), desc=desc, unit="clip")
    for lo in mine:
        real_u8 = val.batch(np.arange(lo, min(n, lo + batch_size)))  # uint8 [B, T, H, W, 3]
        b = eval_batch(model, i3d, real_u8, device, lpips_folder, with_lpips)
        counts += np.bincount(b["codes"], minlength=model.vocab_size)
        seconds += b["seconds"]
        for k in ("psnr", "ssim", "lpips", "feats_real", "feats_rec"):
            if k in b:
                rows[k].append(b[k])
        pick = shown[(shown >= lo) & (shown < lo + len(real_u8))] - lo
        rows["grid_real"].append(real_u8[pick])
        rows["grid_rec"].append(b["rec_u8"][pick])
        bar.update(len(real_u8))
    bar.close()
    full = {k: gather_rows(np.concatenate(v) if v else np.empty(0), info, device) for k, v in rows.items()}
    return full, sum_over_ranks(counts, info, device), sum_over_ranks(seconds, info, device)


def run_eval_tokenizer(cfg: Config, name: str, paths: dag.StagePaths | None = None) -> Path:
    """Stage ``eval_tokenizer`` (under torchrun: each rank a contiguous share of the batches, rank 0 writes)."""
    paths = paths or dag.resolve(cfg, "eval_tokenizer", name)
    ecfg = cfg.entry("eval_tokenizer", name)
    tcfg = cfg.entry("train_tokenizer", ecfg.tokenizer)
    tok_path, weights, clips = paths.need("tokenizer"), paths.need("detector"), paths.need("clips")
    device = resolve_device(cfg.run.device)
    info = init_distributed(device)
    model = load_tokenizer(tok_path, device)
    val = ClipCache(clips, "val")
    n = min(ecfg.num_videos, len(val))
    if len(val) < 2:
        raise NbpError(f"{clips}/val: {len(val)} clips, rFVD needs at least 2")
    if n < 2:
        raise ConfigError(f"eval_tokenizer.{name}.num_videos", f"{ecfg.num_videos}: rFVD needs at least 2", cfg.params_file)
    T, H, W = val.shape
    i3d = fvd.get_i3d(weights, device)
    lpips_folder = paths.inputs.get("lpips")  # fetch_lpips's files, when it fetched them (env vars override)
    with_lpips = lpips_available(folder=lpips_folder)
    shown = np.unique(np.linspace(0, n - 1, min(ecfg.grid_videos, n)).round().astype(int))  # spread over the classes
    rows, counts, (enc_s, dec_s) = eval_share(model, i3d, val, n, ecfg.batch_size, shown, device, lpips_folder, with_lpips,
                                              info, f"eval_tokenizer {name}")

    usage, perplexity = codebook_stats(counts)
    psnr_all = rows["psnr"]
    metrics = {
        "rfvd": fvd.frechet_distance(rows["feats_real"], rows["feats_rec"]),
        "psnr": float(np.mean(psnr_all[np.isfinite(psnr_all)])) if np.isfinite(psnr_all).any() else float("inf"),
        "ssim": float(np.mean(rows["ssim"])),
        "lpips": float(np.mean(rows["lpips"])) if with_lpips else None,
        "codebook_usage": usage,
        "perplexity": perplexity,
        "vocab_size": model.vocab_size,
        "num_videos": n,
        "frames": T,
        "resolution": H,
        "latent_grid": list(model.latent_grid(T, H, W)),
        "encode_clips_per_second": n / max(enc_s, 1e-9),  # per device: clips over the ranks' summed seconds
        "decode_clips_per_second": n / max(dec_s, 1e-9),
        "device": str(device),
        "tokenizer": str(tok_path),
    }
    if info.enabled:
        metrics["world_size"] = info.world_size
    out = paths.folder
    if info.is_main:
        _write_outputs(out, paths, metrics, np.concatenate([rows["grid_real"], rows["grid_rec"]]), len(shown),
                       float(cfg.prepare[tcfg.dataset].fps))
        print(f"eval_tokenizer {name}: rFVD {metrics['rfvd']:.2f}  PSNR {metrics['psnr']:.2f}  SSIM {metrics['ssim']:.4f}  "
              f"codebook {usage:.1%} (perplexity {perplexity:.1f})  -> {out}")
    barrier(info)
    return out


def _write_outputs(out: Path, paths: dag.StagePaths, metrics: dict, clips: np.ndarray, ncols: int, fps: float) -> None:
    """metrics.json and the input/reconstruction grid (inputs on top), atomically."""
    grid = video_grid(clips, ncols=ncols, min_side=64)
    with atomic_dir(out) as tmp:
        write_json(tmp / paths.name("metrics"), metrics)
        write_video(tmp / paths.name("video"), grid, fps=fps)
        write_video(tmp / paths.name("grid"), grid, fps=fps)
