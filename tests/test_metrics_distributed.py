"""Distributed FVD feature extraction under torchrun (gloo, 2 CPU processes) equals the single-process result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from nbp.metrics.detector import cached_i3d_weights
from nbp.metrics.fvd import extract_features, frechet_distance
from nbp.metrics.i3d import load_i3d

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from nbp.distributed import cleanup_distributed, init_distributed
    from nbp.metrics.fvd import extract_features, frechet_distance
    from nbp.metrics.i3d import load_i3d

    a_path, b_path, weights, out = sys.argv[1:5]
    info = init_distributed(torch.device("cpu"))
    assert info.world_size == 2 and torch.distributed.get_backend() == "gloo"
    model = load_i3d(weights)
    fa = extract_features(np.load(a_path, mmap_mode="r"), model, batch_size=2, resolution=32)
    fb = extract_features(np.load(b_path, mmap_mode="r"), model, batch_size=2, resolution=32)
    if info.is_main:
        np.savez(out, fa=fa, fb=fb, fvd=frechet_distance(fa, fb), world=info.world_size)
    cleanup_distributed()
""")


def _clips(n: int, seed: int) -> np.ndarray:
    """uint8 [n, 16, 32, 32, 3]: smooth random colour fields drifting over time."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, 1, 8, 8, 3)).astype(np.float32)
    drift = rng.normal(size=(n, 1, 8, 8, 3)).astype(np.float32) * 8
    t = np.arange(16, dtype=np.float32)[None, :, None, None, None]
    small = np.clip(base + drift * t, 0, 255).astype(np.uint8)  # [n, 16, 8, 8, 3]
    return small.repeat(4, axis=2).repeat(4, axis=3)  # [n, 16, 32, 32, 3]


@pytest.mark.slow
def test_two_process_extraction_equals_single_process(tmp_path):
    weights = cached_i3d_weights()
    a, b = _clips(3, seed=0), _clips(2, seed=1)  # 2 batches and 1: uneven shards, and rank 1 gets none of b
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    (tmp_path / "run.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NBP_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "run.py"),
           str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), str(weights), str(tmp_path / "out.npz")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    assert int(got["world"]) == 2

    model = load_i3d(weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker: float32 sums then run in the same order
    try:
        fa = extract_features(a, model, batch_size=2, resolution=32)
        fb = extract_features(b, model, batch_size=2, resolution=32)
    finally:
        torch.set_num_threads(threads)
    # same rows in the same order; each clip was in the same batch, so the arithmetic is the same
    np.testing.assert_allclose(got["fa"], fa, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["fb"], fb, rtol=0, atol=1e-6)
    single = frechet_distance(fa, fb)
    assert single > 1.0
    assert float(got["fvd"]) == pytest.approx(single, rel=1e-6)
