"""Stage ``tokenize``: encode the prepared clips once into token shards (format in :mod:`nbp.generator.data`,
the generator's reader).

Generator training reads only these shards. For training clips, the first ``train_clips_per_video``
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
from nbp.distributed import resolve_device
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
                 batch_size: int, device: torch.device, desc: str = "tokenize") -> np.ndarray:
    """Clips ``indices`` of a ClipCache -> codes [n, T', H', W'] (int16 when the vocabulary fits, else int32)."""
    out = None
    for s in progress(range(0, len(indices), batch_size), desc=desc, unit="batch"):
        idx = indices[s:s + batch_size]
        video = clips.to_tensor(clips.batch(idx)).to(device)  # [b, 3, T, H, W] in [0, 1]
        with torch.no_grad():
            codes = encode(video).cpu().numpy()  # [b, T', H', W']
        if codes.min() < 0 or codes.max() >= vocab_size:
            raise ValueError(f"tokenizer returned codes outside [0, {vocab_size})")
        if out is None:
            out = np.empty((len(indices), *codes.shape[1:]), dtype=token_dtype(vocab_size))
        out[s:s + len(idx)] = codes
    if out is None:
        raise ValueError("no clips to tokenize")
    return out


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
    tok = load_tokenizer(tok_path, device)
    t0 = time.time()
    counts, grid, classes = {}, None, None
    with atomic_dir(paths.folder) as tmp:
        for split in ("train", "val"):
            clips = ClipCache(prep, split)
            classes = clips.classes
            keep = select_clips(clips.video_ids, tcfg.train_clips_per_video if split == "train" else None)
            codes = encode_clips(clips, keep, tok.encode_codes, tok.vocab_size, tcfg.batch_size, device,
                                 desc=f"tokenize {name}/{split}")
            grid = list(codes.shape[1:])
            write_split(tmp / split, codes, pd.DataFrame({
                "clip": keep, "video": np.asarray(clips.video_ids)[keep], "label": np.asarray(clips.labels)[keep],
                "class_text": np.asarray(clips.class_texts)[keep]}))
            counts[split] = len(keep)
        write_json(tmp / "meta.json", {
            "grid": grid, "vocab_size": int(tok.vocab_size), "tokenizer": str(tok_path), "classes": classes,
            "fps": prep_cfg.fps, "frames": prep_cfg.frames, "dtype": str(token_dtype(tok.vocab_size)),
            "clips": counts, "train_clips_per_video": tcfg.train_clips_per_video, "device": str(device),
            "seconds": round(time.time() - t0, 2),
        })
