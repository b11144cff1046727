"""Atomic outputs: write to a temporary name beside the target, then rename.

A killed stage leaves either no output or the previous one, never a half-written file that
DVC or Snakemake would take as done. A write that fails (full disk, read-only or forbidden folder) ends in one
:class:`NbpError` line naming the target and saying that its previous version is untouched; the temporary is removed.

Test hook (does nothing unless the environment variable is set): ``NBP_FAULT=<point>:<name>[@<n>]`` SIGKILLs the
process the n-th time (default: first) ``point`` is reached for a target of that name or path ending (``last.pt``,
``prepare/embedded``; see :func:`fault`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nbp.errors import NbpError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FAULTS_SEEN: dict[str, int] = {}


def fault(point: str, path: str | Path, tmp: Path | None = None) -> None:
    """The kill-injection hook of the tests; a no-op unless ``NBP_FAULT`` names this point and file.

    Points: ``write`` (atomic_path: the temporary is written, the target not yet replaced), ``write-half`` (the same,
    with the temporary cut to half its bytes first: what a kill inside the write leaves), ``swap`` (atomic_dir: the
    new folder is complete, the old one still in place), ``swapped-out`` (atomic_dir: the old folder moved aside,
    the new one not yet in place), ``step`` (nbp.training: after optimizer step n, before its bookkeeping)."""
    spec = os.environ.get("NBP_FAULT")
    if not spec:
        return
    want, _, nth = spec.partition("@")
    kind, _, name = want.partition(":")
    if kind != point or not (name == Path(path).name or str(path).endswith(f"/{name}")):
        return
    _FAULTS_SEEN[want] = _FAULTS_SEEN.get(want, 0) + 1
    if _FAULTS_SEEN[want] != int(nth or 1):
        return
    if point == "write-half" and tmp is not None and tmp.is_file():
        os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


# errors of the machine while writing (not of the data): reported as one line naming the target
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def _write_failed(e: OSError, path: Path, tmp: Path | None) -> bool:
    """Whether ``e`` is a failed write of ``path`` (its temporary or the folder holding it), not a failed read."""
    if e.errno is None:  # numpy's short write ("N requested and M written"): a full disk without an errno
        return "written" in str(e)
    if e.errno not in WRITE_ERRNOS:
        return False
    where = Path(e.filename) if e.filename else None
    return (where is None or where in (path, path.parent) or where.name.startswith(f".{path.name}.")
            or (tmp is not None and where.is_relative_to(tmp)))


class WriteError(NbpError):
    """A write that the machine refused (full disk, read-only or forbidden folder); ``path``: the target."""

    def __init__(self, path: Path, why: str, previous: bool):
        kept = f"the previous {path.name} is intact" if previous else f"no {path.name} was written"
        super().__init__(f"{path}: cannot write ({why}); {kept}")
        self.path, self.why = path, why


def _raise_if_write_failed(e: OSError, path: Path, tmp: Path | None, previous: bool) -> None:
    """Raise ``e`` as one :class:`WriteError` line when it is a failed write of ``path``; else return (the caller
    re-raises ``e`` as it is)."""
    if _write_failed(e, path, tmp):
        why = os.strerror(e.errno) if e.errno else f"short write, {e}: is the disk full?"
        raise WriteError(path, why, previous) from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it replaces ``path`` atomically."""
    path, tmp = Path(path), None
    previous = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        fault("write", path)
        fault("write-half", path, tmp)
        os.replace(tmp, path)
    except OSError as e:
        _raise_if_write_failed(e, path, tmp, previous)
        raise
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces the folder ``path`` (old one removed)."""
    path, tmp = Path(path), None
    previous = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        fault("swap", path)
        _swap(tmp, path)
    except WriteError as e:  # a file of the new folder: the folder is what the user knows
        if tmp is not None and e.path.is_relative_to(tmp):
            raise WriteError(path, f"{e.path.name}: {e.why}", previous) from None
        raise
    except OSError as e:
        _raise_if_write_failed(e, path, tmp, previous)
        raise
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(path: Path) -> None:
    """Remove what a SIGKILLed earlier write of ``path`` left beside it (a kill skips the cleanup of the atomic
    writers): its temporaries ``.<name>.*.tmp``, files or folders as large as the output (a clip cache). One writer
    per output is the DAG's rule (DVC and Snakemake lock outputs; under torchrun only rank 0 writes)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _swap(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``; a kill in between leaves no folder there (never a mix of old and new)."""
    old = path.with_name(f".{path.name}.old")
    if old.exists():  # what a kill between the two renames below left
        shutil.rmtree(old)
    if not path.exists():
        os.replace(new, path)
        return
    os.replace(path, old)
    fault("swapped-out", path)
    os.replace(new, path)
    shutil.rmtree(old)


def allocate(path: str | Path) -> None:
    """Reserve the disk blocks of a file that ``np.lib.format.open_memmap`` just made (sparse): a full disk then fails
    here with OSError (ENOSPC), reported by the enclosing atomic write, not later as a SIGBUS inside a memory-mapped
    write (a killed process with no message)."""
    if not hasattr(os, "posix_fallocate"):  # not on macOS
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_markdown_section(path: str | Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- key:start -->`` and ``<!-- key:end -->`` of a Markdown
    file (results/speed.md: each benchmark owns one section), atomically."""
    import re

    path = Path(path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n## {title}\n\n{body}{end}\n"
    text = path.read_text() if path.is_file() else "# Speed measurements\n\nWritten by the scripts in `benchmarks/`.\n\n"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end) + r"\n?", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    write_text(path, text)


def load_array(path: str | Path, what: str = "array", mmap: bool = True):
    """``np.load`` of a plain ``.npy`` (memory-mapped by default) that never unpickles: pickled data, object
    arrays and unreadable files end in one :class:`NbpError` line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise NbpError(f"{path}: {what} not found")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise NbpError(f"{path}: not a plain numeric {what} (.npy without pickled objects): {reason}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise NbpError(f"{path}: not a plain numeric {what} (.npy without pickled objects)")
    return arr
