"""Reader of the clip cache that `prepare` writes: ``prepare/{ds}/{train,val}/clips.npy`` + ``manifest.csv``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nbp.errors import NbpError
from nbp.io import load_array

MANIFEST_COLUMNS = ["clip", "video", "label", "class_name", "class_text", "fps", "num_frames", "start"]


class ClipCache:
    """Decoded clips of one split: ``cache[i] -> (uint8 [T, H, W, 3], label)``; a torch Dataset as it stands."""

    def __init__(self, root: str | Path, split: str):
        import pandas as pd

        self.root, self.split = Path(root), split
        folder = self.root / split
        for p in (folder / "clips.npy", folder / "manifest.csv", self.root / "classes.json"):
            if not p.is_file():
                raise NbpError(f"{p}: not found (run `nbp prepare` first)")
        self.frames = load_array(folder / "clips.npy", "clip cache")  # uint8 [N, T, H, W, 3]
        self.manifest = pd.read_csv(folder / "manifest.csv", keep_default_na=False)
        missing = [c for c in MANIFEST_COLUMNS if c not in self.manifest.columns]
        if missing:
            raise NbpError(f"{folder / 'manifest.csv'}: missing columns {missing}")
        if len(self.manifest) != len(self.frames) or self.frames.ndim != 5 or self.frames.dtype != np.uint8:
            raise NbpError(f"{folder}: clips.npy {self.frames.dtype} {list(self.frames.shape)} does not match "
                           f"manifest.csv ({len(self.manifest)} rows); rerun `nbp prepare`")
        self.labels = self.manifest["label"].to_numpy(np.int64)
        self.class_texts: list[str] = self.manifest["class_text"].astype(str).tolist()
        self.video_ids: list[str] = self.manifest["video"].astype(str).tolist()
        self.classes: list[dict] = json.loads((self.root / "classes.json").read_text())

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.array(self.frames[i]), int(self.labels[i])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, H, W) of every clip."""
        return tuple(self.frames.shape[1:4])

    def batch(self, indices) -> np.ndarray:
        """Clips at ``indices`` -> uint8 [B, T, H, W, 3] (one sorted read from the memmap)."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        out = np.empty((len(indices), *self.frames.shape[1:]), dtype=np.uint8)
        out[order] = self.frames[indices[order]]
        return out

    @staticmethod
    def to_tensor(batch):
        """uint8 [B, T, H, W, 3] (or [T, H, W, 3]; numpy or torch) -> float [B, 3, T, H, W] in [0, 1]."""
        import torch

        if isinstance(batch, torch.Tensor):
            x = batch
        else:
            arr = np.asarray(batch)
            x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if x.dim() == 4:
            x = x.unsqueeze(0)  # [1, T, H, W, 3]
        return x.permute(0, 4, 1, 2, 3).float().div_(255.0)  # [B, 3, T, H, W]
