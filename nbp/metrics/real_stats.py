"""Stage ``real_stats``: I3D feature statistics of a prepared split's real clips, the FVD reference."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from nbp import dag
from nbp.data.clips import ClipCache
from nbp.distributed import init_distributed, resolve_device
from nbp.errors import NbpError
from nbp.io import atomic_dir, write_json
from nbp.metrics.fvd import Rows, choose_clips, extract_features, get_i3d, save_stats


def run_real_stats(cfg, name: str, paths: dag.StagePaths | None = None) -> Path:
    """Stage ``real_stats``: I3D statistics of a prepared split's real clips -> stats.npz, features.npy, meta.json."""
    paths = paths or dag.resolve(cfg, "real_stats", name)
    rc = cfg.entry("real_stats", name)
    weights, clips = paths.need("detector"), paths.need("clips")
    device = resolve_device(cfg.run.device)
    info = init_distributed(device)
    cache = ClipCache(clips, rc.split)
    if len(cache) < 2:
        raise NbpError(f"{clips}/{rc.split}: {len(cache)} clips, FVD statistics need at least 2")
    index = choose_clips(cache.video_ids, rc.num_videos, cfg.run.seed)
    t0 = time.time()
    feats = extract_features(Rows(cache.frames, index), get_i3d(weights, device), batch_size=rc.batch_size, device=device,
                             frames=rc.frames, resolution=rc.resolution, sampling="first",
                             desc=f"real_stats {name}")
    seconds = time.time() - t0
    out = paths.folder
    if info.is_main:
        protocol = {"frames": rc.frames, "resolution": rc.resolution, "sampling": "first", "feature": "i3d-kinetics-400 logits"}
        with atomic_dir(out) as tmp:
            np.save(tmp / "features.npy", feats)
            save_stats(tmp / "stats.npz", feats, dataset=rc.dataset, split=rc.split, **protocol)
            write_json(tmp / "meta.json", {"dataset": rc.dataset, "split": rc.split, "n": int(len(feats)),
                                           "clips": [int(i) for i in index], **protocol, "device": str(device),
                                           "world_size": info.world_size, "seconds": round(seconds, 2),
                                           "clips_per_second": round(len(feats) / max(seconds, 1e-9), 3)})
        print(f"real_stats {name}: {len(feats)} clips of {rc.dataset}/{rc.split} -> {out}/stats.npz "
              f"({seconds:.1f} s, {len(feats) / max(seconds, 1e-9):.2f} clips/s)")
    if info.enabled:
        dist.barrier()
    return out
