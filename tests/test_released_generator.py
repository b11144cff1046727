"""Released Lightning generators: a file written with the documented names and layout (NBP.md sections 2-3) is
imported strictly, its logits match a hand-written minGPT forward under the hand-built released mask, and
greedy samples follow the id rules; files carrying other pickled globals are refused."""

import argparse
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from nbp import dag
from nbp.cli import main as cli_main
from nbp.errors import NbpError
from nbp.generator import load_generator
from nbp.generator.released import import_released_generator, load_released_generator

TEXT_IDS = [2, 2, 2, 1, 3394, 10977, 1207, 786]  # "apply eye makeup", the first row of ucf101_llama_text_ids.tsv
V, C, NH, NL, NPOS = 40, 16, 2, 2, 64  # video codes, width, heads, layers, position slots


def _released_state(vocab, cond_len, seed=0):
    """A state dict written out with the documented released key names (NBP.md section 3)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.4):
        return torch.randn(*shape, generator=g) * s

    sd = {"transformer.tok_emb.weight": r(vocab, C), "transformer.pos_emb": r(1, NPOS, C),
          "transformer.uncond_embedding": r(cond_len, C), "transformer.ln_f.weight": 1 + r(C, s=0.1),
          "transformer.ln_f.bias": r(C, s=0.1), "transformer.head.weight": r(vocab, C)}
    for i in range(NL):
        p = f"transformer.blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(C, s=0.1), r(C, s=0.1)
        for m in ("key", "query", "value", "proj"):
            sd[p + f"attn.{m}.weight"], sd[p + f"attn.{m}.bias"] = r(C, C), r(C, s=0.1)
        sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"] = r(4 * C, C), r(4 * C, s=0.1)
        sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"] = r(C, 4 * C), r(C, s=0.1)
    sd["first_stage_model.encoder_layers.0.conv.weight"] = r(4, 3, 3, 3, 3)  # frozen tokenizer: ignored by name
    sd["first_stage_model.encoder_layers.0.conv.bias"] = r(4)
    return sd


def _write(path, sd, **hp):
    args = argparse.Namespace(n_layer=NL, n_head=NH, n_embd=C, vocab_size=V, block_size=NPOS, resolution=32,
                              sequence_length=9, semi_ar=True, **hp)
    torch.save({"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.9.0", "state_dict": sd,
                "hyper_parameters": {"args": args}}, path)
    return path


def _reference_logits(sd, ids, mask):
    """minGPT forward written plainly from the released tensors: pre-LN, GELU MLP, untied head."""
    w = {k[len("transformer."):]: v.double() for k, v in sd.items() if k.startswith("transformer.")}
    L = ids.shape[1]
    x = w["tok_emb.weight"][ids] + w["pos_emb"][:, :L]
    for i in range(NL):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (C,), w[p + "ln1.weight"], w[p + "ln1.bias"])
        q, k, v = (F.linear(h, w[p + f"attn.{m}.weight"], w[p + f"attn.{m}.bias"]) for m in ("query", "key", "value"))
        q, k, v = (t.view(t.shape[0], L, NH, C // NH).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // NH)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(y, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), w[p + "ln2.weight"], w[p + "ln2.bias"])
        h = F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]))
        x = x + F.linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    return F.linear(F.layer_norm(x, (C,), w["ln_f.weight"], w["ln_f.bias"]), w["head.weight"])


def _hybrid_mask(L, B):
    """NBP.md section 2, written out: everything sees the 8 text positions; causal from the bov through the
    first block; from 8 + B on, blocks of B aligned at 8 + B (bidirectional inside, causal across)."""
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            if j < 8:
                m[i, j] = True
            elif i < 8:
                m[i, j] = False
            elif i < 8 + B or j < 8 + B:
                m[i, j] = j <= i
            else:
                m[i, j] = (j - 8 - B) // B <= (i - 8 - B) // B
    return m


def _k600_mask(L, B):
    return torch.tensor([[j <= (i // B + 1) * B - 1 for j in range(L)] for i in range(L)])


B = 4
N = 3 * 4 * 4  # grid (3, 4, 4) from sequence_length 9, resolution 32


def _hybrid_ids(codes):
    """Full released sequence for class 0: [8 text][bov][v_0..v_{B-1}][1..B-1][v_B..]."""
    text = torch.tensor(TEXT_IDS) + B
    vid = codes + 32000 + B
    return torch.cat([text, torch.tensor([0]), vid[:B], torch.arange(1, B), vid[B:]])


@pytest.fixture
def hybrid_file(tmp_path):
    sd = _released_state(B + 32000 + V, 8)
    return _write(tmp_path / "ucf_hybrid.ckpt", sd, hybrid=True, token_number_per_step=B, cond_token_num=8), sd


def test_hybrid_logits_follow_the_released_layout_and_mask(hybrid_file):
    path, sd = hybrid_file
    gen = load_generator(path)  # the public loader imports a .ckpt on the fly
    assert gen.task.task == "hybrid" and gen.task.layout.block == (1, 1, B) and gen.info["step"] == 1234
    assert gen.classes[0] == {"label": 0, "name": "ApplyEyeMakeup", "text": "apply eye makeup"}
    codes = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    ids = _hybrid_ids(codes)[None, :-B]  # the model input drops the last B ids
    L = ids.shape[1]
    assert L == 8 + N
    with torch.no_grad():
        ours = gen(ids).double()
    ref = _reference_logits(sd, ids, _hybrid_mask(L, B))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_hybrid_greedy_sample_follows_the_id_rules(hybrid_file):
    path, sd = hybrid_file
    gen = load_released_generator(path)
    prompt = torch.tensor([[t + B for t in TEXT_IDS] + [0]])  # [text][bov]
    from nbp.generator.sampling import prompt_ids

    assert torch.equal(prompt_ids(gen.task, labels=torch.tensor([0])), prompt)  # text ids from the tsv, shifted by B
    out = gen.generate(prompt, greedy=True)
    assert out.shape == (1, 9 + N) and torch.equal(out[:, :9], prompt)
    codes = out[0, 9:] - (32000 + B)
    assert codes.min() >= 0 and codes.max() < V
    full = _hybrid_ids(codes)[None]
    ref = _reference_logits(sd, full[:, :-B], _hybrid_mask(full.shape[1] - B, B))[0, 8:]  # from the bov on: 1 row per target
    pred = ref[:, 32000 + B:].argmax(-1)
    assert torch.equal(pred, codes)


@pytest.fixture
def k600_file(tmp_path):
    sd = _released_state(V, 0, seed=3)
    return _write(tmp_path / "k600.ckpt", sd, token_number_per_step=B, unconditional=True), sd


def test_k600_logits_and_frame_prediction(k600_file):
    path, sd = k600_file
    gen = load_generator(path)
    assert gen.task.task == "frame_pred" and gen.task.context_len == 2 * 16 and gen.model.config.cond_len == 0
    codes = torch.randint(0, V, (1, N), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = gen(codes[:, :-B]).double()  # id = code; input = seq[:-B]
    ref = _reference_logits(sd, codes[:, :-B], _k600_mask(N - B, B))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    out = gen.generate(codes[:, :32], greedy=True)  # 2 latent frames of context, 16 new tokens in 4 steps
    assert out.shape == (1, N) and torch.equal(out[:, :32], codes[:, :32])
    ref = _reference_logits(sd, out[:, :-B], _k600_mask(N - B, B))[0]
    assert torch.equal(ref[32 - B:].argmax(-1), out[0, 32:])  # position k predicts token k + B


def test_import_checkpoint_cli_writes_our_format(k600_file, tmp_path, capsys):
    path, _ = k600_file
    dst = tmp_path / "generator.pt"
    assert cli_main(["import-checkpoint", str(path), str(dst)]) == 0
    assert "ignored 2 first_stage_model.* keys" in capsys.readouterr().out
    ours, direct = load_generator(dst), load_generator(path)
    ids = torch.randint(0, V, (2, N - B))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), direct(ids))
    ckpt = torch.load(dst, weights_only=True)  # plain data only
    assert ckpt["hyper_parameters"]["token_number_per_step"] == B and ckpt["source"] == "released"


def test_import_checkpoint_cli_delegates_tokenizers(tmp_path):
    from nbp.tokenizer import load_tokenizer
    from nbp.tokenizer.model import PRESETS, VideoTokenizer
    from nbp.tokenizer.released import to_released_state_dict

    torch.manual_seed(0)
    tok = VideoTokenizer(dataclasses.replace(PRESETS["small"], norm="frame")).eval()  # released files: per-frame norms
    src = tmp_path / "magvit2_test.pt"
    torch.save({"model_state_dict": to_released_state_dict(tok)}, src)
    dst = tmp_path / "tokenizer.pt"
    assert cli_main(["import-checkpoint", str(src), str(dst), "--tokenizer-preset", "small"]) == 0
    video = torch.rand(1, 3, 5, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_tokenizer(dst).encode_codes(video), tok.encode_codes(video))


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("bad", [Payload(), {"args": argparse.Namespace(n_layer=NL, extra=Payload())}])
def test_other_globals_in_hyper_parameters_are_refused(tmp_path, bad):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _released_state(V, 0), "hyper_parameters": bad}, path)
    with pytest.raises(NbpError, match=r"refused to unpickle posix\.getcwd"):
        import_released_generator(path)


def test_a_custom_class_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _released_state(V, 0), "hyper_parameters": {"args": argparse.Namespace(x=Evil())}}, path)
    with pytest.raises(NbpError, match=r"refused to unpickle .*Evil"):
        import_released_generator(path)


class Evil:
    pass


@pytest.mark.parametrize("change,match", [
    (lambda sd: sd.pop("transformer.blocks.1.attn.proj.bias"), "missing"),
    (lambda sd: sd.__setitem__("transformer.blocks.0.attn.mask", torch.ones(4, 4)), "unexpected"),
    (lambda sd: sd.__setitem__("cond_stage_model.x", torch.ones(1)), "neither transformer"),
    (lambda sd: sd.__setitem__("transformer.blocks.0.mlp.0.bias", torch.ones(3)), "shape"),
])
def test_keys_are_mapped_strictly(tmp_path, change, match):
    sd = _released_state(V, 0)
    change(sd)
    path = _write(tmp_path / "bad.ckpt", sd, token_number_per_step=B)
    with pytest.raises(NbpError, match=match):
        import_released_generator(path)


def test_hyper_parameters_must_agree_with_the_weights(tmp_path):
    path = tmp_path / "bad.ckpt"
    args = argparse.Namespace(n_layer=NL + 1, n_head=NH, n_embd=C, token_number_per_step=B, resolution=32, sequence_length=9)
    torch.save({"state_dict": _released_state(V, 0), "hyper_parameters": args}, path)
    with pytest.raises(NbpError, match="n_layer"):
        import_released_generator(path)


def test_train_generator_stage_imports_a_released_entry(k600_file, tmp_path):
    from pathlib import Path

    from nbp.config import ConfigError, load_config
    from nbp.generator.train import run_train_generator

    path, _ = k600_file
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    over = {"run.out": str(tmp_path / "out"), "train_generator.released_k600_nbp16.checkpoint": str(path),
            "train_generator.released_k600_nbp16.block": [1, 1, B]}
    cfg = load_config(params, over)
    run_train_generator(cfg, "released_k600_nbp16")
    out = Path(dag.folder(cfg, "train_generator", "released_k600_nbp16"))
    gen = load_generator(out / "generator.pt")
    assert gen.task.task == "frame_pred" and gen.info["source"] == "released" and gen.tokenizer.endswith("tokenizer.pt")
    assert (out / "history.csv").is_file() and (out / "metrics.json").is_file()
    with pytest.raises(NbpError, match="blocks of 4 tokens, not 8"):
        run_train_generator(load_config(params, {**over, "train_generator.released_k600_nbp16.block": [1, 2, 4]}),
                            "released_k600_nbp16")
    with pytest.raises(ConfigError, match="block"):  # same size, other shape
        run_train_generator(load_config(params, {**over, "train_generator.released_k600_nbp16.block": [1, 2, 2]}),
                            "released_k600_nbp16")
