"""The LPIPS weights: fetch the VGG16 ImageNet trunk and the LPIPS v0.1 heads, verify, write them for the DAG.

Stage ``fetch_lpips`` writes ``{run.out}/fetch_lpips/`` (the folder is its one declared output, the same whether
anything is fetched or not):

- ``manifest.json``: whether LPIPS is needed and by which selected entries (:func:`needed_by`), the params it was
  made for, and the source and sha256 of each file;
- ``vgg16.pth`` and ``lpips_vgg.pth``, only when something selected needs LPIPS (a ``train_tokenizer`` entry with
  ``perceptual: lpips``; an ``eval_tokenizer`` entry, for Table 7's LPIPS, as ``fetch_lpips.for_eval`` says) and
  ``NBP_LPIPS_VGG`` / ``NBP_LPIPS_LIN`` (which override fetched files) do not already give both.

Where the files come from:

- VGG16: ``fetch_lpips.vgg_path`` (a local file), else ``fetch_lpips.vgg_url`` (torchvision's
  ``vgg16-397923af.pth``) through :func:`nbp.data.fetch.fetch`: resumable (the ``.part`` lives in
  ``{run.out}/checkpoints/fetch_lpips``), the sha256 prefix in the file's name checked, the full sha256 recorded in
  the committed lock file at the first download and checked on every later one (and against
  ``fetch_lpips.vgg_sha256`` when given);
- heads: ``fetch_lpips.lin_path``, else ``lpips/weights/v0.1/vgg.pth`` of the ``lpips`` wheel (``pip download
  --no-deps``; the wheel's and the member's sha256 are pinned in :mod:`nbp.metrics`).

A download that fails its checksum is refused and nothing is written to the output folder (it is written
atomically, after both files load as what they should be). Without network the stage ends in one line naming the
params key of the local file to give instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from nbp import dag
from nbp.checkpoint import read_torch_file
from nbp.config import Config, to_dict
from nbp.data.fetch import ChecksumError, LockFile, fetch, lock_for, pip_download, sha256_file
from nbp.errors import NbpError
from nbp.io import atomic_dir, atomic_path, write_json
from nbp.metrics import (
    LPIPS_HEAD_CHANNELS,
    LPIPS_LIN_FILENAME,
    LPIPS_LIN_MEMBER,
    LPIPS_VGG_FILENAME,
    VGG16_CONVS,
)

MANIFEST = "manifest.json"
MAX_MEMBER_BYTES = 64 << 20  # the heads are ~7 KB: anything near this is not them (and is never written whole)
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")  # torchvision: <name>-<sha256 prefix>.pth


# --------------------------------------------------------------------------------------
# what needs LPIPS


def needed_by(cfg: Config) -> list[str]:
    """The selected entries that need the LPIPS weights, one ``key: why`` each (``[]``: nothing to fetch)."""
    why = []
    for name in dag.selected(cfg, "train_tokenizer"):
        t = cfg.train_tokenizer[name]
        if t.source == "train" and t.perceptual == "lpips":
            why.append(f"train_tokenizer.{name}.perceptual: lpips")
    mode = cfg.fetch_lpips.for_eval
    for name in dag.selected(cfg, "eval_tokenizer"):
        dataset = cfg.train_tokenizer[cfg.eval_tokenizer[name].tokenizer].dataset
        source = cfg.download[cfg.prepare[dataset].dataset].source
        if mode == "always" or (mode == "auto" and source != "embedded"):
            why.append(f"eval_tokenizer.{name}: Table 7's LPIPS ({source} data; fetch_lpips.for_eval: {mode})")
    return why


def stage_params(cfg: Config) -> dict[str, Any]:
    """The values of the stage's params keys (what DVC and Snakemake compare to decide on a rerun)."""
    return {"fetch_lpips": to_dict(cfg.fetch_lpips), "run.tokenizers": list(cfg.run.tokenizers)}


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------
# structure checks (tensors only, weights_only=True)


def check_vgg_file(path: Path, key: str = "fetch_lpips.vgg_path") -> None:
    """A torchvision VGG16 state dict: ``features.N.weight/bias`` of the 13 convolutions with their shapes."""
    sd = read_torch_file(path, "VGG16 state dict")
    if not isinstance(sd, dict):
        raise NbpError(f"{key}: {path}: expected a state dict, got {type(sd).__name__}")
    for i, cin, cout in VGG16_CONVS:
        for kind, shape in (("weight", (cout, cin, 3, 3)), ("bias", (cout,))):
            k = f"features.{i}.{kind}"
            got = tuple(getattr(sd.get(k), "shape", ()))
            if got != shape:
                raise NbpError(f"{key}: {path}: {k} is {list(got) if k in sd else 'missing'}, a torchvision VGG16 state "
                               f"dict has {list(shape)}")


def check_lin_file(path: Path, key: str = "fetch_lpips.lin_path") -> None:
    """The LPIPS v0.1 heads: ``lin{k}.model.1.weight`` of shape [1, C, 1, 1] for the five VGG taps."""
    sd = read_torch_file(path, "LPIPS heads file")
    if not isinstance(sd, dict):
        raise NbpError(f"{key}: {path}: expected a state dict, got {type(sd).__name__}")
    for j, c in enumerate(LPIPS_HEAD_CHANNELS):
        k = f"lin{j}.model.1.weight"
        got = tuple(getattr(sd.get(k), "shape", ()))
        if got != (1, c, 1, 1):
            raise NbpError(f"{key}: {path}: {k} is {list(got) if k in sd else 'missing'}, the LPIPS v0.1 heads have "
                           f"{[1, c, 1, 1]}")


# --------------------------------------------------------------------------------------
# VGG16


def _copy_local(src: str, dest: Path, sha256: str | None, key: str) -> str:
    path = Path(src).expanduser()
    if not path.is_file():
        raise NbpError(f"{key}: {path}: no such file")
    got = sha256_file(path)
    if sha256 and got != sha256:
        raise NbpError(f"{key}: {path}: sha256 {got} does not match the expected {sha256}")
    with atomic_path(dest) as tmp:
        shutil.copyfile(path, tmp)
    return got


def hash_prefix(url: str) -> str | None:
    """The sha256 prefix a torchvision file name carries (``vgg16-397923af.pth`` -> ``397923af``), or None."""
    m = _HASH_IN_NAME.search(url.split("?")[0].rsplit("/", 1)[-1])
    return m.group(1) if m else None


def fetch_vgg16(dest: Path, url: str, state: Path, *, lock: LockFile | None, sha256: str | None = None,
                retries: int = 5) -> str:
    """Download torchvision's VGG16 file to ``dest`` via ``state`` (resumable); -> its sha256.

    Checked against ``sha256`` or the lock's entry when there is one, and always against the prefix in the file's
    name; the lock records the full sha256 at the first download. A file that fails is moved aside (``.corrupt``
    in ``state``) and never reaches ``dest``.
    """
    name = url.split("?")[0].rsplit("/", 1)[-1] or LPIPS_VGG_FILENAME
    staged = state / name
    entry = lock.get(url) if lock is not None else None
    want = sha256 or (entry or {}).get("sha256")
    hint = f"set fetch_lpips.vgg_path to a local copy of torchvision's VGG16 ImageNet weights ({name})"
    try:
        # checked against fetch_lpips.vgg_sha256, else the lock's entry; a first download is recorded below, once its
        # name's prefix matched
        fetch(url, staged, lock=lock if entry else None, sha256=sha256, retries=retries)
    except ChecksumError as e:
        raise NbpError(f"fetch_lpips.vgg_url: {e}") from None
    except NbpError as e:  # network, HTTP errors: one line, and what to supply instead
        raise NbpError(f"fetch_lpips.vgg_url: could not download {str(e).split('; ')[0]}; {hint}") from None
    got = sha256_file(staged)
    prefix = hash_prefix(url)
    if prefix and not got.startswith(prefix):
        bad = staged.with_name(staged.name + ".corrupt")
        os.replace(staged, bad)
        raise NbpError(f"fetch_lpips.vgg_url: {url}: sha256 {got[:16]}... does not start with the {prefix} its name "
                       f"carries; moved to {bad} (delete it and rerun to fetch again)")
    if want is None and lock is not None:
        lock.record(url, got, staged.stat().st_size)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(staged, dest)
    return got


# --------------------------------------------------------------------------------------
# the LPIPS heads, from the lpips wheel


def pip_download_wheel(package: str, into: Path, wheel_sha256: str | None) -> Path:
    """``pip download`` the wheel of ``package`` (it ships the LPIPS v0.1 heads) into ``into``; -> the checked wheel."""
    return pip_download(package, into, binary=True, sha256=wheel_sha256, key="fetch_lpips.package",
                        sha256_key="fetch_lpips.wheel_sha256",
                        hint="set fetch_lpips.lin_path to a local copy of the LPIPS v0.1 heads "
                             "(lpips/weights/v0.1/vgg.pth inside the lpips wheel)")


def extract_member(wheel: Path, member: str, dest: Path, sha256: str | None) -> str:
    """Write one regular-file member of a wheel (a zip) to ``dest``, atomically, after its sha256 matched.

    The member's name is never used as a path; links, folders and members larger than ``MAX_MEMBER_BYTES`` are
    refused; the bytes are streamed and counted (a zip's sizes are not trusted).
    """
    try:
        with zipfile.ZipFile(wheel) as z:
            info = next((i for i in z.infolist() if i.filename == member), None)
            if info is None:
                raise NbpError(f"{wheel.name}: no {member} inside the wheel")
            if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
                raise NbpError(f"{wheel.name}: {member} is not a regular file")
            if info.file_size > MAX_MEMBER_BYTES:
                raise NbpError(f"{wheel.name}: {member} says {info.file_size} bytes, more than the heads can be")
            h, n = hashlib.sha256(), 0
            with atomic_path(dest) as tmp, z.open(info) as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 16):
                    n += len(chunk)
                    if n > MAX_MEMBER_BYTES:
                        raise NbpError(f"{wheel.name}: {member} is larger than {MAX_MEMBER_BYTES} bytes")
                    h.update(chunk)
                    out.write(chunk)
                if sha256 and h.hexdigest() != sha256:
                    raise NbpError(f"fetch_lpips.lin_sha256: {wheel.name}:{member}: sha256 {h.hexdigest()} does not "
                                   f"match the expected {sha256}")
            return h.hexdigest()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise NbpError(f"{wheel.name}: not a readable wheel ({e})") from None


def fetch_lin_heads(dest: Path, *, path: str | None, package: str, wheel_sha256: str | None, sha256: str | None) -> str:
    """Put the LPIPS v0.1 heads at ``dest`` (a local file, else the wheel's member); -> their sha256."""
    if path:
        return _copy_local(path, dest, sha256, "fetch_lpips.lin_path")
    with tempfile.TemporaryDirectory(prefix="nbp-lpips-") as tmp:
        wheel = pip_download_wheel(package, Path(tmp), wheel_sha256)
        return extract_member(wheel, LPIPS_LIN_MEMBER, dest, sha256)


# --------------------------------------------------------------------------------------
# the stage


def _reuse(old: dict | None, folder: Path, role: str, source: str, dest: Path) -> str | None:
    """Link (or copy) the previous output's file into ``dest`` when it came from the same source and still
    matches its recorded sha256; -> its sha256, or None."""
    rec = ((old or {}).get("files") or {}).get(role) or {}
    src = folder / str(rec.get("file", ""))
    if rec.get("source") != source or not rec.get("sha256") or not src.is_file() or sha256_file(src) != rec["sha256"]:
        return None
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
    return rec["sha256"]


def _keep_download(old: dict | None, folder: Path, url: str, state: Path) -> None:
    """Before the weights leave the output (nothing needs them now), move a downloaded VGG16 back to where
    :func:`fetch_vgg16` stages it: needed again, it is verified there (against the lock) instead of downloaded."""
    rec = ((old or {}).get("files") or {}).get("vgg") or {}
    src = folder / LPIPS_VGG_FILENAME
    if rec.get("source") == url and src.is_file():
        state.mkdir(parents=True, exist_ok=True)
        os.replace(src, state / (url.split("?")[0].rsplit("/", 1)[-1] or LPIPS_VGG_FILENAME))


def run_fetch_lpips(cfg: Config, name: str | None = None, paths=None) -> Path:
    """Stage ``fetch_lpips``: write ``{run.out}/fetch_lpips/`` (see the module docstring)."""
    paths = paths or dag.resolve(cfg, "fetch_lpips", None)
    fl, folder = cfg.fetch_lpips, paths.folder
    why = needed_by(cfg)
    manifest: dict[str, Any] = {"needed": bool(why), "needed_by": why, "params": stage_params(cfg), "files": {}}
    if not why:
        _keep_download(read_manifest(folder), folder, fl.vgg_url, paths.state)
        manifest["why_not"] = ("no selected train_tokenizer entry has perceptual: lpips and no selected eval_tokenizer "
                               f"entry wants Table 7's LPIPS (fetch_lpips.for_eval: {fl.for_eval})")
        with atomic_dir(folder) as tmp:
            write_json(tmp / MANIFEST, manifest)
        print(f"fetch_lpips: nothing selected needs LPIPS; wrote {folder / MANIFEST} only")
        return folder
    env = [os.environ.get(v) for v in ("NBP_LPIPS_VGG", "NBP_LPIPS_LIN")]
    if all(env) and all(Path(e).expanduser().is_file() for e in env):  # they override fetched files: fetch none
        _keep_download(read_manifest(folder), folder, fl.vgg_url, paths.state)
        manifest["supplied_by"] = "the environment (NBP_LPIPS_VGG, NBP_LPIPS_LIN)"
        with atomic_dir(folder) as tmp:
            write_json(tmp / MANIFEST, manifest)
        print(f"fetch_lpips: NBP_LPIPS_VGG and NBP_LPIPS_LIN give the weights; wrote {folder / MANIFEST} only")
        return folder
    old = read_manifest(folder)
    paths.state.mkdir(parents=True, exist_ok=True)
    vgg_source = str(Path(fl.vgg_path).expanduser()) if fl.vgg_path else fl.vgg_url
    lin_source = str(Path(fl.lin_path).expanduser()) if fl.lin_path else f"{fl.package}:{LPIPS_LIN_MEMBER}"
    with atomic_dir(folder) as tmp:
        vgg, lin = tmp / LPIPS_VGG_FILENAME, tmp / LPIPS_LIN_FILENAME
        vgg_sha = _reuse(old, folder, "vgg", vgg_source, vgg)
        if vgg_sha is None and fl.vgg_path:
            vgg_sha = _copy_local(fl.vgg_path, vgg, fl.vgg_sha256, "fetch_lpips.vgg_path")
        elif vgg_sha is None:
            vgg_sha = fetch_vgg16(vgg, fl.vgg_url, paths.state, lock=lock_for(cfg), sha256=fl.vgg_sha256)
        lin_sha = _reuse(old, folder, "lin", lin_source, lin) or fetch_lin_heads(
            lin, path=fl.lin_path, package=fl.package, wheel_sha256=fl.wheel_sha256, sha256=fl.lin_sha256)
        check_vgg_file(vgg, "fetch_lpips.vgg_path" if fl.vgg_path else "fetch_lpips.vgg_url")
        check_lin_file(lin, "fetch_lpips.lin_path" if fl.lin_path else "fetch_lpips.package")
        manifest["files"] = {"vgg": {"file": LPIPS_VGG_FILENAME, "source": vgg_source, "sha256": vgg_sha},
                             "lin": {"file": LPIPS_LIN_FILENAME, "source": lin_source, "sha256": lin_sha}}
        write_json(tmp / MANIFEST, manifest)
    print(f"fetch_lpips: wrote {folder} (VGG16 sha256 {vgg_sha[:12]}..., heads sha256 {lin_sha[:12]}...) for "
          f"{'; '.join(why)}")
    return folder
