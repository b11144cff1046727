"""FSQ rules of NBP.md section 4 on hand-computed examples."""

import torch

from nbp.tokenizer.fsq import FSQ


def test_basis_order_and_vocab_of_released_levels():
    fsq = FSQ([8, 8, 8, 5, 5, 5])
    assert fsq.vocab_size == 64000
    assert fsq.basis.flatten().tolist() == [1, 8, 64, 512, 2560, 12800]
    # digits (1, 2, 3, 4, 0, 1): index = 1*1 + 2*8 + 3*64 + 4*512 + 0*2560 + 1*12800 = 15057 (first channel least significant)
    digits = torch.tensor([1, 2, 3, 4, 0, 1], dtype=torch.float32)
    half = torch.tensor([4, 4, 4, 2, 2, 2], dtype=torch.float32)
    codes = ((digits - half) / half).view(1, 6, 1, 1, 1)
    idx = fsq.codes_to_indices(codes)
    assert idx.dtype == torch.int32 and idx.shape == (1, 1, 1, 1)
    assert idx.item() == 15057
    back = fsq.indices_to_codes(idx)
    assert torch.equal(back, codes)


def test_hand_computed_indices_small_levels():
    fsq = FSQ([8, 5])  # basis [1, 8]
    # (code0, code1) -> index: code0 = (d0 - 4) / 4, code1 = (d1 - 2) / 2
    cases = {(-1.0, -1.0): 0, (0.75, 1.0): 7 + 4 * 8, (0.0, 0.5): 4 + 3 * 8, (-0.75, -0.5): 1 + 1 * 8}
    codes = torch.tensor(list(cases), dtype=torch.float32).T.reshape(1, 2, 1, 1, len(cases))  # [1, 2, 1, 1, N]
    idx = fsq.codes_to_indices(codes)
    assert idx.dtype == torch.int32
    assert idx.flatten().tolist() == list(cases.values())


def test_round_trip_all_indices():
    fsq = FSQ([8, 5, 5, 5])
    idx = torch.arange(fsq.vocab_size, dtype=torch.int32).view(1, 1, 1, -1)  # [1, 1, 1, V]
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (1, 4, 1, 1, 1000)
    assert codes.min() >= -1 and codes.max() <= 1
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # quantizing a code's pre-image gives the code back: codes are exactly the representable values
    assert len({tuple(c) for c in codes[0, :, 0, 0].T.tolist()}) == 1000


def test_quantize_bounds_and_straight_through_gradient():
    fsq = FSQ([8, 5])
    z = torch.tensor([-10.0, 0.0, 10.0])
    zz = torch.stack([z, z]).view(1, 2, 1, 1, 3).requires_grad_(True)  # [1, 2, 1, 1, 3]
    q = fsq(zz)
    # L=8: half_l = 7 * 0.999 / 2, offset 0.5 -> range (-3.9965, 2.9965) -> q in {-4..3} -> code q / 4
    assert q[0, 0].flatten().tolist() == [-1.0, 0.0, 0.75]
    # L=5: half_l = 4 * 0.999 / 2 = 1.998, no offset -> q in {-2..2} -> code q / 2
    assert q[0, 1].flatten().tolist() == [-1.0, 0.0, 1.0]
    q.sum().backward()
    # straight-through: d code / dz = half_l * (1 - tanh^2(z + shift)) / (L // 2); at z=0 for L=5: 1.998 / 2
    assert abs(zz.grad[0, 1, 0, 0, 1].item() - 0.999) < 1e-6
    half_l8 = 7 * 0.999 / 2
    shift8 = torch.tan(torch.tensor(0.5 / half_l8))
    expect8 = half_l8 * (1 - torch.tanh(shift8) ** 2) / 4
    assert abs(zz.grad[0, 0, 0, 0, 1].item() - expect8.item()) < 1e-6


def test_round_half_to_even():
    # L=5 has no offset: bounded = tanh(z) * 1.998; choose z with bounded = +-0.5 and +-1.5 exactly
    fsq = FSQ([5])
    half_l = 4 * 0.999 / 2
    b = torch.tensor([0.5, 1.5, -0.5, -1.5], dtype=torch.float64)
    z = torch.atanh(b / half_l).float().view(1, 1, 1, 1, 4)
    bounded = torch.tanh(z + fsq.shift) * fsq.half_l - fsq.offset
    assert bounded.flatten().tolist() == b.tolist()  # the ties are exact in float32
    q = fsq(z).flatten() * 2
    assert q.tolist() == [0.0, 2.0, -0.0, -2.0]  # torch.round: half to even (0.5 -> 0, 1.5 -> 2)
