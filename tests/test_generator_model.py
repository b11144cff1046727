"""The transformer: released key names, SDPA vs FlexAttention, cached decoding, the unconditional embedding."""

import pytest
import torch

from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, PRESETS, KVCache, gpt_config
from nbp.generator.sampling import step_mask

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _task(task="class", block=(1, 1, 4), grid=(2, 4, 4)):
    return TaskLayout(task, BlockLayout(grid, block), video_vocab=40, num_classes=3, context_frames=block[0],
                      text_ids=tuple(tuple(range(8)) for _ in range(3)) if task == "hybrid" else ())


def _model(t, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(gpt_config("tiny", vocab_size=t.vocab_size, n_positions=t.seq_len, cond_len=t.cond_len, **kw)).eval()


def _batch(t, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, t.video_vocab, (n, t.num_tokens), generator=g)
    return t.train_inputs(codes, t.cond_ids(torch.arange(n) % 3))


def test_released_key_names():
    t = _task("hybrid")
    keys = set(_model(t).state_dict())
    expect = {"tok_emb.weight", "pos_emb", "ln_f.weight", "ln_f.bias", "head.weight", "uncond_embedding"}
    for L in range(PRESETS["tiny"]["n_layer"]):
        for ln in ("ln1", "ln2"):
            expect |= {f"blocks.{L}.{ln}.weight", f"blocks.{L}.{ln}.bias"}
        for lin in ("key", "query", "value", "proj"):
            expect |= {f"blocks.{L}.attn.{lin}.weight", f"blocks.{L}.attn.{lin}.bias"}
        expect |= {f"blocks.{L}.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert keys == expect
    m = _model(t)
    assert m.pos_emb.shape == (1, t.seq_len, 128) and m.uncond_embedding.shape == (8, 128)
    assert m.blocks[0].mlp[0].out_features == 4 * 128


def test_preset_sizes():
    # the paper's sizes 700M, 1.2B, 3B count the transformer blocks; built on the meta device (no memory)
    sizes = {}
    for name in ("base", "xl", "3b"):
        with torch.device("meta"):
            m = GPT(gpt_config(name, vocab_size=96016, n_positions=5120, cond_len=8))
        sizes[name] = sum(p.numel() for p in m.blocks.parameters())
    assert 0.65e9 < sizes["base"] < 0.75e9
    assert 1.15e9 < sizes["xl"] < 1.3e9
    assert 3.5e9 < sizes["3b"] < 3.8e9


@pytest.mark.parametrize("task,block", [("class", (1, 1, 4)), ("hybrid", (1, 1, 4)), ("frame_pred", (1, 2, 2)),
                                        ("uncond", (2, 2, 2)), ("class", (1, 1, 1))])
def test_sdpa_and_flex_attention_agree(task, block):
    """FlexAttention runs on CPU without autograd (eager, unfused); on CUDA it is compiled."""
    t = _task(task, block)
    m = _model(t)
    inp, _ = _batch(t)
    with torch.no_grad():
        dense = m(inp, t.dense_mask())
        flex = m(inp, t.block_mask())
        full = m(inp, None)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)
    assert (full - dense).abs().max() > 1e-3  # the mask matters


@pytest.mark.parametrize("task", ["class", "hybrid", "frame_pred"])
def test_cached_decoding_equals_full_forward(task):
    t = _task(task)
    m = _model(t)
    inp, _ = _batch(t)
    B = t.block_size
    with torch.no_grad():
        full = m(inp, t.dense_mask())
        cache = KVCache.for_model(m, batch=2, max_len=t.seq_len)
        ptr = cache.k.data_ptr()
        # prefill the prompt, then the NTP tokens one by one (hybrid), then whole blocks
        P = t.cond_len + len(t.start_ids) if t.task != "frame_pred" else t.context_len
        steps = [(0, P)] + [(s, 1) for s in range(P, t.cond_len + t.ntp_len)]
        s = max(P, t.cond_len + t.ntp_len)
        steps += [(k, B) for k in range(s, t.seq_len, B)]
        outs = [m(inp[:, a:a + n], step_mask(t, a, n), cache=cache, start=a) for a, n in steps]
    assert cache.k.data_ptr() == ptr  # written in place, never reallocated
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_uncond_embedding_replaces_condition():
    t = _task("class")
    m = _model(t)
    inp, _ = _batch(t, n=2)
    other = inp.clone()
    other[:, 0] = t.cond_ids(torch.tensor([2, 2]))[:, 0]  # another class
    uncond = torch.tensor([False, True])
    with torch.no_grad():
        a, b = m(inp, t.dense_mask(), uncond=uncond), m(other, t.dense_mask(), uncond=uncond)
    assert (a[0] - b[0]).abs().max() > 1e-4  # conditional row follows the class
    torch.testing.assert_close(a[1], b[1])  # unconditional row ignores it
    # gradient reaches the learned unconditional embedding
    m.train()
    m(inp, t.dense_mask(), uncond=uncond).sum().backward()
    assert m.uncond_embedding.grad.abs().sum() > 0


def test_positions_beyond_slots_raise():
    t = _task("class")
    m = _model(t)
    with pytest.raises(ValueError, match="exceed"):
        m(torch.zeros(1, 4, dtype=torch.long), None, start=t.seq_len - 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention)")
def test_compiled_flex_matches_sdpa_on_cuda_with_gradients():
    t = _task("hybrid", (1, 1, 4), grid=(4, 8, 8))
    m = _model(t).cuda().train()
    inp, tgt = _batch(t)
    inp, tgt = inp.cuda(), tgt.cuda()
    grads = []
    for mask in (t.dense_mask(device="cuda"), t.block_mask(device="cuda")):
        m.zero_grad()
        logits = m(inp, mask)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100).backward()
        grads.append((logits.detach(), m.blocks[0].attn.query.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-4, rtol=1e-3)


def test_grid_position_code():
    from nbp.generator.model import grid_position_code

    grid = (5, 8, 8)
    cells = torch.tensor([[t, h, w] for t in range(5) for h in range(8) for w in range(8)])
    code = grid_position_code(cells, grid, 128)
    assert code.shape == (320, 128) and code.abs().max() <= 1.0
    # t gets 32 columns, h and w 48 each; first pair of each axis: sin/cos of a quarter turn per cell
    torch.testing.assert_close(code[9, 0], torch.tensor(0.0))  # cell (0, 1, 1): t = 0
    torch.testing.assert_close(code[9, 32], torch.tensor(1.0))  # sin(pi/2 * h) at h = 1
    torch.testing.assert_close(code[9, 32 + 24], torch.tensor(0.0), atol=1e-6, rtol=0)  # cos(pi/2)
    torch.testing.assert_close(code[9, 80 + 24], torch.tensor(0.0), atol=1e-6, rtol=0)  # w axis, cos(pi/2)
    # every cell has its own code, and a neighbour is closer than a far cell
    d = torch.cdist(code, code)
    assert (d + torch.eye(320) * 10).min() > 0.1
    assert d[0, 1] < d[0, 7] and d[0, 8] < d[0, 56] and d[0, 64] < d[0, 256]
    # odd width: the last column of an axis is zero, not an error
    assert grid_position_code(cells[:3], grid, 30).shape == (3, 30)


# ---- inference path: fused QKV, static-shape decode step, bf16 ------------------------------------------------


def test_fused_qkv_keeps_released_names_and_follows_in_place_writes(tmp_path):
    t = _task("hybrid")
    m = _model(t)
    released = {k: v.clone() for k, v in _model(t, seed=7).state_dict().items()}  # another model's weights
    m.fuse_qkv()
    assert set(m.state_dict()) == set(released)  # no fused key is saved
    m.load_state_dict(released)  # load_state_dict writes in place: the fused weight follows
    attn = m.blocks[1].attn
    C = attn.query.weight.shape[1]
    assert torch.equal(attn.qkv_weight, torch.cat([released[f"blocks.1.attn.{n}.weight"] for n in ("query", "key", "value")]))
    assert torch.equal(attn.qkv_bias[C:2 * C], released["blocks.1.attn.key.bias"])
    torch.save(m.state_dict(), tmp_path / "sd.pt")  # saved in the released layout, loadable without fusing
    plain = _model(t)
    plain.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, released[k]), k
    inp, _ = _batch(t)
    with torch.no_grad():
        torch.testing.assert_close(m(inp, t.dense_mask()), plain(inp, t.dense_mask()), atol=1e-5, rtol=1e-5)
    # an optimizer step writes in place too; a dtype move rebuilds the fusion
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(inp, t.dense_mask()).square().mean().backward()
    opt.step()
    assert torch.equal(attn.qkv_weight[:C], attn.query.weight)
    m.double()
    assert attn.qkv_weight.dtype == torch.float64 and torch.equal(attn.qkv_weight[2 * C:], attn.value.weight)


@pytest.mark.parametrize("fused", [False, True])
def test_static_step_equals_the_sliced_cached_step(fused):
    t = _task("frame_pred", (1, 1, 4), grid=(4, 4, 4))
    m = _model(t).double()
    if fused:
        m.fuse_qkv()
    inp, _ = _batch(t)
    B, P = t.block_size, t.context_len
    with torch.no_grad():
        ref_cache = KVCache.for_model(m, 2, max_len=t.seq_len)
        cache = KVCache.for_model(m, 2, max_len=t.seq_len)
        m(inp[:, :P], t.dense_mask(P), cache=ref_cache, start=0)
        m(inp[:, :P], t.dense_mask(P), cache=cache, start=0)
        for s in range(P, t.seq_len, B):
            ref = m(inp[:, s:s + B], None, cache=ref_cache, start=s)
            got = m.static_step(inp[:, s:s + B], torch.tensor(s), cache)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-12, atol=1e-12)


def test_prepare_inference_bf16():
    t = _task("class")
    m = _model(t).prepare_inference(dtype=torch.bfloat16)
    assert m.blocks[0].attn.qkv_weight.dtype == torch.bfloat16 and not m.training
    assert KVCache.for_model(m, 1, max_len=8).k.dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in m.state_dict().values())
