"""Self-describing checkpoints, written atomically and loaded without executing pickles.

A checkpoint is a dict of tensors and plain Python data (no custom classes), so it loads with
``torch.load(..., weights_only=True)``. Conventional keys:

- ``format``: "nbp-tokenizer" | "nbp-generator" (what the weights are)
- ``version``: format version (int)
- ``config``: the model dataclass config as a plain dict
- ``model``: the model state dict
- ``step``, ``optimizer``, ``scheduler``, ``rng``, ``wandb_run_id``, ``code_version``, ``params``
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from nbp import __version__
from nbp.errors import NbpError
from nbp.io import atomic_path


def code_version() -> str:
    """The git commit of the code (with '+dirty' when the tree has changes), or the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=5
            )
            return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    ckpt = dict(ckpt)
    ckpt.setdefault("code_version", code_version())
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        _torch_save(ckpt, f)


def _torch_save(obj: Any, f) -> None:
    """torch.save through a Python file, so that a full disk is the OSError (ENOSPC) that atomic_path reports as one
    line. torch's zip writer hides it behind "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"
    (given a path, that is all there is; given a file, the OSError is the RuntimeError's context)."""
    try:
        torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def read_torch_file(path: str | Path, what: str = "checkpoint", map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(..., weights_only=True)`` with one-line user errors for a missing or unloadable file."""
    path = Path(path)
    if not path.is_file():
        raise NbpError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # a pickled object (code) where only tensors and plain data may be: never run
            raise NbpError(f"{path}: refused to unpickle {found.group(1)} (a {what} may hold only tensors and plain "
                           "data)") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise NbpError(f"{path}: not a loadable {what} ({type(e).__name__}: {first})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", expect: str | None = None) -> dict[str, Any]:
    """Load one of our checkpoints with ``weights_only=True``; ``expect`` checks its ``format``."""
    path = Path(path)
    ckpt = read_torch_file(path, "nbp checkpoint", map_location)
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise NbpError(f"{path}: not an nbp checkpoint (no 'format' key)")
    if expect is not None and ckpt["format"] != expect:
        raise NbpError(f"{path}: is a {ckpt['format']!r} checkpoint, expected {expect!r}")
    return ckpt


def inputs_fingerprint(*roots: str | Path) -> str:
    """A cheap, conservative identity of a stage's input folders, stored with rolling checkpoints.

    Small files (manifests, metadata; <= 16 MiB) are hashed whole; large arrays by path, size and
    modification time, so re-made inputs change the fingerprint without reading gigabytes.
    """
    import hashlib

    h = hashlib.sha256()
    for root in roots:
        root = Path(root)
        if not root.exists():
            h.update(f"{root.name}\0missing\0".encode())
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            st = p.stat()
            h.update(f"{p.relative_to(root) if root.is_dir() else p.name}\0{st.st_size}\0".encode())
            if st.st_size <= 16 << 20:
                h.update(hashlib.sha256(p.read_bytes()).digest())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()
