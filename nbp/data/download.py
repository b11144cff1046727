"""The `download` stage: fetch a dataset into ``{run.out}/download/{name}/`` in its source layout.

- ``embedded``: generates the synthetic moving-shapes videos (nbp.data.embedded).
- ``ucf101``: ``UCF101.rar`` (videos) + the train/test split zip.
- ``k600``: per split, the CVDF list ``{lists}/{split}/k600_{split}_path.txt`` of tar.gz archives, and the
  annotation CSVs ``{annotations}/{split}.csv``.
- ``root`` set: an existing local copy in the source's layout is linked, nothing is fetched.

Transfers resume with HTTP range requests (a ``.part`` file beside the target, kept across runs and
retries). No checksums are published for these files, so the sha256 of each file is recorded in the
committed lock file ``workflow/checksums.lock.json`` at its first download and checked on every later
one. Archives are extracted safely: members with absolute paths or ``..``, links that point outside
the target or are written through, and device files are refused before anything is written outside
a scratch folder inside the target. RAR goes through ``unar`` (``lsar`` lists it first) or ``bsdtar``.

Archives are kept under ``{run.out}/archives/{name}/`` (outside the stage's output, so reruns resume);
extraction goes to ``{run.out}/archives/{name}/staging/`` with a marker per extracted archive, and the
finished tree is renamed into place at the end.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nbp.errors import NbpError
from nbp.io import atomic_dir, write_json
from nbp.tracking import progress

LOCK_ENV = "NBP_CHECKSUMS_LOCK"
LOCK_RELPATH = Path("workflow") / "checksums.lock.json"
CHUNK = 1 << 20
USER_AGENT = "nbp-download/0.1"


class ChecksumError(NbpError):
    """A downloaded file whose sha256 differs from the published or recorded one."""


class UnsafeArchiveError(NbpError):
    """An archive member that would write outside the target or create a link/device."""


class NetworkError(NbpError):
    """The server cannot be reached."""


# --------------------------------------------------------------------------------------
# checksums


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class LockFile:
    """``{url: {"sha256": ..., "size": ...}}`` in a committed JSON file; entries are only ever added."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise NbpError(f"{self.path}: not valid JSON ({e})") from None
        return data.get("files", {})

    def get(self, url: str) -> dict | None:
        return self._read().get(url)

    def record(self, url: str, sha256: str, size: int) -> None:
        files = self._read()
        files[url] = {"sha256": sha256, "size": size}
        write_json(self.path, {
            "about": "sha256 of downloaded dataset files, recorded at first download (none are published) "
                     "and checked on every later download. Commit changes to this file.",
            "files": dict(sorted(files.items())),
        })


def lock_for(cfg) -> LockFile:
    """The lock file beside the params file (``workflow/checksums.lock.json``), or $NBP_CHECKSUMS_LOCK."""
    env = os.environ.get(LOCK_ENV)
    return LockFile(env if env else Path(cfg.params_file).resolve().parent / LOCK_RELPATH)


# --------------------------------------------------------------------------------------
# HTTP with range resume


def _no_route(err: BaseException) -> bool:
    """No name resolution or no route: retrying will not help."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)


def _is_unreachable(err: BaseException) -> bool:
    reason = getattr(err, "reason", err)
    return _no_route(err) or isinstance(reason, (ConnectionRefusedError, socket.timeout, TimeoutError))


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url: str, part: Path, timeout: float) -> None:
    """One attempt: continue ``part`` from its current size (or restart when the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: complete when the sizes agree
            total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return
            part.unlink()
        raise
    with resp:
        mode = "ab"
        if offset and resp.status == 206:
            first = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if first != str(offset):
                raise http.client.HTTPException(f"server answered range {resp.headers.get('Content-Range')!r} to bytes={offset}-")
        elif offset:  # 200: the server ignored the range, start over
            mode, offset = "wb", 0
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        with open(part, mode) as f, progress(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                             desc=part.name.removesuffix(".part")) as bar:
            while chunk := resp.read1(CHUNK):  # what has arrived: kept even if the connection then breaks
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def fetch(url: str, dest: str | Path, *, lock: LockFile | None = None, sha256: str | None = None, retries: int = 5,
          backoff: float = 2.0, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (resuming a ``.part``), check its sha256 (given, or from / into the lock file).

    A file that fails its checksum is moved aside to ``<dest>.corrupt`` and ChecksumError is raised.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if not dest.exists():
        for attempt in range(retries + 1):
            try:
                _transfer(url, part, timeout)
                break
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in (408, 429):
                    raise NbpError(f"{url}: HTTP {e.code} {e.reason}") from None
                err: BaseException = e
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
                err = e
            if attempt == retries or _no_route(err):
                what = getattr(err, "reason", err)
                if _is_unreachable(err):
                    raise NetworkError(f"{url}: network unreachable ({what}) after {attempt + 1} tries; check the "
                                       "connection, or set download.<entry>.root to a local copy of the dataset") from None
                raise NetworkError(f"{url}: transfer failed ({type(what).__name__}: {what}) after {attempt + 1} tries; "
                                   f"rerun to resume from {part}") from None
            time.sleep(backoff * 2**attempt)
        os.replace(part, dest)
    verify(url, dest, lock=lock, sha256=sha256)
    return dest


def verify(url: str, path: Path, *, lock: LockFile | None = None, sha256: str | None = None) -> str:
    """Check a file against a given sha256 or its lock entry; record it when neither exists."""
    got = sha256_file(path)
    entry = lock.get(url) if lock else None
    want, source = (sha256, "the published checksum") if sha256 else ((entry or {}).get("sha256"), f"{lock.path if lock else ''}")
    if want is None:
        if lock is not None:
            lock.record(url, got, path.stat().st_size)
        return got
    if got != want:
        bad = path.with_name(path.name + ".corrupt")
        os.replace(path, bad)
        raise ChecksumError(f"{url}: sha256 {got[:16]}... does not match {want[:16]}... in {source}; moved to {bad} "
                            "(delete it and rerun to fetch again)")
    return got


# --------------------------------------------------------------------------------------
# safe extraction


def _member_path(archive: Path, name: str) -> PurePosixPath | None:
    """A member name as a safe relative path (None for the archive root); refuses absolute paths and ``..``."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..'; refusing to extract")
    return PurePosixPath(*parts) if parts else None


def _inside(root: Path, path: Path) -> bool:
    root_r, path_r = os.path.realpath(root), os.path.realpath(path)
    return path_r == root_r or path_r.startswith(root_r + os.sep)


def _check_link(archive: Path, member: PurePosixPath, target: str, root: Path) -> None:
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: link {str(member)!r} -> {target!r} points to an absolute path; refusing to extract")
    resolved = os.path.normpath(os.path.join(str(member.parent), target))
    if resolved == ".." or resolved.startswith("../") or not _inside(root, root / resolved):
        raise UnsafeArchiveError(f"{archive}: link {str(member)!r} -> {target!r} points outside the target; refusing to extract")


def _dest(archive: Path, root: Path, member: PurePosixPath) -> Path:
    dest = root / member
    if not _inside(root, dest.parent):
        raise UnsafeArchiveError(f"{archive}: member {str(member)!r} would be written through a link; refusing to extract")
    return dest


def verify_tree(root: Path, archive: Path | None = None) -> None:
    """After extraction: every link resolves inside ``root`` and there are no device files, fifos or sockets."""
    label = archive or root
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            mode = p.lstat().st_mode
            if stat.S_ISLNK(mode):
                if not _inside(root, p):
                    raise UnsafeArchiveError(f"{label}: link {str(p.relative_to(root))!r} -> {os.readlink(p)!r} "
                                             "points outside the target; refusing to extract")
            elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafeArchiveError(f"{label}: {str(p.relative_to(root))!r} is a device, fifo or socket; "
                                         "refusing to extract")


def _extract_tar(archive: Path, root: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        for m in progress(tf, desc=f"extract {archive.name}", unit="file"):
            rel = _member_path(archive, m.name)
            if rel is None:
                continue
            if m.isdev() or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or fifo; refusing to extract")
            dest = _dest(archive, root, rel)
            if m.issym():
                _check_link(archive, rel, m.linkname, root)
            elif m.islnk():
                try:
                    target = _member_path(archive, m.linkname)
                except UnsafeArchiveError:
                    target = None
                if target is None or not _inside(root, root / target):
                    raise UnsafeArchiveError(f"{archive}: hard link {m.name!r} -> {m.linkname!r} points outside the target; "
                                             "refusing to extract")
                m.linkname = str(target)
            m.name = str(rel)
            if hasattr(tarfile, "data_filter"):  # Python's own checks too (3.10.12+, 3.11.4+)
                tf.extract(m, root, set_attrs=False, filter="data")
            else:
                tf.extract(m, root, set_attrs=False)
            if m.isfile() and not dest.is_file():
                raise UnsafeArchiveError(f"{archive}: member {m.name!r} was not written where expected")


def _extract_zip(archive: Path, root: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in progress(zf.infolist(), desc=f"extract {archive.name}", unit="file"):
            rel = _member_path(archive, info.filename)
            if rel is None:
                continue
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            dest = _dest(archive, root, rel)
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device or fifo; refusing to extract")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            elif kind == stat.S_IFLNK:
                target = zf.read(info).decode("utf-8", errors="replace")
                _check_link(archive, rel, target, root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, dest)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)


def _extract_rar(archive: Path, root: Path) -> None:
    unar, lsar, bsdtar = shutil.which("unar"), shutil.which("lsar"), shutil.which("bsdtar")
    if unar and lsar:
        listing = subprocess.run([lsar, "-j", str(archive)], capture_output=True, text=True)
        if listing.returncode != 0:
            raise NbpError(f"{archive}: not a readable RAR archive ({listing.stderr.strip()[:200] or 'lsar failed'})")
        entries = json.loads(listing.stdout).get("lsarContents", [])
        names, links = [], set()
        for e in entries:
            rel = _member_path(archive, e.get("XADFileName", ""))
            kind = stat.S_IFMT(int(e.get("XADPosixPermissions", 0)))
            if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK) or e.get("XADIsCharacterDevice") \
                    or e.get("XADIsBlockDevice") or e.get("XADIsFIFO"):
                raise UnsafeArchiveError(f"{archive}: member {e.get('XADFileName')!r} is a device or fifo; refusing to extract")
            if rel is not None:
                names.append(rel)
                if e.get("XADIsLink") or kind == stat.S_IFLNK:
                    links.add(rel)
        for rel in names:  # nothing may be written through a link of the same archive
            if any(parent in links for parent in rel.parents):
                raise UnsafeArchiveError(f"{archive}: member {str(rel)!r} would be written through a link; refusing to extract")
        cmd = [unar, "-f", "-D", "-no-recursion", "-forks", "skip", "-o", str(root), str(archive)]  # one line per file
        total = len(entries)
    elif bsdtar:  # libarchive's defaults refuse '..', absolute paths and writing through links
        listing = subprocess.run([bsdtar, "-tf", str(archive)], capture_output=True, text=True)
        if listing.returncode != 0:
            raise NbpError(f"{archive}: bsdtar cannot read it ({listing.stderr.strip()[:200]})")
        for name in listing.stdout.splitlines():
            _member_path(archive, name)
        cmd = [bsdtar, "-xvf", str(archive), "-C", str(root), "--no-same-owner"]  # -v: one line per file
        total = len(listing.stdout.splitlines())
    else:
        raise NbpError(f"{archive}: extracting RAR needs `unar` or `bsdtar` (Debian: apt-get install unar)")
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc, \
            progress(total=total, desc=f"extract {archive.name}", unit="file") as bar:
        for line in proc.stdout:
            tail = (tail + [line.strip()])[-5:]
            if line.startswith(("  ", "x ")) or cmd[0] == bsdtar:
                bar.update()
    if proc.returncode != 0:
        raise NbpError(f"{archive}: extraction failed ({' | '.join(tail)[:300]})")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Extract a .zip, .tar(.gz/.bz2/.xz) or .rar into ``dest`` after checking every member.

    Members go to a scratch folder inside ``dest`` first and are moved into place only when the whole
    archive passed; on any refusal the scratch folder is removed and UnsafeArchiveError is raised.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    scratch = Path(tempfile.mkdtemp(prefix=".extract.", dir=dest))
    try:
        if name.endswith(".zip"):
            _extract_zip(archive, scratch)
        elif name.endswith(".rar"):
            _extract_rar(archive, scratch)
        elif any(name.endswith(s) for s in (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            try:
                _extract_tar(archive, scratch)
            except (tarfile.TarError, EOFError, OSError) as e:
                if isinstance(e, NbpError):
                    raise
                raise NbpError(f"{archive}: corrupt archive ({e})") from None
        else:
            raise NbpError(f"{archive}: unknown archive type")
        verify_tree(scratch, archive)
        merge_into(scratch, dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def merge_into(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into ``dst``, merging folders; files in ``dst`` are replaced."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        target = dst / p.name
        if p.is_dir() and not p.is_symlink() and target.is_dir() and not target.is_symlink():
            merge_into(p, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(p, target)


# --------------------------------------------------------------------------------------
# the stage


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


def _k600_items(entry, archives: Path, lock: LockFile, fetch_lists: bool, dry_run: bool) -> list[Item]:
    for k in ("lists", "annotations"):
        if k not in entry.urls:
            raise NbpError(f"download: urls.{k} is missing for the k600 source")
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
                with _open(list_url, 0, 30) as r:
                    text = r.read().decode()
            except (urllib.error.URLError, OSError) as e:
                print(f"  (cannot read {list_url} now: {getattr(e, 'reason', e)}; its archives are listed after it is fetched)")
        elif fetch_lists:
            text = fetch(list_url, list_file, lock=lock).read_text()
        for line in (text or "").splitlines():
            url = line.strip()
            if url:
                items.append(Item(url, archives / split / _name_of(url), f"k600/{split}"))
    return items


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


def _check_layout(source: str, root: Path) -> list[str]:
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


def run_download(cfg, name: str, dry_run: bool = False) -> None:
    """Stage `download`: the entry's dataset in its source layout at ``{run.out}/download/{name}/``."""
    from nbp.config import to_dict

    entry = cfg.entry("download", name)
    out = cfg.out_dir("download", name)
    if entry.root:
        root = Path(entry.root).expanduser().resolve()
        if dry_run:
            print(f"download {name} (dry run): would link the local copy {root} into {out}/")
            return
        tops = _check_layout(entry.source, root)
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
    archives = Path(cfg.run.out) / "archives" / name
    if dry_run:
        print(f"download {name} (dry run): nothing is fetched or written")
    if entry.source == "ucf101":
        items = _ucf_items(entry, archives)
    else:
        items = _k600_items(entry, archives, lock, fetch_lists=True, dry_run=dry_run)
    if dry_run:
        _dry_run(entry, out, items, lock)
        return
    staging = archives / "staging"
    marks = archives / "extracted"
    for it in items:
        mark = marks / (str(it.file.relative_to(archives)).replace(os.sep, "__") + ".ok")  # k600 parts share names
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
    _check_layout(entry.source, staging)
    write_json(staging / "source.json", {"source": entry.source, "entry": to_dict(entry), "files": [it.url for it in items]})
    _publish(staging, out)
    shutil.rmtree(marks, ignore_errors=True)
    print(f"download {name}: {out}")


def _run_embedded(name: str, entry, out: Path, dry_run: bool) -> None:
    from nbp.config import to_dict
    from nbp.data import embedded

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
