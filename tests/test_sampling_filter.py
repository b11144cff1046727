"""Logits filter, token draws and guidance arithmetic: known answers."""

import math

import pytest
import torch

from nbp.generator.sampling import candidates, cfg_combine, cfg_scale, filter_logits, sample_logits

NEG = float("-inf")


def _logp(*p):
    return torch.tensor([math.log(x) for x in p])


def test_top_k_keeps_the_k_largest():
    out = filter_logits(torch.tensor([1.0, 3.0, 2.0, 0.0]), top_k=2)
    assert out.tolist() == [NEG, 3.0, 2.0, NEG]


def test_top_p_keeps_the_first_token_over_the_threshold():
    logits = _logp(0.5, 0.3, 0.15, 0.05)
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, then 0.3 crosses it and is kept
    kept = torch.isfinite(filter_logits(logits, top_p=0.85))
    assert kept.tolist() == [True, True, True, False]


def test_top_p_applies_to_the_renormalised_top_k_survivors():
    logits = _logp(0.5, 0.3, 0.15, 0.05)
    # over the whole vocabulary the mass before the third token is 0.80 < 0.83: kept
    assert torch.isfinite(filter_logits(logits, top_p=0.83)).sum() == 3
    # among the top 3 (renormalised by 0.95) it is 0.842 > 0.83: dropped
    assert torch.isfinite(filter_logits(logits, top_k=3, top_p=0.83)).tolist() == [True, True, False, False]


def test_temperature_divides_logits():
    x = torch.randn(7)
    torch.testing.assert_close(filter_logits(x, temperature=2.0), x / 2)


def _reference_filter(row, temperature, top_k, top_p):
    """One row, written plainly with a Python loop (the released sampler's structure)."""
    row = row / temperature
    order = sorted(range(len(row)), key=lambda i: -row[i].item())[:top_k]
    vals = torch.stack([row[i] for i in order])
    probs = torch.softmax(vals, 0)
    out = torch.full_like(row, NEG)
    cum = 0.0
    for i, p in zip(order, probs):
        if cum > top_p:
            break
        out[i] = row[i]
        cum += p.item()
    return out


def test_filter_is_vectorised_over_batch_and_block_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=g) * 3  # [B, block, V]
    got = filter_logits(logits, temperature=0.7, top_k=10, top_p=0.6)
    for b in range(3):
        for t in range(5):
            torch.testing.assert_close(got[b, t], _reference_filter(logits[b, t], 0.7, 10, 0.6))


def test_no_filter_returns_all_candidates():
    x = torch.randn(2, 9)
    vals, idx = candidates(x)
    assert idx is None and torch.equal(vals, x)


def test_greedy_is_argmax_and_top_k_1_agrees():
    logits = torch.randn(4, 3, 30)
    greedy = sample_logits(logits, greedy=True)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(sample_logits(logits, top_k=1, generator=torch.Generator().manual_seed(1)), greedy)


def test_draws_are_seeded_and_stay_inside_the_filtered_set():
    logits = torch.randn(64, 40)
    a = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(5))
    b = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(5))
    c = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a[:, None]).any(-1).all()


def test_draw_frequencies_follow_the_filtered_softmax():
    logits = _logp(0.5, 0.3, 0.15, 0.05).expand(20000, 4)
    ids = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(freq, expected, atol=0.015), freq


def test_cfg_combine_formula():
    cond, uncond = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    out = cfg_combine(torch.cat([cond, uncond]), 1.5)
    torch.testing.assert_close(out, 2.5 * cond - 1.5 * uncond)
    torch.testing.assert_close(cfg_combine(torch.cat([cond, uncond]), 0.0), cond)


def test_cfg_schedules():
    assert cfg_scale(3.0, 0, 4) == 3.0
    assert [cfg_scale(4.0, s, 4, "linear") for s in range(4)] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        cfg_scale(1.0, 0, 4, "cosine")


# ---- the sort-free sampler against the sort-based reference -------------------------------------------------
# The reference is the sampler this project shipped before the sort-free one: temperature, top-k by
# torch.topk (sorted), top-p on the renormalised survivors (first token over the threshold kept), a
# torch.multinomial draw over the sorted candidates.


def _ref_candidates(logits, temperature=1.0, top_k=None, top_p=None):
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)
    elif top_p is not None:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    else:
        return logits, None
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        before = probs.cumsum(dim=-1) - probs
        vals = vals.masked_fill(before > top_p, float("-inf"))
    return vals, idx


def _ref_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The reference's draw probabilities over the vocabulary [..., V] (0 outside the kept set)."""
    vals, idx = _ref_candidates(logits, temperature, top_k, top_p)
    probs = torch.softmax(vals, dim=-1)
    return probs if idx is None else torch.zeros_like(logits).scatter_(-1, idx, probs)


def _ref_sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    vals, idx = _ref_candidates(logits, temperature, top_k, top_p)
    probs = torch.softmax(vals, dim=-1).reshape(-1, vals.shape[-1])
    pick = torch.multinomial(probs, 1, generator=generator).view(vals.shape[:-1])
    return pick if idx is None else idx.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def _logits(kind, R=8, V=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, V, generator=g)
    if kind == "ties":  # few distinct values: ties everywhere, also at the k-th place and across top_p
        return torch.round(x * 2) / 2
    if kind == "peaked":
        return x * 6
    return x * 0.5  # flat, like an untrained model


FILTERS = [dict(top_k=100, top_p=0.9), dict(top_k=100), dict(top_p=0.8), dict(top_k=400, top_p=0.9),
           dict(top_k=1000, top_p=0.5), dict(top_k=100, top_p=1.0), dict(top_k=7, top_p=0.3, temperature=0.7),
           dict(), dict(temperature=2.0, top_k=50, top_p=0.95), dict(top_k=1)]


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties"])
@pytest.mark.parametrize("k", [1, 37, 100, 399])
def test_unsorted_topk_selects_the_reference_top_k_set(kind, k):
    """The sort-free sampler's top-k set (torch.topk, sorted=False) is the reference's, ties included."""
    x = _logits(kind, V=4000 if kind == "ties" else 400)
    ref = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, torch.topk(x, k, -1).indices, True)
    got = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, torch.topk(x, k, -1, sorted=False).indices, True)
    assert torch.equal(got, ref)
    if kind == "ties":
        kth = torch.topk(x, k, -1).values[:, -1:]
        assert ((x >= kth).sum(-1) > k).any()  # the case exercises ties across the k-th place


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties"])
@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.9, 0.99])
def test_nucleus_test_agrees_with_the_reference_for_every_id(kind, top_p):
    from nbp.generator.sampling import nucleus_test

    x = _logits(kind, R=4)
    k = 150
    vals, idx = torch.topk(x, k, -1, sorted=False)  # [R, k] as the sampler sees them
    kept = torch.isfinite(filter_logits(x, top_k=k, top_p=top_p))
    w = torch.softmax(vals, -1)
    z = w.double().sum(-1, keepdim=True)
    unsure_total = 0
    ids = torch.arange(k)[:, None]  # [k, 1]: every candidate
    for r in range(x.shape[0]):
        keep, unsure = nucleus_test(vals[r].expand(k, -1), w[r].expand(k, -1), z[r].expand(k, 1), ids, top_p)
        ref = kept[r, idx[r]]
        assert torch.equal(keep, ref & keep)  # a certain keep is kept by the reference
        assert not (ref & ~keep & ~unsure).any()  # a certain drop is dropped by the reference
        unsure_total += int(unsure.sum())
    if kind != "ties":
        assert unsure_total <= 2  # only ids within TOP_P_MARGIN of the threshold


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties"])
@pytest.mark.parametrize("f", FILTERS, ids=[str(f) for f in FILTERS])
def test_draws_follow_the_reference_distribution(kind, f):
    """Sort-free draws of many rows of the same logits: always in the reference's kept set, with the
    reference's probabilities (total variation below the sampling noise of 40,000 draws)."""
    V, n = 60, 40000
    x = _logits(kind, R=1, V=V, seed=3)[0] * 1.5
    f = {**f, "top_k": min(f["top_k"], 50) if "top_k" in f else None}
    p = _ref_probs(x, f.get("temperature", 1.0), f["top_k"], f.get("top_p"))
    ids = sample_logits(x.expand(n, V), generator=torch.Generator().manual_seed(0), **f)
    assert (p[ids] > 0).all()
    freq = torch.bincount(ids, minlength=V).double() / n
    tv = 0.5 * (freq - p.double()).abs().sum()
    noise = 0.5 * torch.sqrt(p.double() * (1 - p.double()) / n).sum() * math.sqrt(2 / math.pi)
    assert tv < 2.0 * noise + 1e-3, (tv, noise)


def test_draws_at_vocabulary_size_are_in_the_kept_set_and_seeded():
    """64K vocabulary, k = 16000, top_p = 0.9 (the released evaluation filter) over a block of 16 rows."""
    x = _logits("flat", R=16, V=64000, seed=5) * 0.9
    kept = torch.isfinite(filter_logits(x, top_k=16000, top_p=0.9))
    a = sample_logits(x, top_k=16000, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = sample_logits(x, top_k=16000, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert kept.gather(-1, a[:, None]).all()


def test_top_k_zero_fails_like_the_reference():
    x = torch.randn(2, 30)
    with pytest.raises(RuntimeError):
        _ref_sample(x, top_k=0)
    with pytest.raises(RuntimeError):
        sample_logits(x, top_k=0, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("f", FILTERS, ids=[str(f) for f in FILTERS])
def test_filter_logits_is_the_reference_filter(f):
    x = _logits("ties", R=5, V=200)
    vals, idx = _ref_candidates(x, f.get("temperature", 1.0), f.get("top_k"), f.get("top_p"))
    ref = vals if idx is None else torch.full_like(x, NEG).scatter_(-1, idx, vals)
    assert torch.equal(filter_logits(x, **f), ref)
