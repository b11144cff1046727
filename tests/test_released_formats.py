"""Released files in every form they come in: ``hyper_parameters`` as an argparse Namespace, as a dict holding a
Namespace or a plain dict under ``args``, flat, or without the sizes (then read from the tensor shapes; the number
of heads is in no shape); released tokenizers at the width their shapes have."""

import argparse
import dataclasses

import pytest
import torch
from test_released_generator import NH, NL, NPOS, TEXT_IDS, B, C, V, _released_state

from nbp.cli import main as cli_main
from nbp.errors import NbpError
from nbp.generator import load_generator
from nbp.generator.released import import_released_generator

# NH = 2 heads at width 16 is none of the released sizes: an import that did not find n_head would fail
SIZES = {"n_layer": NL, "n_head": NH, "n_embd": C, "vocab_size": V, "block_size": NPOS}
LAYOUT = {"resolution": 32, "sequence_length": 9, "semi_ar": True, "token_number_per_step": B}


def _save(path, hyper_parameters, vocab=V, cond_len=0):
    ckpt = {"epoch": 1, "global_step": 7, "state_dict": _released_state(vocab, cond_len, seed=5)}
    if hyper_parameters is not None:
        ckpt["hyper_parameters"] = hyper_parameters
    torch.save(ckpt, path)
    return path


FORMS = {
    "namespace": lambda hp: argparse.Namespace(**hp),
    "dict_holding_namespace": lambda hp: {"args": argparse.Namespace(**hp)},
    "plain_dict_under_args": lambda hp: {"args": dict(hp)},
    "flat_dict": lambda hp: dict(hp),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_hyper_parameters_form_gives_the_recorded_sizes(tmp_path, form):
    path = _save(tmp_path / f"{form}.ckpt", FORMS[form]({**SIZES, **LAYOUT}))
    ckpt = import_released_generator(path)
    c = ckpt["config"]
    assert (c["n_layer"], c["n_head"], c["n_embd"], c["vocab_size"], c["n_positions"]) == (NL, NH, C, V, NPOS)
    assert ckpt["task"]["task"] == "frame_pred" and ckpt["task"]["block"] == [1, 1, B]
    assert ckpt["task"]["grid"] == [3, 4, 4]
    assert ckpt["hyper_parameters"]["n_head"] == NH  # stored flat, as plain data


def test_plain_dict_under_args_loads_without_any_allow_list_and_imports(tmp_path):
    """The form a user gets after re-saving a released file so that plain ``weights_only`` loading accepts it."""
    path = _save(tmp_path / "resaved.ckpt", {"args": {**SIZES, **LAYOUT}})
    assert torch.load(path, weights_only=True)["hyper_parameters"]["args"]["n_head"] == NH
    dst = tmp_path / "generator.pt"
    assert cli_main(["import-checkpoint", str(path), str(dst)]) == 0
    assert load_generator(dst).model.config.n_head == NH


def test_hybrid_with_plain_dict_under_args_finds_heads_and_block(tmp_path):
    hp = {"args": {**SIZES, **LAYOUT, "hybrid": True, "cond_token_num": 8}}
    path = _save(tmp_path / "ucf.ckpt", hp, vocab=B + 32000 + V, cond_len=8)
    ckpt = import_released_generator(path)
    assert ckpt["config"]["n_head"] == NH and ckpt["task"]["task"] == "hybrid" and ckpt["task"]["block"] == [1, 1, B]
    assert ckpt["task"]["text_ids"][0] == TEXT_IDS  # conditioned on the UCF class texts


def test_missing_sizes_are_read_from_the_shapes(tmp_path):
    """n_layer from the block count, n_embd from the widths, the vocabulary from the embedding rows."""
    path = _save(tmp_path / "bare.ckpt", {"n_head": NH, **LAYOUT})  # no n_layer, n_embd, vocab_size, block_size
    c = import_released_generator(path)["config"]
    assert (c["n_layer"], c["n_embd"], c["vocab_size"], c["n_positions"]) == (NL, C, V, NPOS)


def test_hybrid_vocabulary_is_read_from_the_rows_and_the_block(tmp_path):
    hp = {"n_head": NH, **LAYOUT, "hybrid": True}  # no vocab_size: rows = B + 32000 + V
    path = _save(tmp_path / "ucf.ckpt", hp, vocab=B + 32000 + V, cond_len=8)
    ckpt = import_released_generator(path)
    assert ckpt["task"]["video_vocab"] == V and ckpt["config"]["vocab_size"] == B + 32000 + V


def test_heads_are_not_in_the_shapes_and_the_error_says_so(tmp_path):
    path = _save(tmp_path / "noheads.ckpt", {"args": {k: v for k, v in {**SIZES, **LAYOUT}.items() if k != "n_head"}})
    with pytest.raises(NbpError, match=r"number of heads unknown: .*tensor shapes do not record it \(pass --n-head\)"):
        import_released_generator(path)
    assert import_released_generator(path, n_head=4)["config"]["n_head"] == 4
    path = _save(tmp_path / "nohp.ckpt", None)  # no hyper_parameters at all: same question, nothing else missing
    with pytest.raises(NbpError, match="number of heads unknown"):
        import_released_generator(path, block=B)


def test_a_size_given_twice_with_different_values_is_refused(tmp_path):
    path = _save(tmp_path / "twice.ckpt", {"n_head": NH, "args": {**SIZES, **LAYOUT, "n_head": 4}})
    with pytest.raises(NbpError, match=r"hyper_parameters\.n_head = 2 but hyper_parameters\.args\.n_head = 4"):
        import_released_generator(path)
    same = _save(tmp_path / "same.ckpt", {"n_head": NH, "args": {**SIZES, **LAYOUT}})  # agreeing copies are fine
    assert import_released_generator(same)["config"]["n_head"] == NH


# --------------------------------------------------------------------------------------
# tokenizers


@pytest.fixture(scope="module")
def narrow_released():
    """The released (base) architecture at width 32 with the release's GroupNorm(32), in the released key layout."""
    from nbp.tokenizer.model import PRESETS, VideoTokenizer
    from nbp.tokenizer.released import to_released_state_dict

    torch.manual_seed(0)
    model = VideoTokenizer(dataclasses.replace(PRESETS["base"], channels=32)).eval()
    return model, to_released_state_dict(model)


def test_released_tokenizer_width_is_read_from_the_shapes(tmp_path, narrow_released):
    from nbp.tokenizer.released import load_released

    model, state = narrow_released
    torch.save({"model_state_dict": state}, tmp_path / "magvit2_narrow.pt")
    loaded = load_released(tmp_path / "magvit2_narrow.pt")  # no config: width from encoder_layers.0
    assert loaded.config.channels == 32 and loaded.config.norm == "frame"
    x = torch.rand(1, 3, 5, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.encode_codes(x), model.encode_codes(x))


def test_import_checkpoint_infers_the_tokenizer_width(tmp_path, narrow_released, capsys):
    from nbp.tokenizer import load_tokenizer

    _, state = narrow_released
    torch.save({"model_state_dict": state}, tmp_path / "magvit2_narrow.pt")
    assert cli_main(["import-checkpoint", str(tmp_path / "magvit2_narrow.pt"), str(tmp_path / "tok.pt")]) == 0
    assert "width 32" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "tok.pt").config.channels == 32


def test_released_tokenizer_with_other_latent_channels_is_refused(tmp_path, narrow_released):
    from nbp.tokenizer.released import config_from_state

    _, state = narrow_released
    bad = dict(state)
    last = max(int(k.split(".")[2]) for k in state if k.startswith("module.encoder_layers."))
    bad[f"module.encoder_layers.{last}.weight"] = torch.zeros(4, 128, 1, 1, 1)
    with pytest.raises(NbpError, match="4 latent channels, the released FSQ has 6 levels"):
        config_from_state(bad, source="x.pt")
