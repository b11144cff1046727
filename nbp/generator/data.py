"""Token shards written by ``nbp tokenize`` and the deterministic batch order of generator training.

Shard format (``{run.out}/tokenize/{tok}/``): ``meta.json`` (``grid``, ``vocab_size``, ``tokenizer``,
``classes``, ``fps``, ``frames``) and per split ``train/``, ``val/``: ``tokens.npy`` (int16 when the
vocabulary fits, else int32; [N, T', H', W']) and ``manifest.csv`` (``clip, video, label, class_text``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nbp.errors import NbpError
from nbp.io import load_array

MANIFEST_COLUMNS = ["clip", "video", "label", "class_text"]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.int16) if vocab_size <= np.iinfo(np.int16).max else np.dtype(np.int32)


def read_meta(root: str | Path) -> dict:
    path = Path(root) / "meta.json"
    if not path.is_file():
        raise NbpError(f"{path}: token shards not found (run `nbp tokenize` first)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NbpError(f"{path}: not valid JSON ({e}); run `nbp tokenize` again") from None
    if not isinstance(meta, dict) or not {"grid", "vocab_size"} <= set(meta):
        raise NbpError(f"{path}: expected a mapping with 'grid' and 'vocab_size'; run `nbp tokenize` again")
    return meta


def write_split(split_dir: str | Path, codes: np.ndarray, manifest: pd.DataFrame) -> None:
    """Write one split: ``tokens.npy`` (codes [N, T', H', W'], int16/int32) and ``manifest.csv``."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    if len(codes) != len(manifest):
        raise ValueError(f"{len(codes)} clips of codes but {len(manifest)} manifest rows")
    np.save(split_dir / "tokens.npy", codes)
    manifest[MANIFEST_COLUMNS].to_csv(split_dir / "manifest.csv", index=False)


class TokenShards:
    """One split of token shards: ``len()``, ``[i] -> (codes int64 [T', H', W'], label)``, ``batch(idx)``."""

    def __init__(self, root: str | Path, split: str):
        self.root, self.split = Path(root), split
        self.meta = read_meta(self.root)
        d = self.root / split
        for f in ("tokens.npy", "manifest.csv"):
            if not (d / f).is_file():
                raise NbpError(f"{d / f}: missing (run `nbp tokenize` again)")
        self.tokens = load_array(d / "tokens.npy", "token array")
        if self.tokens.ndim != 4 or self.tokens.dtype.kind not in "iu":
            raise NbpError(f"{d / 'tokens.npy'}: expected integer codes [N, T', H', W'], got {self.tokens.dtype} "
                           f"{list(self.tokens.shape)}")
        self.manifest = pd.read_csv(d / "manifest.csv")
        if len(self.manifest) != len(self.tokens):
            raise NbpError(f"{d}: manifest.csv has {len(self.manifest)} rows but tokens.npy {len(self.tokens)} clips")
        if list(self.tokens.shape[1:]) != list(self.meta["grid"]):
            raise NbpError(f"{d / 'tokens.npy'}: grid {list(self.tokens.shape[1:])} != meta.json grid {self.meta['grid']}")
        self.labels = torch.tensor(self.manifest["label"].to_numpy(), dtype=torch.long)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.meta["grid"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.asarray(self.tokens[i], dtype=np.int64)), int(self.labels[i])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip indices [B] -> (codes int64 [B, T', H', W'], labels [B])."""
        idx = idx.cpu()
        order = torch.argsort(idx)  # sorted reads from the memmap, then back to the asked order
        codes = np.asarray(self.tokens[idx[order].numpy()], dtype=np.int64)
        codes = torch.from_numpy(codes)[torch.argsort(order)]
        return codes, self.labels[idx]


class BatchOrder:
    """Deterministic global batches, a pure function of the step (so resume needs no sampler state).

    Global position ``g = step * global_batch + k`` takes element ``g % n`` of the permutation of epoch
    ``g // n`` (seeded by ``seed`` and the epoch). Rank ``r`` of ``world`` takes the r-th equal slice, and
    splits it into ``accum`` micro-batches: the same global batch whatever the number of processes.
    """

    def __init__(self, n: int, global_batch: int, seed: int = 0):
        if n <= 0:
            raise NbpError("no training clips in the token shards")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def global_indices(self, step: int) -> torch.Tensor:
        g = step * self.global_batch + torch.arange(self.global_batch)
        epochs = g // self.n
        return torch.stack([self._perm(int(e))[int(p)] for e, p in zip(epochs, g % self.n)])

    def micro_batches(self, step: int, rank: int = 0, world: int = 1, accum: int = 1) -> list[torch.Tensor]:
        per_rank = self.global_batch // world
        mine = self.global_indices(step)[rank * per_rank:(rank + 1) * per_rank]
        return list(mine.chunk(accum))
