"""Dataset readers over the source layouts that `download` produces.

- UCF-101 (and the embedded set, which uses its layout): ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi`` and
  ``ucfTrainTestlist/{classInd.txt, trainlist0N.txt, testlist0N.txt}``. Labels are 1-based in the files,
  0-based here; the test lists carry no label (it comes from the folder); ``val`` is the test list.
- Kinetics-600 (CVDF): ``k600/{train,val,test}/<youtube_id>_<start:06d>_<end:06d>.mp4`` and
  ``k600/annotations/{split}.csv`` (``label,youtube_id,time_start,time_end,split``).

A class's text is its name as lower-case words ("ApplyEyeMakeup" -> "apply eye makeup").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nbp.errors import NbpError

SUBSETS = ("train", "val")


@dataclass(frozen=True)
class ClassInfo:
    label: int  # 0-based
    name: str
    text: str

    def as_dict(self) -> dict:
        return {"label": self.label, "name": self.name, "text": self.text}


@dataclass(frozen=True)
class VideoRecord:
    path: Path  # the file
    video: str  # its id: the path relative to the videos folder
    label: int
    class_name: str
    class_text: str


def camel_to_text(name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup', 'YoYo' -> 'yo yo'."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name))


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise NbpError(f"{path}: not found (run `nbp download` for this dataset)")
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    return [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if ln.strip()]


class UCF101:
    """UCF-101 (or the embedded set) with the official split files; ``split`` is 1, 2 or 3."""

    def __init__(self, root: str | Path, split: int = 1):
        self.root = Path(root)
        self.split = split
        self.video_dir = self.root / "UCF-101"
        self.list_dir = self.root / "ucfTrainTestlist"
        if not self.video_dir.is_dir():
            raise NbpError(f"{self.video_dir}: not found (run `nbp download` for this dataset)")
        self.classes: list[ClassInfo] = []
        for n, line in _lines(self.list_dir / "classInd.txt"):
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise NbpError(f"{self.list_dir / 'classInd.txt'}:{n}: expected '<label> <ClassName>', got {line!r}")
            label = int(parts[0]) - 1
            if label != len(self.classes):
                raise NbpError(f"{self.list_dir / 'classInd.txt'}:{n}: labels must run 1, 2, 3, ... (got {label + 1})")
            self.classes.append(ClassInfo(label, parts[1], camel_to_text(parts[1])))
        self._by_folder = {c.name.lower(): c for c in self.classes}

    def list_file(self, subset: str) -> Path:
        kind = {"train": "trainlist", "val": "testlist", "test": "testlist"}.get(subset)
        if kind is None:
            raise ValueError(f"subset must be train or val, got {subset!r}")
        return self.list_dir / f"{kind}{self.split:02d}.txt"

    def videos(self, subset: str) -> list[VideoRecord]:
        """The videos of a subset, in list order (label from the file, checked against the folder)."""
        path = self.list_file(subset)
        out = []
        for n, line in _lines(path):
            parts = line.split()
            rel = parts[0].replace("\\", "/")
            folder = rel.split("/")[0]
            cls = self._by_folder.get(folder.lower())
            if cls is None or "/" not in rel:
                raise NbpError(f"{path}:{n}: {rel!r} is not in a class folder named in classInd.txt")
            if len(parts) > 1 and int(parts[1]) - 1 != cls.label:
                raise NbpError(f"{path}:{n}: label {parts[1]} does not match class folder {folder!r} ({cls.label + 1})")
            out.append(VideoRecord(self.video_dir / rel, rel, cls.label, cls.name, cls.text))
        return out


_K600_NAME = re.compile(r"^(?P<yid>.+)_(?P<start>\d{6})_(?P<end>\d{6})$")


class Kinetics600:
    """Kinetics-600 in the CVDF layout. Rows whose video was not downloaded are counted in ``missing``."""

    def __init__(self, root: str | Path):
        self.root = Path(root) / "k600"
        ann = self.root / "annotations"
        source = next((ann / f"{s}.csv" for s in ("train", "val") if (ann / f"{s}.csv").is_file()), None)
        if source is None:
            raise NbpError(f"{ann}: no train.csv or val.csv (run `nbp download` for this dataset)")
        names = sorted(set(self._table(source)["label"].astype(str)))
        self.classes = [ClassInfo(i, n, n) for i, n in enumerate(names)]
        self._by_name = {c.name: c for c in self.classes}
        self.missing: dict[str, int] = {}

    @staticmethod
    def _table(path: Path):
        import pandas as pd

        try:
            df = pd.read_csv(path)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise NbpError(f"{path}: not a readable CSV ({e})") from None
        need = {"label", "youtube_id", "time_start", "time_end"}
        if not need <= set(df.columns):
            raise NbpError(f"{path}: missing columns {sorted(need - set(df.columns))} (expected {sorted(need)})")
        return df

    def videos(self, subset: str) -> list[VideoRecord]:
        if subset not in ("train", "val", "test"):
            raise ValueError(f"subset must be train or val, got {subset!r}")
        folder = self.root / subset
        if not folder.is_dir():
            raise NbpError(f"{folder}: not found (run `nbp download` for this dataset)")
        on_disk = {}
        for p in sorted(folder.rglob("*")):
            m = _K600_NAME.match(p.stem)
            if m and p.is_file() and p.suffix.lower() in (".mp4", ".webm", ".mkv", ".avi"):
                on_disk[(m["yid"], int(m["start"]), int(m["end"]))] = p
        df = self._table(self.root / "annotations" / f"{subset}.csv")
        out, missing = [], 0
        for label, yid, t0, t1 in zip(df["label"].astype(str), df["youtube_id"].astype(str), df["time_start"], df["time_end"]):
            p = on_disk.get((yid, int(t0), int(t1)))
            cls = self._by_name.get(label)
            if p is None or cls is None:
                missing += 1
                continue
            out.append(VideoRecord(p, str(p.relative_to(folder)), cls.label, cls.name, cls.text))
        self.missing[subset] = missing
        return out


def open_dataset(source: str, root: str | Path, split: int = 1):
    """The reader for a download entry's ``source`` (embedded and ucf101 share the UCF-101 reader)."""
    if source in ("ucf101", "embedded"):
        return UCF101(root, split)
    if source == "k600":
        return Kinetics600(root)
    raise ValueError(f"unknown dataset source {source!r}")
