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
