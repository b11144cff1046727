"""Safe extraction of tar, zip and RAR archives.

Members with absolute paths or ``..``, links that point outside the target or are written through, and
device files are refused before anything is written outside a scratch folder inside the target. RAR goes
through ``unar`` (``lsar`` lists it first) or ``bsdtar``.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from nbp.errors import NbpError
from nbp.tracking import progress


class UnsafeArchiveError(NbpError):
    """An archive member that would write outside the target or create a link/device."""

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
                    shutil.copyfileobj(src, out, 1 << 20)


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
