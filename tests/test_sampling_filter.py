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


def test_draws_are_seeded_and_stay_inside_the_filtered_set(passes):
    logits = torch.randn(64, 40)
    a = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(5))
    b = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(5))
    c = sample_logits(logits, top_k=3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == a[:, None]).any(-1).all()


def test_draw_frequencies_follow_the_filtered_softmax(passes):
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
def test_nucleus_decision_agrees_with_the_reference_for_every_id(kind, top_p):
    """For every id of the top k: its standing (larger ids, ties, mass above; one pass over the row) and the
    nucleus decision with the exact top-k mass agree with the reference filter; only ties across the threshold
    and masses within TOP_P_MARGIN of it are left open."""
    from nbp.generator.sampling import nucleus_decision, standing

    x = _logits(kind, R=4)
    k = 150
    kept = torch.isfinite(filter_logits(x, top_k=k, top_p=top_p))
    w = torch.softmax(x, -1)
    unsure_total = 0
    for r in range(x.shape[0]):
        idx = torch.topk(x[r], k).indices  # [k] the reference's top-k set
        z = w[r, idx].double().sum()
        gt, tied, above = (a[:, 0] for a in standing(x[r].expand(k, -1), w[r].expand(k, -1), idx[:, None]))
        # the standing, counted by hand
        assert torch.equal(gt.long(), (x[r][None] > x[r, idx][:, None]).sum(-1))
        assert torch.equal(tied.long(), (x[r][None] == x[r, idx][:, None]).sum(-1))
        ref_above = (w[r][None] * (x[r][None] > x[r, idx][:, None])).double().sum(-1)
        assert torch.allclose(above.double(), ref_above, rtol=1e-5, atol=1e-9)
        keep, unsure = nucleus_decision(above, tied, w[r, idx], z.expand(k), z.expand(k), top_p)
        ref = kept[r, idx]
        assert not (keep & ~ref).any()  # a certain keep is kept by the reference
        assert not (ref & ~keep & ~unsure).any()  # a certain drop is dropped by the reference
        unsure_total += int(unsure.sum())
        # looser bounds on the top-k mass only move decisions into `unsure`, never flip them
        keep2, unsure2 = nucleus_decision(above, tied, w[r, idx], z.expand(k) * 0.99, z.expand(k) * 1.01, top_p)
        assert not (keep2 & ~keep).any() and not (~keep2 & ~unsure2 & keep).any()
    if kind != "ties":
        assert unsure_total <= 2  # only ids within TOP_P_MARGIN of the threshold


def _group_deviations(p, ids, groups):
    """Ids sorted by reference probability p [V] (float64) fall into ``groups`` groups of about equal mass ->
    (each group's reference mass q [groups], the deviation of the draws' share from it, in standard errors, for
    the groups of positive mass)."""
    n = ids.numel()
    order = torch.sort(p, descending=True, stable=True).indices
    group = torch.empty(p.numel(), dtype=torch.long)
    group[order] = ((p[order].cumsum(0) - p[order]) * groups).long().clamp(max=groups - 1)
    freq = torch.zeros(groups, dtype=torch.float64).index_add_(0, group[ids], torch.ones(n, dtype=torch.float64)) / n
    q = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, p)
    return q, (freq - q)[q > 0] / torch.sqrt(q * (1 - q) / n)[q > 0]


def _bracket_cases():
    g = torch.Generator().manual_seed(11)
    n, V = 6, 20000
    base = torch.randn(n, V, generator=g)
    return {
        "flat": base * 0.45,  # an untrained model's logits
        "peaked": base * 6,
        "sorted": torch.sort(base, -1).values,  # a strided sample sees an ordered row
        "heavy tail": torch.distributions.StudentT(1.5).sample((n, V)),
        "two clusters": torch.cat([base[:, : V // 2] - 8, base[:, V // 2:] * 0.01 + 3], 1),
        "ties": torch.round(base * 4) / 4,
        "bf16 logits": (base * 2).bfloat16().float(),
    }


@pytest.mark.parametrize("case", list(_bracket_cases()))
@pytest.mark.parametrize("k", [1, 37, 5000, 15000, 19999])
def test_top_k_bracket_holds_the_k_th_logit_and_bounds_the_top_k_mass(case, k, passes):
    """The bracket holds the k-th largest logit with the counts and masses it claims, its mass bounds hold the
    reference's top-k mass, and narrowing it to exactness gives the top-k set itself (unless tied)."""
    from nbp.generator.sampling import BAND_MASS, narrow, top_k_bracket

    x = _bracket_cases()[case]
    w = torch.softmax(x, -1)
    w2 = torch.stack([torch.ones_like(w), w], 1)  # [n, 2, V] as sampling.weights lays it out
    m, wmax = x.amax(-1, keepdim=True), w.amax(-1, keepdim=True)
    top = torch.topk(x, k, -1)
    z = w.gather(-1, top.indices).double().sum(-1, keepdim=True)  # the reference's top-k mass
    tied_at_k = ((x == top.values[:, -1:]).sum(-1, keepdim=True) > 1) & ((x >= top.values[:, -1:]).sum(-1, keepdim=True) > k)

    def check(br):
        assert (br.lo <= br.hi).all()
        assert torch.equal(br.c_lo, (x > br.lo).sum(-1, keepdim=True).float())
        assert torch.equal(br.c_hi, (x > br.hi).sum(-1, keepdim=True).float())
        assert torch.allclose(br.z_lo.double(), (w * (x > br.lo)).double().sum(-1, keepdim=True), rtol=1e-5)
        assert torch.allclose(br.z_hi.double(), (w * (x > br.hi)).double().sum(-1, keepdim=True), rtol=1e-5, atol=1e-9)
        assert (br.c_lo >= k).all() and (br.c_hi <= k).all()
        zl, zh = br.mass_bounds(k, m, wmax)
        assert (zl.double() <= z * (1 + 1e-5)).all() and (z <= zh.double() * (1 + 1e-5)).all()
        return zl, zh

    br, zl0, zh0, ok = top_k_bracket(x, w2, m, wmax, k, torch.empty(2 * x.numel()))
    assert ok.all()
    zl, _ = check(br)
    assert torch.equal(zl, zl0) and torch.equal(br.mass_bounds(k, m, wmax)[1], zh0)
    assert (((br.z_lo - zl) <= BAND_MASS * br.z_lo * 1.0001) | tied_at_k).all()
    exact = narrow(x, w, m, k, br, torch.empty_like(x), exact=True)
    zl, zh = check(exact)
    known = exact.c_lo == k
    assert torch.equal(known, ~tied_at_k)  # exact unless a tie straddles the k-th place
    assert torch.allclose(zl[known].double(), z[known], rtol=1e-5) and torch.equal(zl[known], zh[known])


def test_inverse_cdf_follows_the_weights_and_never_draws_a_zero_weight():
    from nbp.generator.sampling import CHUNK, _inverse_cdf

    V = 3 * CHUNK + 17  # a padded last chunk
    w = torch.zeros(1, 4 * CHUNK)
    p = torch.rand(V, generator=torch.Generator().manual_seed(2)) ** 4
    p[::3] = 0  # zero weights between positive ones, across chunk edges
    p[CHUNK:2 * CHUNK] = 0  # a whole empty chunk
    w[0, :V] = p
    rows = 70000
    ws = w.expand(rows, -1).reshape(rows, 4, CHUNK)
    ids = _inverse_cdf(ws, ws.sum(-1).double().cumsum(-1), None, 3, torch.Generator().manual_seed(0))  # [rows, 3]
    assert ids.shape == (rows, 3)
    ids = ids.flatten()
    n = ids.numel()
    assert (p[ids] > 0).all()
    q = p.double() / p.double().sum()
    freq = torch.bincount(ids, minlength=V).double() / n
    tv = 0.5 * (freq - q).abs().sum()
    noise = 0.5 * torch.sqrt(q * (1 - q) / n).sum() * math.sqrt(2 / math.pi)
    assert tv < 2.0 * noise + 1e-3, (tv, noise)


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties"])
@pytest.mark.parametrize("f", [dict(top_k=500, top_p=0.9), dict(top_k=500), dict(top_p=0.7), dict(top_k=1999, top_p=0.5)],
                         ids=str)
def test_draws_with_an_approximate_bracket_follow_the_reference_distribution(kind, f, monkeypatch, passes):
    """A vocabulary of 2,000 (the top-k bracket comes from a strided sample and counting passes): draws stay in
    the reference's kept set, with its probabilities summed over groups of ids of about equal mass."""
    from nbp.generator import sampling

    monkeypatch.setattr(sampling, "SAMPLE", 256)  # a strided sample of every 7th logit
    V, n = 2000, 16000
    x = _logits(kind, R=1, V=V, seed=4)[0] * {"flat": 1.0, "peaked": 0.4, "ties": 1.5}[kind]  # peaked: sigma 2.4
    p = _ref_probs(x, 1.0, f.get("top_k"), f.get("top_p")).double()
    ids = sample_logits(x.expand(n, V), generator=torch.Generator().manual_seed(0), **f)
    assert (p[ids] > 0).all()
    q, z = _group_deviations(p, ids, 20)
    assert (q > 0.01).sum() >= 3 and z.abs().max() < 4.5, z  # a chance |z| of 4.5 in 20 groups: odds below 1e-3


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties"])
@pytest.mark.parametrize("f", FILTERS, ids=[str(f) for f in FILTERS])
def test_draws_follow_the_reference_distribution(kind, f, passes):
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


def test_draws_at_vocabulary_size_are_in_the_kept_set_and_seeded(passes):
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


@pytest.mark.parametrize("case", ["masked ids", "k-th place masked", "nan", "+inf"])
def test_draws_on_non_finite_logits_stay_exact(case, passes):
    """-inf logits (masked ids) are never drawn and the kept set is the reference's, also when the k-th place is
    -inf; NaN or +inf logits go to the reference draw, which refuses them."""
    V, n = 600, 4000
    x = _logits("flat", R=1, V=V, seed=8)[0] * 2
    f = dict(top_k=300, top_p=0.9)
    if case == "masked ids":
        x[::3] = NEG  # 200 masked: the 300th largest is finite
    elif case == "k-th place masked":
        x[::2] = NEG  # 300 masked: the 300th largest is finite, the 301st is -inf; k = 400 reaches into -inf
        f = dict(top_k=400, top_p=1.0)
    elif case == "nan":
        x[5] = float("nan")
    else:
        x[5] = float("inf")
    rows = x.expand(n, V)
    if case in ("nan", "+inf"):  # the reference's multinomial refuses them, and so do we
        with pytest.raises(RuntimeError, match="inf"):
            _ref_sample(rows[:40], generator=torch.Generator().manual_seed(0), **f)
        with pytest.raises(RuntimeError, match="inf"):
            sample_logits(rows[:40], generator=torch.Generator().manual_seed(0), **f)
        return
    p = _ref_probs(x, 1.0, **f).double()
    ids = sample_logits(rows, generator=torch.Generator().manual_seed(0), **f)
    assert (p[ids] > 0).all() and torch.isfinite(x[ids]).all()
    _, z = _group_deviations(p, ids, 10)
    assert z.abs().max() < 4.5, z


def test_strided_sample_sees_a_bit_structured_vocabulary_without_bias():
    """An LFQ-like vocabulary: an id's logit is a weighted sum of its 16 bits. The odd stride of strided_sample
    puts the row's upper quartile at its binomial share of the sample; runs of 64 neighbours (which share their
    10 high bits) miss it by tens of standard deviations."""
    from nbp.generator.sampling import sample_step, strided_sample

    V = 1 << 16
    assert sample_step(V) % 2 == 1 and sample_step(2000) == 1 and sample_step(20000) % 2 == 1
    bits = ((torch.arange(V)[:, None] >> torch.arange(16)) & 1).float() * 2 - 1  # [V, 16]
    z_stride, z_runs = [], []
    for seed in range(10):
        a = torch.randn(16, generator=torch.Generator().manual_seed(seed))
        x = (bits @ a)[None] + 0.1 * torch.randn(1, V, generator=torch.Generator().manual_seed(100 + seed))
        q75 = x.quantile(0.75)
        for sample, zs in ((strided_sample(x), z_stride), (x.view(1, V // 64, 64)[:, ::32].reshape(1, -1), z_runs)):
            share = (sample > q75).double().mean()
            zs.append(float((share - 0.25) / math.sqrt(0.25 * 0.75 / sample.shape[1])))
    assert max(abs(z) for z in z_stride) < 4, z_stride
    assert max(abs(z) for z in z_runs) > 10, z_runs


def test_counts_masses_are_exact_counts_and_masses_at_every_threshold(passes):
    from nbp.generator.sampling import counts_masses, weights

    x = _bracket_cases()["bf16 logits"][:4]  # ties everywhere
    m = x.amax(-1, keepdim=True)
    w2 = weights(x, m)
    t = torch.stack([x[:, 7], x[:, 11], m[:, 0], torch.full_like(m[:, 0], -math.inf)], 1)  # [n, 4]: ties, max, -inf
    c, z = counts_masses(x, w2, t, torch.empty(x.numel() * 4))
    above = x[:, None] > t[..., None]  # [n, 4, V]
    assert torch.equal(c, above.sum(-1).float())
    ref = (above * torch.exp(x.double() - m.double())[:, None]).sum(-1)
    assert torch.allclose(z.double(), ref, rtol=2e-6), (z, ref)
    assert torch.equal(w2[:, 0], torch.ones_like(x))



@pytest.mark.parametrize("kind", ["ties", "flat", "peaked"])
def test_masses_over_a_full_vocabulary_stay_well_within_the_nucleus_margin(kind, passes):
    """Over 64,000 ids, the masses above quartile thresholds are their weights' float64 sums within 1e-6 relative,
    a tenth of TOP_P_MARGIN (a decision closer than the margin goes to the reference filter, so the masses must be
    more accurate than that). Few distinct logits make float rounding errors add up instead of cancelling: a
    batched matmul for the masses was 1.7e-5 off here on one CPU."""
    from nbp.generator.sampling import TOP_P_MARGIN, counts_masses, weights

    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 64000, generator=g)
    x = {"ties": torch.round(base * 4) / 4, "flat": base * 0.45, "peaked": base * 6}[kind]
    m = x.amax(-1, keepdim=True)
    w2 = weights(x, m)
    t = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75, 0.99]), dim=-1).T.contiguous()  # [n, 4]
    c, z = counts_masses(x, w2, t, torch.empty(x.numel() * 4))
    above = x[:, None] > t[..., None]  # [n, 4, V]
    ref = (above * w2[:, 1, None].double()).sum(-1)  # the same weights, summed in float64
    assert torch.equal(c, above.sum(-1).float())
    err = float(((z.double() - ref).abs() / ref).max())
    assert err < TOP_P_MARGIN / 10, err

CUT_FILTERS = [dict(top_k=16000, top_p=0.9), dict(top_k=5000, top_p=0.5), dict(top_k=19999, top_p=0.99),
               dict(top_k=37, top_p=0.9), dict(top_k=5000), dict(top_p=0.8), dict(top_p=0.2)]


@pytest.mark.parametrize("case", list(_bracket_cases()))
@pytest.mark.parametrize("f", CUT_FILTERS, ids=str)
def test_filter_cuts_never_contradict_the_reference_filter(case, f, passes):
    """Every id above the keep cut is in the reference's kept set and none at or below the drop cut is, for every
    id of every row; and on an untrained model's flat logits with the evaluation filter the cuts leave at most a
    tenth of the kept weight undecided (those draws take a pass of their own)."""
    from nbp.generator.sampling import filter_cuts, weights

    x = _bracket_cases()[case]
    k, p = f.get("top_k"), f.get("top_p")
    m = x.amax(-1, keepdim=True)
    w2 = weights(x, m)
    cut = filter_cuts(x, w2, m, k, p, torch.empty(2 * x.numel()))
    kept = torch.isfinite(filter_logits(x, top_k=k, top_p=p))
    assert not (~kept & (x > cut.keep)).any()
    assert not (kept & (x <= cut.drop)).any()
    assert torch.allclose(cut.total.double(), w2[:, 1].double().sum(-1, keepdim=True), rtol=1e-5)
    assert torch.allclose(cut.z_drop.double(), (w2[:, 1] * (x > cut.drop)).double().sum(-1, keepdim=True), rtol=1e-5)
    if case == "flat" and k == 16000 and p == 0.9:
        w = w2[:, 1].double()
        open_ = (w * kept * ~(x > cut.keep)).sum(-1) / (w * kept).sum(-1)  # kept weight between the cuts
        assert (open_ < 0.1).all(), open_


@pytest.mark.parametrize("f", [dict(top_k=700, top_p=0.9), dict(top_p=0.6)], ids=str)
def test_draws_proposed_from_all_weights_follow_the_reference_distribution(f, passes):
    """A vocabulary of 1,024 (whole chunks) whose filter keeps a large share of the weight: the draw proposes from
    all weights, the drop cut rejects without a pass; the draws keep the reference's probabilities, summed over
    about 20 groups of ids of equal mass."""
    from nbp.generator import sampling

    V, n = 1024, 16000
    x = _logits("flat", R=1, V=V, seed=9)[0]
    m = x.amax()[None, None]
    cut = sampling.filter_cuts(x[None], sampling.weights(x[None], m), m, f.get("top_k"), f.get("top_p"),
                               torch.empty(2 * V))
    assert bool(cut.z_drop >= sampling.FULL_PROPOSAL * cut.total)  # the case exercises the unfiltered proposal
    p = _ref_probs(x, 1.0, f.get("top_k"), f.get("top_p")).double()
    ids = sample_logits(x.expand(n, V), generator=torch.Generator().manual_seed(0), **f)
    assert (p[ids] > 0).all()
    q, z = _group_deviations(p, ids, 20)
    assert (q > 0.01).sum() >= 10 and z.abs().max() < 4.5, z
