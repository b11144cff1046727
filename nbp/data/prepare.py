"""The `prepare` stage: decode and resize clips once into a uint8 clip cache.

Output ``{run.out}/prepare/{name}/`` (written atomically):

- ``classes.json``: ``[{"label", "name", "text"}, ...]``
- ``{train,val}/clips.npy``: uint8 [N, T, H, W, 3] (np.save format, read with ``mmap_mode="r"``)
- ``{train,val}/manifest.csv``: ``clip, video, label, class_name, class_text, fps, num_frames, start``
  (``fps`` and ``num_frames`` of the source video, ``start`` its first source frame in the clip)
- ``report.json``: counts per split and every skipped video with the reason.

Training videos give ``train_clips_per_video`` clips with random starts (seeded by ``run.seed`` and the
video's position, so the cache does not depend on the number of workers); ``val`` videos give one
centre clip. Corrupt, unreadable, empty and too-short videos are skipped; when more than
``max_bad_fraction`` of a split is bad the stage fails and leaves the report in ``{run.out}/logs/prepare/``.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nbp import dag
from nbp.data.clips import MANIFEST_COLUMNS
from nbp.data.datasets import SUBSETS, VideoRecord, open_dataset
from nbp.data.video_io import EmptyVideoError, VideoError, VideoTooShortError, probe, read_clip
from nbp.errors import NbpError
from nbp.io import allocate, atomic_dir, write_json
from nbp.tracking import progress

COPY_ROWS = 256  # clips per copy when compacting the cache after skipped videos


@dataclass(frozen=True)
class ClipSpec:
    frames: int
    fps: float
    size: int
    resize: str
    clips_per_video: int
    start: str  # random (train) | center (val)
    seed: int
    split_code: int


# ---- worker side: one memmap per process ---------------------------------------------------
_STATE: dict = {}


def _init_worker(clips_path: str, spec: ClipSpec) -> None:
    _STATE["clips"] = np.load(clips_path, mmap_mode="r+")
    _STATE["spec"] = spec


def _strip(path: Path, message: str) -> str:
    return message.removeprefix(f"{path}: ")


def _process(task: tuple[int, str]) -> tuple[int, dict]:
    """Decode one video's clips into rows [i*k, (i+1)*k) of the memmap; never raises."""
    i, path = task
    spec: ClipSpec = _STATE["spec"]
    k = spec.clips_per_video
    rng = np.random.default_rng([spec.seed, spec.split_code, i])
    p = Path(path)
    try:
        info = probe(p)
        starts = []
        for j in range(k):
            clip, idx = read_clip(p, spec.frames, spec.fps, spec.start, spec.size, spec.resize, rng=rng, info=info,
                                  return_indices=True)
            _STATE["clips"][i * k + j] = clip
            starts.append(int(idx[0]))
        return i, {"fps": round(info.fps, 4), "num_frames": info.num_frames, "starts": starts}
    except VideoTooShortError as e:
        return i, {"kind": "too_short", "reason": _strip(p, str(e))}
    except EmptyVideoError as e:
        return i, {"kind": "empty", "reason": _strip(p, str(e))}
    except VideoError as e:
        return i, {"kind": "corrupt", "reason": _strip(p, str(e))}
    except Exception as e:  # noqa: BLE001 - one odd file must not stop the stage
        return i, {"kind": "error", "reason": f"{type(e).__name__}: {e}"[:300]}


# ---- parent side ---------------------------------------------------------------------------


def _subsample(videos: list[VideoRecord], limit: int | None, seed: int) -> list[VideoRecord]:
    if limit is None or limit >= len(videos):
        return videos
    keep = np.sort(np.random.default_rng([seed, len(videos)]).choice(len(videos), size=limit, replace=False))
    return [videos[j] for j in keep]


def _decode_split(videos: list[VideoRecord], folder: Path, spec: ClipSpec, workers: int, desc: str) -> dict[int, dict]:
    """Fill ``folder/clips.npy`` (rows of skipped videos stay unused) -> per-video results."""
    k = spec.clips_per_video
    clips_path = folder / "clips.npy"
    mm = np.lib.format.open_memmap(clips_path, mode="w+", dtype=np.uint8,
                                   shape=(len(videos) * k, spec.frames, spec.size, spec.size, 3))
    del mm
    allocate(clips_path)  # the blocks, not a sparse file: a full disk is one line here, not a SIGBUS in a worker
    tasks = [(i, str(v.path)) for i, v in enumerate(videos)]
    results: dict[int, dict] = {}
    bar = progress(total=len(tasks), desc=desc, unit="video")
    if workers <= 1 or len(tasks) < 4:
        _init_worker(str(clips_path), spec)
        try:
            for task in tasks:
                i, res = _process(task)
                results[i] = res
                bar.update()
        finally:
            _STATE.clear()
    else:
        ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads or torch
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(clips_path), spec)) as pool:
            for i, res in pool.imap_unordered(_process, tasks, chunksize=max(1, min(8, len(tasks) // (4 * workers)))):
                results[i] = res
                bar.update()
    bar.close()
    return results


def _compact(folder: Path, ok: list[int], k: int) -> None:
    """Rewrite clips.npy with only the rows of videos that succeeded (in order)."""
    src_path, dst_path = folder / "clips.npy", folder / "clips.compact.npy"
    src = np.load(src_path, mmap_mode="r")
    rows = np.asarray([i * k + j for i in ok for j in range(k)], dtype=np.int64)
    dst = np.lib.format.open_memmap(dst_path, mode="w+", dtype=np.uint8, shape=(len(rows), *src.shape[1:]))
    allocate(dst_path)
    for a in range(0, len(rows), COPY_ROWS):
        dst[a:a + COPY_ROWS] = src[rows[a:a + COPY_ROWS]]
    dst.flush()
    del src, dst
    os.replace(dst_path, src_path)


def _write_manifest(path: Path, videos: list[VideoRecord], ok: list[int], results: dict[int, dict], k: int) -> int:
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        for i in ok:
            v, r = videos[i], results[i]
            for start in r["starts"]:
                w.writerow([n, v.video, v.label, v.class_name, v.class_text, r["fps"], r["num_frames"], start])
                n += 1
    return n


def run_prepare(cfg, name: str, paths: dag.StagePaths | None = None) -> None:
    """Stage `prepare`: the clip cache of one `prepare` entry."""
    paths = paths or dag.resolve(cfg, "prepare", name)
    entry = cfg.entry("prepare", name)
    dl = cfg.entry("download", entry.dataset)
    src_root = paths.need("source")
    out = paths.folder
    ds = open_dataset(dl.source, src_root, entry.split)
    report: dict = {"dataset": entry.dataset, "source": dl.source, "frames": entry.frames, "fps": entry.fps,
                    "resolution": entry.resolution, "resize": entry.resize, "max_bad_fraction": entry.max_bad_fraction,
                    "splits": {}, "skipped": []}
    failures = []
    with atomic_dir(out) as tmp:
        write_json(tmp / "classes.json", [c.as_dict() for c in ds.classes])
        for code, subset in enumerate(SUBSETS):
            videos = _subsample(ds.videos(subset), entry.max_videos.get(subset), cfg.run.seed)
            if not videos:
                listed = ds.list_file(subset) if hasattr(ds, "list_file") else ds.root / "annotations" / f"{subset}.csv"
                raise NbpError(f"{listed}: no videos in the {subset} split (prepare.{name}, dataset {src_root})")
            train = subset == "train"
            spec = ClipSpec(entry.frames, entry.fps, entry.resolution, entry.resize,
                            entry.train_clips_per_video if train else 1, "random" if train else "center", cfg.run.seed, code)
            folder = tmp / subset
            folder.mkdir()
            results = _decode_split(videos, folder, spec, entry.workers, f"prepare {name}/{subset}")
            ok = [i for i in range(len(videos)) if "starts" in results[i]]
            bad = [i for i in range(len(videos)) if "starts" not in results[i]]
            if bad:
                _compact(folder, ok, spec.clips_per_video)
            n_clips = _write_manifest(folder / "manifest.csv", videos, ok, results, spec.clips_per_video)
            kinds: dict[str, int] = {}
            for i in bad:
                kinds[results[i]["kind"]] = kinds.get(results[i]["kind"], 0) + 1
                report["skipped"].append({"split": subset, "video": videos[i].video, **results[i]})
            frac = len(bad) / max(1, len(videos))
            report["splits"][subset] = {"videos": len(videos), "ok": len(ok), "skipped": len(bad), "skipped_by_kind": kinds,
                                        "bad_fraction": round(frac, 6), "clips": n_clips,
                                        "not_downloaded": getattr(ds, "missing", {}).get(subset, 0)}
            if frac > entry.max_bad_fraction or not ok:
                first = report["skipped"][-len(bad)]
                failures.append(f"{len(bad)} of {len(videos)} {subset} videos are bad ({frac:.1%} > max_bad_fraction "
                                f"{entry.max_bad_fraction:.1%}; first: {first['video']}: {first['reason']})")
        if failures:
            log = paths.logs / "report.json"
            write_json(log, report)
            raise NbpError(f"prepare.{name}: {'; '.join(failures)}; full list in {log}")
        write_json(tmp / "report.json", report)
    s = report["splits"]
    print(f"prepare {name}: {s['train']['clips']} train + {s['val']['clips']} val clips in {out} "
          f"({len(report['skipped'])} videos skipped)")
