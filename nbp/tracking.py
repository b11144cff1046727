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

    def media_path(self, suffix: str = ".mp4") -> str | None:
        """A new file name under the run's folder for a video the caller encodes (None when tracking is off).

        Callers write the mp4 themselves (e.g. with :func:`nbp.data.video_io.write_video`) and pass it to :meth:`video`:
        W&B's own encoder for raw arrays needs moviepy, which is not a dependency."""
        if self.run is None:
            return None
        self._videos += 1
        path = os.path.join(self.run.dir, "nbp_media", f"video_{self._videos:05d}{suffix}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def video(self, path: str | None, caption: str | None = None):
        """A W&B video of an encoded file (None when tracking is off)."""
        if self.run is None or path is None:
            return None
        return self._wandb.Video(path, caption=caption, format="mp4")

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
