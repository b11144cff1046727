"""Stage ``tokenize``: encode the prepared clips once into token shards (format in :mod:`nbp.generator.data`,
the generator's reader).

Generator training reads only these shards. Under torchrun each rank encodes a contiguous share of the batches;
the codes are gathered in clip order and only rank 0 writes. For training clips, the first ``train_clips_per_video``
clips of each video (of the random-start clips ``prepare`` kept) are encoded, so training still sees
several starts per video; validation clips are all encoded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from nbp import dag
from nbp.config import Config, ConfigError
from nbp.data.clips import ClipCache
from nbp.distributed import DistInfo, barrier, gather_rows, init_distributed, resolve_device, share
from nbp.generator.data import token_dtype, write_split
from nbp.io import atomic_dir, write_json
from nbp.tokenizer import load_tokenizer
from nbp.tracking import progress


def select_clips(video_ids, per_video: int | None) -> np.ndarray:
    """Indices of the first ``per_video`` clips of each video, in manifest order (None: all)."""
    if per_video is None:
        return np.arange(len(video_ids))
    rank = pd.Series(list(video_ids)).groupby(list(video_ids), sort=False).cumcount().to_numpy()
    return np.flatnonzero(rank < per_video)


def encode_clips(clips, indices: np.ndarray, encode: Callable[[torch.Tensor], torch.Tensor], vocab_size: int,
                 batch_size: int, device: torch.device, desc: str = "tokenize", info: DistInfo | None = None) -> np.ndarray:
    """Clips ``indices`` of a ClipCache -> codes [n, T', H', W'] (int16 when the vocabulary fits, else int32).

    Under torchrun (``info``) each rank encodes a contiguous share of the batches; the codes are gathered in order.
    """
    if len(indices) == 0:
        raise ValueError("no clips to tokenize")
    info = info or DistInfo()
    starts = range(0, len(indices), batch_size)
    parts = []
    for s in progress([starts[i] for i in share(len(starts), info)], desc=desc, unit="batch"):
        idx = indices[s:s + batch_size]
        video = clips.to_tensor(clips.batch(idx)).to(device)  # [b, 3, T, H, W] in [0, 1]
        with torch.no_grad():
            codes = encode(video).cpu().numpy()  # [b, T', H', W']
        if codes.min() < 0 or codes.max() >= vocab_size:
            raise ValueError(f"tokenizer returned codes outside [0, {vocab_size})")
        parts.append(codes.astype(token_dtype(vocab_size)))
    mine = np.concatenate(parts) if parts else np.empty(0, dtype=token_dtype(vocab_size))
    return gather_rows(mine, info, device)


def run_tokenize(cfg: Config, name: str, paths: dag.StagePaths | None = None) -> None:
    paths = paths or dag.resolve(cfg, "tokenize", name)
    tcfg = cfg.entry("tokenize", name)
    tok_cfg = cfg.train_tokenizer[tcfg.tokenizer]
    prep_cfg = cfg.prepare[tok_cfg.dataset]
    if tcfg.train_clips_per_video > prep_cfg.train_clips_per_video:
        raise ConfigError(f"tokenize.{name}.train_clips_per_video",
                          f"{tcfg.train_clips_per_video} > the {prep_cfg.train_clips_per_video} clips per video that "
                          f"prepare.{tok_cfg.dataset} keeps", cfg.params_file)
    tok_path, prep = paths.need("tokenizer"), paths.need("clips")
    device = resolve_device(cfg.run.device)
    info = init_distributed(device)
    tok = load_tokenizer(tok_path, device)
    t0 = time.time()
    splits = {}
    for split in ("train", "val"):
        clips = ClipCache(prep, split)
        keep = select_clips(clips.video_ids, tcfg.train_clips_per_video if split == "train" else None)
        codes = encode_clips(clips, keep, tok.encode_codes, tok.vocab_size, tcfg.batch_size, device,
                             desc=f"tokenize {name}/{split}", info=info)
        splits[split] = (clips, keep, codes)
    if info.is_main:
        clips, _, codes = splits["val"]
        _write_shards(paths.folder, splits, {
            "grid": list(codes.shape[1:]), "vocab_size": int(tok.vocab_size), "tokenizer": str(tok_path),
            "classes": clips.classes, "fps": prep_cfg.fps, "frames": prep_cfg.frames,
            "dtype": str(token_dtype(tok.vocab_size)), "clips": {k: len(keep) for k, (_, keep, _) in splits.items()},
            "train_clips_per_video": tcfg.train_clips_per_video, "device": str(device),
            "seconds": round(time.time() - t0, 2), **({"world_size": info.world_size} if info.enabled else {})})
    barrier(info)


def _write_shards(out, splits: dict, meta: dict) -> None:
    """The token shards of each split (codes, manifest) and ``meta`` as meta.json, atomically."""
    with atomic_dir(out) as tmp:
        for split, (clips, keep, codes) in splits.items():
            write_split(tmp / split, codes, pd.DataFrame({
                "clip": keep, "video": np.asarray(clips.video_ids)[keep], "label": np.asarray(clips.labels)[keep],
                "class_text": np.asarray(clips.class_texts)[keep]}))
        write_json(tmp / "meta.json", meta)
