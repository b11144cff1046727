"""Causal tokenizer: causality of encoder and decoder, shapes for 1 and 17 frames (small and base presets)."""

import pytest
import torch

from nbp.tokenizer.model import PRESETS, DepthToSpace, PixelNorm, TokenizerConfig, VideoTokenizer, preset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return VideoTokenizer(preset("small", channels=8)).eval()


@pytest.mark.parametrize("t", [1, 4, 5, 9, 16])
def test_encoder_is_causal(small, t):
    x = torch.rand(1, 3, 17, 16, 16)
    y = x.clone()
    y[:, :, t] = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        za, zb = small.encoder(x), small.encoder(y)
    # latent k sees frames <= 4k: the ones before frame t's latent 1 + (t-1)//4 are untouched
    first_changed = 0 if t == 0 else 1 + (t - 1) // 4
    assert torch.equal(za[:, :, :first_changed], zb[:, :, :first_changed])
    assert not torch.equal(za[:, :, first_changed], zb[:, :, first_changed])


@pytest.mark.parametrize("k", [1, 2, 4])
def test_decoder_is_causal(small, k):
    q = small.fsq(torch.randn(1, 4, 5, 2, 2))
    q2 = q.clone()
    q2[:, :, k] = small.fsq(torch.randn(1, 4, 1, 2, 2) + 3)[:, :, 0]  # a different code at latent time k
    with torch.no_grad():
        a, b = small.decoder(q), small.decoder(q2)
    # latent k decodes to frames 4k-3 .. 4k: earlier frames are untouched
    first = 4 * k - 3
    assert torch.equal(a[:, :, :first], b[:, :, :first])
    assert not torch.equal(a[:, :, first], b[:, :, first])


def test_image_is_a_one_frame_video(small):
    x = torch.rand(2, 3, 17, 16, 16)
    with torch.no_grad():
        _, codes17 = small.encode(x)
        _, codes1 = small.encode(x[:, :, :1])
    assert codes1.shape == (2, 1, 4, 4) and codes1.dtype == torch.int32
    assert torch.equal(codes17[:, :1], codes1)  # the first latent of a clip is the image's code
    assert small.decode_from_code_indices(codes1).shape == (2, 3, 1, 16, 16)


@pytest.mark.parametrize("frames,latent_t", [(1, 1), (17, 5)])
def test_shapes_small(small, frames, latent_t):
    x = torch.rand(2, 3, frames, 32, 32)
    with torch.no_grad():
        quant, codes = small.encode(x, quantize=True)
        out = small.decode_codes(codes)
        rec, q = small(x)
    assert quant.shape == (2, 4, latent_t, 8, 8)
    assert codes.shape == (2, latent_t, 8, 8) and codes.dtype == torch.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < small.vocab_size == 1000
    assert out.shape == rec.shape == x.shape
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(q, quant)
    assert small.latent_grid(frames, 32, 32) == (latent_t, 8, 8)


@pytest.mark.parametrize("frames,latent_t", [(1, 1), (17, 5)])
def test_shapes_base_on_meta_device(frames, latent_t):
    with torch.device("meta"):
        base = VideoTokenizer(PRESETS["base"])
        quant, _ = base.encode(torch.empty(1, 3, frames, 128, 128), quantize=False)
        out = base.decode(quant)
    assert quant.shape == (1, 6, latent_t, 16, 16)
    assert out.shape == (1, 3, frames, 128, 128)
    assert base.vocab_size == 64000
    assert base.latent_grid(17, 128, 128) == (5, 16, 16)


def test_depth_to_space_channel_order():
    # channel = ((it * fh + ih) * fw + iw) * C_out + c; time factor 2 drops the first output frame
    d2s = DepthToSpace((2, 2, 2))
    C_out, T = 3, 2
    x = torch.arange(8 * C_out, dtype=torch.float32).view(1, 8 * C_out, 1, 1, 1).expand(1, 8 * C_out, T, 1, 1)
    y = d2s(x.contiguous())
    assert y.shape == (1, C_out, 2 * T - 1, 2, 2)
    # frame 0 of the output is (t=0, it=1); frame 1 is (t=1, it=0)
    for c in range(C_out):
        for ih in range(2):
            for iw in range(2):
                assert y[0, c, 0, ih, iw].item() == ((1 * 2 + ih) * 2 + iw) * C_out + c
                assert y[0, c, 1, ih, iw].item() == ((0 * 2 + ih) * 2 + iw) * C_out + c


def test_pixel_norm_is_layer_norm_over_channels():
    torch.manual_seed(0)
    norm = PixelNorm(6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 6, 3, 4, 5) * 3 + 1
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 4, 1), (6,), norm.weight, norm.bias, eps=1e-5)
    torch.testing.assert_close(norm(x), ref.permute(0, 4, 1, 2, 3))


@pytest.mark.parametrize("norm,local", [("pixel", True), ("frame", False)])
def test_pixel_norm_codes_depend_only_on_their_receptive_field(norm, local):
    """A change far to the right (x >= 40 of 64) leaves the left latent column alone with per-position norms
    (receptive field ~16 px at spatial x4); per-frame group norm carries it across the frame."""
    torch.manual_seed(0)
    tok = VideoTokenizer(preset("small", channels=8, norm=norm)).eval()
    x = torch.rand(1, 3, 5, 64, 64)
    y = x.clone()
    y[..., 40:] = torch.rand(1, 3, 5, 64, 24)
    with torch.no_grad():
        a, b = tok.encoder(x), tok.encoder(y)  # [1, 4, 2, 16, 16]
    assert torch.equal(a[..., 0], b[..., 0]) == local
    assert not torch.equal(a[..., -1], b[..., -1])


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm 'batch'"):
        TokenizerConfig(norm="batch")
