"""Released magvit2_*.pt import: the documented key layout, strict loading, identical outputs."""

import dataclasses
import math

import pytest
import torch

from nbp import load_magvit2
from nbp.errors import NbpError
from nbp.tokenizer.model import PRESETS, VideoTokenizer
from nbp.tokenizer.released import convert_state_dict, load_released, to_released_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RES = ["fn.0.weight", "fn.0.bias", "fn.1.beta", "fn.2.conv.weight", "fn.2.conv.bias",
       "fn.3.weight", "fn.3.bias", "fn.4.beta", "fn.5.conv.weight", "fn.5.conv.bias"]


def _documented_layers():
    """The released layer lists written out from NBP.md section 4: (kind, in, out[, kernel])."""
    enc = [("cconv", 3, 128, 3)] + [("res", 128, 128)] * 4 + [("cconv", 128, 128, 3)]
    enc += [("res", 128, 256)] + [("res", 256, 256)] * 3 + [("cconv", 256, 256, 3)]
    enc += [("res", 256, 256)] * 4 + [("cconv", 256, 256, 3)]
    enc += [("res", 256, 512)] + [("res", 512, 512)] * 7 + [("gn", 512), ("swish", 512), ("conv", 512, 6, 1)]
    dec = [("cconv", 6, 512, 3)] + [("res", 512, 512)] * 8 + [("cconv", 512, 4096, 3), ("d2s",)]
    dec += [("res", 512, 256)] + [("res", 256, 256)] * 3 + [("cconv", 256, 2048, 3), ("d2s",)]
    dec += [("res", 256, 256)] * 4 + [("cconv", 256, 1024, 3), ("d2s",)]
    dec += [("res", 256, 128)] + [("res", 128, 128)] * 3 + [("gn", 128), ("swish", 128), ("cconv", 128, 3, 3)]
    return enc, dec


def _documented_keys() -> dict[str, tuple]:
    keys = {}
    for name, layers in zip(("encoder_layers", "decoder_layers"), _documented_layers()):
        for n, (kind, *a) in enumerate(layers):
            p = f"module.{name}.{n}."
            if kind == "cconv":
                keys[p + "conv.weight"], keys[p + "conv.bias"] = (a[1], a[0], a[2], a[2], a[2]), (a[1],)
            elif kind == "conv":
                keys[p + "weight"], keys[p + "bias"] = (a[1], a[0], 1, 1, 1), (a[1],)
            elif kind == "gn":
                keys[p + "weight"], keys[p + "bias"] = (a[0],), (a[0],)
            elif kind == "swish":
                keys[p + "beta"] = (1, a[0], 1, 1, 1)
            elif kind == "res":
                cin, cout = a
                shapes = [(cin,), (cin,), (1, cin, 1, 1, 1), (cout, cin, 3, 3, 3), (cout,),
                          (cout,), (cout,), (1, cout, 1, 1, 1), (cout, cout, 3, 3, 3), (cout,)]
                keys.update({p + s: sh for s, sh in zip(RES, shapes)})
                if cin != cout:
                    keys[p + "residual_fn.0.conv.weight"], keys[p + "residual_fn.0.conv.bias"] = (cout, cin, 1, 1, 1), (cout,)
    return keys


def test_base_key_list_and_shapes_match_the_documented_release():
    with torch.device("meta"):
        base = VideoTokenizer(PRESETS["base"])
        released = to_released_state_dict(base)
    expected = _documented_keys()
    assert list(released) == list(expected)  # same keys in the same order
    assert {k: tuple(v.shape) for k, v in released.items()} == expected
    # and the inverse mapping accepts exactly that key set
    assert set(convert_state_dict(released, base)) == set(base.state_dict())


@pytest.fixture(scope="module")
def narrow_base():
    """The base architecture (same layers and keys) with widths / 4, so it runs quickly."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["base"], channels=32, norm_groups=8)
    model = VideoTokenizer(cfg).eval()
    with torch.no_grad():  # non-trivial norms and slopes so a wrong mapping shows in the outputs
        for name, p in model.named_parameters():
            if "norm" in name or "beta" in name or name.endswith((".weight", ".bias")) and p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model


def _same_codes_and_decode(model, loaded, x):
    """The imported model encodes ``x`` to the writer's latents and codes and decodes them to the same pixels."""
    with torch.no_grad():
        qa, ca = model.encode(x)
        qb, cb = loaded.encode(x)
        assert torch.equal(qa, qb) and torch.equal(ca, cb)
        assert torch.equal(model.decode_from_code_indices(ca), loaded.decode_from_code_indices(cb))
    return qa


def test_released_file_loads_strictly_with_identical_outputs(tmp_path, narrow_base):
    cfg, model = narrow_base
    released = to_released_state_dict(model)
    path = tmp_path / "magvit2_test.pt"
    torch.save({"model_state_dict": released}, path)
    loaded = load_released(path, config=cfg)
    x = torch.rand(1, 3, 9, 16, 16)
    qa = _same_codes_and_decode(model, loaded, x)
    # a different model gives different outputs: the comparison above can fail
    other = VideoTokenizer(cfg).eval()
    with torch.no_grad():
        assert not torch.equal(other.encode(x)[0], qa)


def test_missing_and_unexpected_keys_are_named(tmp_path, narrow_base):
    cfg, model = narrow_base
    released = to_released_state_dict(model)
    missing = dict(released)
    del missing["module.decoder_layers.11.residual_fn.0.conv.bias"]
    torch.save({"model_state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(NbpError, match=r"missing key 'module\.decoder_layers\.11\.residual_fn\.0\.conv\.bias'"):
        load_released(tmp_path / "missing.pt", config=cfg)
    extra = dict(released)
    extra["module.encoder_layers.27.conv.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(NbpError, match=r"unexpected key 'module\.encoder_layers\.27\.conv\.weight'"):
        load_released(tmp_path / "extra.pt", config=cfg)
    bad = dict(released)
    bad["module.encoder_layers.0.conv.weight"] = torch.zeros(1, 3, 3, 3, 3)
    torch.save({"model_state_dict": bad}, tmp_path / "bad.pt")
    with pytest.raises(NbpError, match=r"'module\.encoder_layers\.0\.conv\.weight' has shape"):
        load_released(tmp_path / "bad.pt", config=cfg)


def test_load_magvit2_reads_both_formats(tmp_path):
    from nbp.checkpoint import save_checkpoint
    from nbp.tokenizer import tokenizer_checkpoint
    from nbp.tokenizer.model import preset

    torch.manual_seed(1)
    model = VideoTokenizer(preset("small", channels=8)).eval()
    save_checkpoint(tmp_path / "tokenizer.pt", tokenizer_checkpoint(model))
    tok = load_magvit2(tmp_path / "tokenizer.pt", resolution=64)
    x = torch.rand(1, 3, 5, 64, 64)
    with torch.no_grad():
        _, codes = tok.encode(x, quantize=True)
        assert torch.equal(codes, model.encode_codes(x))
        assert torch.equal(tok.decode_from_code_indices(codes), model.decode_from_code_indices(codes))
    torch.save({"something": 1}, tmp_path / "junk.pt")
    with pytest.raises(NbpError, match="junk.pt"):
        load_magvit2(tmp_path / "junk.pt")
    # a released-format file goes through the strict base mapping (here: a small model's keys do not fit; the
    # released layout has per-frame group norms only)
    frame_norm = VideoTokenizer(preset("small", channels=8, norm="frame"))
    torch.save({"model_state_dict": to_released_state_dict(frame_norm)}, tmp_path / "magvit2_small.pt")
    with pytest.raises(NbpError, match="magvit2_small.pt"):
        load_magvit2(tmp_path / "magvit2_small.pt")


# --------------------------------------------------------------------------------------
# a known answer that does not go through our key mapping: a state dict written by hand under the documented
# released names (NBP.md sections 3-4), run by a plain forward written here from the same text

SCALE, GROUPS = 4, 8  # widths / 4 (128 -> 32, ..., 4096 -> 1024) and 8 groups, so it runs in a second


def _w(c: int) -> int:
    return c if c in (3, 6) else c // SCALE


def _hand_written_released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under every documented key, shapes from NBP.md (widths / SCALE); each norm, slope and bias
    gets its own non-trivial values, so swapping any two of them changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in _documented_keys().items():
        if key.endswith("beta"):  # Swish slope [1, C, 1, 1, 1]
            sd[key] = 1 + 0.3 * torch.randn(1, _w(shape[1]), 1, 1, 1, generator=g)
        elif len(shape) == 5:  # conv kernel [out, in, k, k, k]
            out, cin, *k = shape
            sd[key] = torch.randn(_w(out), _w(cin), *k, generator=g) / (_w(cin) * k[0] ** 3) ** 0.5
        elif key.endswith("weight"):  # GroupNorm scale
            sd[key] = 1 + 0.3 * torch.randn(_w(shape[0]), generator=g)
        else:  # conv and GroupNorm biases
            sd[key] = 0.1 * torch.randn(_w(shape[0]), generator=g)
    return sd


def _ref_causal_conv(x, w, b, stride=(1, 1, 1)):
    """Replicate-pad time by 2*(k//2) at the front and space by k//2 on both sides, then a plain Conv3d."""
    p = w.shape[-1] // 2
    if p:
        x = torch.nn.functional.pad(x, (p, p, p, p, 2 * p, 0), mode="replicate")
    return torch.nn.functional.conv3d(x, w, b, stride)


def _ref_group_norm_per_frame(x, w, b):
    B, C, T, H, W = x.shape
    y = torch.nn.functional.group_norm(x.transpose(1, 2).reshape(B * T, C, H, W), GROUPS, w, b, eps=1e-5)
    return y.reshape(B, T, C, H, W).transpose(1, 2)


def _ref_swish(x, beta):
    return x * torch.sigmoid(beta * x)


def _ref_depth_to_space(x, f):
    """channel ((it * fh + ih) * fw + iw) * C_out + c -> output (c, t * ft + it, h * fh + ih, w * fw + iw); then drop
    the first ft - 1 frames."""
    ft, fh, fw = f
    B, C, T, H, W = x.shape
    c = C // (ft * fh * fw)
    out = x.new_zeros(B, c, T * ft, H * fh, W * fw)
    for it in range(ft):
        for ih in range(fh):
            for iw in range(fw):
                k = ((it * fh + ih) * fw + iw) * c
                out[:, :, it::ft, ih::fh, iw::fw] = x[:, k:k + c]
    return out[:, :, ft - 1:]


def _ref_run(sd, prefix, layers, x, strides=(), d2s=()):
    strides, d2s = list(strides), list(d2s)
    for n, (kind, *_) in enumerate(layers):
        p = f"module.{prefix}.{n}."
        if kind == "cconv":
            stride = strides.pop(0) if n and strides and prefix == "encoder_layers" else (1, 1, 1)
            x = _ref_causal_conv(x, sd[p + "conv.weight"], sd[p + "conv.bias"], stride)
        elif kind == "conv":
            x = torch.nn.functional.conv3d(x, sd[p + "weight"], sd[p + "bias"])
        elif kind == "gn":
            x = _ref_group_norm_per_frame(x, sd[p + "weight"], sd[p + "bias"])
        elif kind == "swish":
            x = _ref_swish(x, sd[p + "beta"])
        elif kind == "d2s":
            x = _ref_depth_to_space(x, d2s.pop(0))
        elif kind == "res":
            h = _ref_swish(_ref_group_norm_per_frame(x, sd[p + "fn.0.weight"], sd[p + "fn.0.bias"]), sd[p + "fn.1.beta"])
            h = _ref_causal_conv(h, sd[p + "fn.2.conv.weight"], sd[p + "fn.2.conv.bias"])
            h = _ref_swish(_ref_group_norm_per_frame(h, sd[p + "fn.3.weight"], sd[p + "fn.3.bias"]), sd[p + "fn.4.beta"])
            h = _ref_causal_conv(h, sd[p + "fn.5.conv.weight"], sd[p + "fn.5.conv.bias"])
            skip = p + "residual_fn.0.conv.weight"
            x = h + (_ref_causal_conv(x, sd[skip], sd[p + "residual_fn.0.conv.bias"]) if skip in sd else x)
    return x


LEVELS = (8, 8, 8, 5, 5, 5)
ENC_STRIDES = [(1, 2, 2), (2, 2, 2), (2, 2, 2)]  # the three down-sampling convs of the encoder, in order
DEC_FACTORS = [(2, 2, 2), (2, 2, 2), (1, 2, 2)]  # the three DepthToSpace of the decoder, in order


def _ref_fsq_indices(z):
    """NBP.md section 4: bound, round half to even, digits with the first channel least significant."""
    idx = torch.zeros(z.shape[0], *z.shape[2:], dtype=torch.int64)
    basis = 1
    for d, L in enumerate(LEVELS):
        half_l = (L - 1) * (1 - 1e-3) / 2
        offset = 0.5 if L % 2 == 0 else 0.0
        q = torch.round(torch.tanh(z[:, d] + math.tan(offset / half_l)) * half_l - offset)
        idx += (q.long() + L // 2) * basis
        basis *= L
    return idx


def _ref_codes(idx):
    out, basis = [], 1
    for L in LEVELS:
        out.append(((idx // basis) % L - L // 2).float() / (L // 2))
        basis *= L
    return torch.stack(out, 1)  # [B, 6, T', H', W']


def test_released_import_matches_a_plain_forward_over_the_documented_keys(tmp_path):
    enc_layers, dec_layers = _documented_layers()
    sd = _hand_written_released_state()
    path = tmp_path / "magvit2_hand.pt"
    torch.save({"model_state_dict": sd}, path)
    cfg = dataclasses.replace(PRESETS["base"], channels=128 // SCALE, norm_groups=GROUPS)
    model = load_released(path, config=cfg)
    x = torch.rand(1, 3, 9, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z_ref = _ref_run(sd, "encoder_layers", enc_layers, x, strides=ENC_STRIDES)  # [1, 6, 3, 2, 2]
        torch.testing.assert_close(model.encoder(x), z_ref, rtol=1e-4, atol=1e-5)
        codes = model.encode_codes(x)
        assert torch.equal(codes.long(), _ref_fsq_indices(z_ref))
        video_ref = _ref_run(sd, "decoder_layers", dec_layers, _ref_codes(codes.long()), d2s=DEC_FACTORS)
        assert video_ref.shape == (1, 3, 9, 16, 16)
        torch.testing.assert_close(model.decode_from_code_indices(codes), video_ref, rtol=1e-4, atol=1e-5)

        # the known answer can fail: a file whose two norms of one residual unit are swapped decodes differently
        swapped = dict(sd)
        for kind in ("weight", "bias"):
            a, b = f"module.decoder_layers.3.fn.0.{kind}", f"module.decoder_layers.3.fn.3.{kind}"
            swapped[a], swapped[b] = sd[b], sd[a]
        torch.save({"model_state_dict": swapped}, tmp_path / "swapped.pt")
        wrong = load_released(tmp_path / "swapped.pt", config=cfg)
        assert not torch.allclose(wrong.decode_from_code_indices(codes), video_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("depth", [1, 2])
def test_a_shallower_released_file_imports_at_its_own_depth(tmp_path, depth):
    """Width from the first convolution, depth from the keys: a uniform-depth file (as `res_blocks` makes) imports
    with that many residual units per stage and gives the writer's outputs; a file that no depth explains is refused
    by the strict key check, naming a key."""
    from nbp.tokenizer.model import preset

    cfg = preset("base", res_blocks=depth, channels=32)
    torch.manual_seed(depth)
    model = VideoTokenizer(cfg).eval()
    released = to_released_state_dict(model)
    torch.save({"model_state_dict": released}, tmp_path / "shallow.pt")
    loaded = load_released(tmp_path / "shallow.pt")  # no config: sizes from the file
    assert (loaded.config.channels, loaded.config.enc_res, loaded.config.dec_res) == (32, (depth,) * 4, (depth,) * 4)
    _same_codes_and_decode(model, loaded, torch.rand(1, 3, 9, 16, 16))
    odd = {k: v for k, v in released.items() if not k.startswith("module.decoder_layers.2.")}  # one unit missing
    torch.save({"model_state_dict": odd}, tmp_path / "odd.pt")
    with pytest.raises(NbpError, match=r"(missing|unexpected) key 'module\.(en|de)coder_layers\.\d+\."):
        load_released(tmp_path / "odd.pt")
