"""Experiment tracking (W&B, offline by default) and progress bars.

W&B runs offline unless ``WANDB_MODE=online`` is set (or params ``run.wandb.mode: online``);
``WANDB_MODE=disabled`` or mode ``disabled`` turns it off. Only rank 0 logs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """A tqdm bar, silent on non-zero ranks and when NBP_PROGRESS=0."""
    disable = int(os.environ.get("RANK", "0")) != 0 or os.environ.get("NBP_PROGRESS", "1") == "0"
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)


class Tracker:
    """A thin W&B wrapper. ``run_id`` is stored in checkpoints so a resumed stage continues the run."""

    def __init__(self, *, project: str, name: str, config: dict, mode: str = "offline", entity: str | None = None,
                 run_id: str | None = None, dir: str | None = None, rank: int = 0):
        self.run = None
        self._videos = 0  # videos encoded so far (file names)
        mode = os.environ.get("WANDB_MODE", mode)
        if rank != 0 or mode == "disabled":
            return
        try:
            import wandb
        except ImportError:  # wandb is a dependency, but tracking must never break a stage
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        if dir:
            os.makedirs(dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, name=name, config=config, mode=mode,
                              id=run_id, resume="allow", dir=dir, reinit="finish_previous")

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, data: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def video(self, array, fps: int = 8, caption: str | None = None):
        """A W&B video from a uint8 array [T, C, H, W] (or None when tracking is off).

        The frames are encoded here with PyAV into an mp4 under the run's folder and handed to W&B as a file:
        W&B's own encoder for raw arrays needs moviepy, which is not a dependency.
        """
        if self.run is None:
            return None
        import numpy as np

        from nbp.data.video_io import write_video

        self._videos += 1
        path = os.path.join(self.run.dir, "nbp_media", f"video_{self._videos:05d}.mp4")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        frames = np.ascontiguousarray(np.asarray(array, dtype=np.uint8).transpose(0, 2, 3, 1))  # [T, H, W, C]
        write_video(path, frames, fps=fps)
        return self._wandb.Video(path, caption=caption, format="mp4")

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
