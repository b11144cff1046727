"""The `download` stage: fetch a dataset into ``{run.out}/download/{name}/`` in its source layout.

- ``embedded``: generates the synthetic moving-shapes videos (nbp.data.embedded).
- ``ucf101``: ``UCF101.rar`` (videos) + the train/test split zip.
- ``k600``: per split, the CVDF list ``{lists}/{split}/k600_{split}_path.txt`` of tar.gz archives, and the
  annotation CSVs ``{annotations}/{split}.csv``. ``max_archives: {split: N}`` takes only the first N archives of a
  split's list (in list order; the stage prints how many it skipped); the CSVs stay whole, and ``prepare`` reads
  only the rows whose video is present (``Kinetics600.missing`` counts the others).
- ``root`` set: an existing local copy in the source's layout is linked, nothing is fetched (``max_archives`` does
  not apply).

Fetching and checksums: :mod:`nbp.data.fetch`; safe extraction: :mod:`nbp.data.archives`. Archives are kept
in the stage's state folder ``{run.out}/archives/{name}/`` (outside the stage's output, so reruns resume);
extraction goes to ``.../staging/`` with a marker per extracted archive, and the finished tree is renamed
into place at the end.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nbp import dag
from nbp.config import to_dict
from nbp.data import embedded
from nbp.data.archives import safe_extract
from nbp.data.fetch import LockFile, fetch, lock_for, open_url, sha256_file
from nbp.errors import NbpError
from nbp.io import atomic_dir, write_json
from nbp.tracking import progress


@dataclass
class Item:
    url: str
    file: Path  # where the download goes
    extract_to: str | None  # relative folder in the dataset tree to extract into; None: copy the file to ``place``
    place: str | None = None  # relative path of a plain file in the dataset tree


def _name_of(url: str) -> str:
    return PurePosixPath(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name


def _ucf_items(entry, archives: Path) -> list[Item]:
    for k in ("videos", "splits"):
        if k not in entry.urls:
            raise NbpError(f"download: urls.{k} is missing for the ucf101 source")
    v, s = entry.urls["videos"], entry.urls["splits"]
    return [Item(v, archives / _name_of(v), "."), Item(s, archives / _name_of(s), ".")]


def _k600_items(entry, archives: Path, lock: LockFile, fetch_lists: bool, dry_run: bool,
                skipped: dict[str, tuple[int, int]] | None = None) -> list[Item]:
    """The annotation CSVs, the archive lists and the archives of every split (only the first
    ``max_archives[split]`` of a split's list, in list order). ``skipped``, when given, gets
    split -> (archives listed, archives left out) for the splits whose list could be read."""
    for k in ("lists", "annotations"):
        if k not in entry.urls:
            raise NbpError(f"download: urls.{k} is missing for the k600 source")
    limits = entry.max_archives or {}
    items = []
    for split in entry.splits:
        ann = f"{entry.urls['annotations'].rstrip('/')}/{split}.csv"
        items.append(Item(ann, archives / "annotations" / f"{split}.csv", None, f"k600/annotations/{split}.csv"))
        list_url = f"{entry.urls['lists'].rstrip('/')}/{split}/k600_{split}_path.txt"
        list_file = archives / f"k600_{split}_path.txt"
        items.append(Item(list_url, list_file, None, None))
        text = None
        if list_file.is_file():
            text = list_file.read_text()
        elif fetch_lists and dry_run:
            try:
                with open_url(list_url, 0, 30) as r:
                    text = r.read().decode()
            except (urllib.error.URLError, OSError) as e:
                print(f"  (cannot read {list_url} now: {getattr(e, 'reason', e)}; its archives are listed after it is fetched)")
        elif fetch_lists:
            text = fetch(list_url, list_file, lock=lock).read_text()
        urls = [u for u in (line.strip() for line in (text or "").splitlines()) if u]
        keep = urls if limits.get(split) is None else urls[:limits[split]]
        if skipped is not None and text is not None:
            skipped[split] = (len(urls), len(urls) - len(keep))
        items += [Item(url, archives / split / _name_of(url), f"k600/{split}") for url in keep]
    return items


def _skip_lines(name: str, skipped: dict[str, tuple[int, int]], done: str = "fetched") -> list[str]:
    """One line per split whose archives ``download.{name}.max_archives`` limited."""
    return [f"  {split}: {total - left_out} of {total} archives {done}, {left_out} skipped "
            f"(download.{name}.max_archives.{split})" for split, (total, left_out) in skipped.items() if left_out]


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished tree into place (replacing an old one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)


def check_layout(source: str, root: Path) -> list[str]:
    need = {"ucf101": ["UCF-101", "ucfTrainTestlist/classInd.txt"], "embedded": ["UCF-101", "ucfTrainTestlist/classInd.txt"],
            "k600": ["k600/annotations"]}[source]
    missing = [n for n in need if not (root / n).exists()]
    if missing:
        raise NbpError(f"{root}: not a {source} layout (missing {', '.join(missing)})")
    return [n.split("/")[0] for n in need]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _dry_run(entry, out: Path, items: list[Item], lock: LockFile) -> None:
    for it in items:
        part = it.file.with_name(it.file.name + ".part")
        state = ("present" if it.file.exists() else f"partial {_size(part.stat().st_size)}, resumes" if part.exists()
                 else "to fetch")
        known = "sha256 in lock" if lock.get(it.url) else "sha256 recorded at first download"
        where = (f"extract into {out / it.extract_to}" if it.extract_to else f"copy to {out / it.place}" if it.place
                 else "list of archives")
        print(f"  {it.url}\n      -> {it.file} ({state}; {known}); {where}")
    print(f"  then: {out}/ in the {entry.source} layout; checksums: {lock.path}")


def run_download(cfg, name: str, paths: dag.StagePaths | None = None, dry_run: bool = False) -> None:
    """Stage `download`: the entry's dataset in its source layout at ``{run.out}/download/{name}/``."""
    paths = paths or dag.resolve(cfg, "download", name)
    entry = cfg.entry("download", name)
    out = paths.folder
    if entry.root:
        root = Path(entry.root).expanduser().resolve()
        if entry.max_archives is not None:
            print(f"download {name}: max_archives does not apply to a local copy (root); it is linked whole")
        if dry_run:
            print(f"download {name} (dry run): would link the local copy {root} into {out}/")
            return
        tops = check_layout(entry.source, root)
        with atomic_dir(out) as tmp:
            for top in sorted(set(tops)):
                os.symlink(root / top, tmp / top)
            write_json(tmp / "source.json", {"source": entry.source, "root": str(root)})
        print(f"download {name}: linked {root} -> {out}")
        return
    if entry.source == "embedded":
        _run_embedded(name, entry, out, dry_run)
        return
    lock = lock_for(cfg)
    archives = paths.state
    if dry_run:
        print(f"download {name} (dry run): nothing is fetched or written")
    skipped: dict[str, tuple[int, int]] = {}
    if entry.source == "ucf101":
        items = _ucf_items(entry, archives)
    else:
        items = _k600_items(entry, archives, lock, fetch_lists=True, dry_run=dry_run, skipped=skipped)
    if dry_run:
        _dry_run(entry, out, items, lock)
        for line in _skip_lines(name, skipped, "to fetch"):
            print(line)
        return
    staging = archives / "staging"
    marks = archives / "extracted"

    def mark_of(it: Item) -> Path:
        return marks / (str(it.file.relative_to(archives)).replace(os.sep, "__") + ".ok")  # k600 parts share names

    stale = {p.name for p in marks.glob("*.ok")} - {mark_of(it).name for it in items if it.extract_to}
    if stale:  # an interrupted run extracted archives this one does not take (max_archives lowered): start afresh
        print(f"download {name}: {len(stale)} archives extracted by an interrupted run are not wanted now; "
              f"re-extracting into a fresh {staging}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(marks, ignore_errors=True)
    for it in items:
        mark = mark_of(it)
        if it.extract_to and mark.is_file() and staging.is_dir():
            continue  # extracted by an earlier (interrupted) run
        fetch(it.url, it.file, lock=lock)
        if it.extract_to:
            safe_extract(it.file, staging / it.extract_to)
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(sha256_file(it.file) if entry.keep_archives else "extracted\n")
            if not entry.keep_archives:
                it.file.unlink()
        elif it.place:
            (staging / it.place).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(it.file, staging / it.place)
    check_layout(entry.source, staging)
    write_json(staging / "source.json", {"source": entry.source, "entry": to_dict(entry), "files": [it.url for it in items],
                                         "archives_skipped": {split: n for split, (_, n) in skipped.items()}})
    _publish(staging, out)
    shutil.rmtree(marks, ignore_errors=True)
    print(f"download {name}: {out}")
    for line in _skip_lines(name, skipped):
        print(line)


def _run_embedded(name: str, entry, out: Path, dry_run: bool) -> None:
    spec = entry.embedded
    n = spec.classes * (spec.train_per_class + spec.test_per_class)
    if dry_run:
        print(f"download {name} (dry run): nothing is fetched; would generate {n} videos ({spec.classes} classes x "
              f"({spec.train_per_class} train + {spec.test_per_class} test), {spec.size}x{spec.size}, {spec.frames} frames "
              f"at {spec.fps} fps, seed {spec.seed}) into {out}/UCF-101/ and split files into {out}/ucfTrainTestlist/")
        return
    with atomic_dir(out) as tmp:
        counts = embedded.generate(tmp, spec, progress=progress)
        write_json(tmp / "source.json", {"source": "embedded", "spec": to_dict(spec), **counts})
    print(f"download {name}: generated {counts['train']} train + {counts['test']} test videos in {out}")
