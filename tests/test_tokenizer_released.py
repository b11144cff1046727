"""Released magvit2_*.pt import: the documented key layout, strict loading, identical outputs."""

import dataclasses

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


def test_released_file_loads_strictly_with_identical_outputs(tmp_path, narrow_base):
    cfg, model = narrow_base
    released = to_released_state_dict(model)
    path = tmp_path / "magvit2_test.pt"
    torch.save({"model_state_dict": released}, path)
    loaded = load_released(path, config=cfg)
    x = torch.rand(1, 3, 9, 16, 16)
    with torch.no_grad():
        qa, ca = model.encode(x)
        qb, cb = loaded.encode(x)
        assert torch.equal(qa, qb) and torch.equal(ca, cb)
        assert torch.equal(model.decode_from_code_indices(ca), loaded.decode_from_code_indices(cb))
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
