"""Block orders, id layouts, next-block targets and attention masks against hand-written answers."""

import itertools

import pytest
import torch

from nbp.generator.layout import (
    IGNORE,
    BlockLayout,
    TaskLayout,
    block_ids,
    block_mask_mod,
    mask_from_block_ids,
    ucf101_text_ids,
)
from nbp.generator.sampling import count_steps, step_mask

SHAPES = [(1, 1, 1), (1, 1, 8), (1, 4, 4), (2, 1, 8), (2, 2, 2)]
GRID = (4, 4, 8)


def _m(rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r.split()[0]] for r in rows.strip().splitlines()])


def test_order_hand_written():
    # grid 2x2x4 (raster index t*8 + h*4 + w), blocks 1x2x2: four 2x2 squares in raster order of blocks
    lay = BlockLayout((2, 2, 4), (1, 2, 2))
    assert lay.order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert (lay.block_size, lay.num_blocks) == (4, 4)
    # blocks 2x1x2 on the same grid: a block spans both frames
    lay = BlockLayout((2, 2, 4), (2, 1, 2))
    assert lay.order.tolist()[:8] == [0, 1, 8, 9, 2, 3, 10, 11]


def _ref_order(grid, block):
    """Block order by explicit loops: block raster order, raster order inside the block."""
    T, H, W = grid
    bt, bh, bw = block
    ref = []
    for it, ih, iw in itertools.product(range(T // bt), range(H // bh), range(W // bw)):
        for t, h, w in itertools.product(range(bt), range(bh), range(bw)):
            ref.append((it * bt + t) * H * W + (ih * bh + h) * W + (iw * bw + w))
    return ref


@pytest.mark.parametrize("block", SHAPES)
def test_blocks_are_boxes_and_round_trip(block):
    lay = BlockLayout(GRID, block)
    bt, bh, bw = block
    assert lay.tail_block is None and lay.order.tolist() == _ref_order(GRID, block)
    codes = torch.randint(0, 1000, (3, *GRID))
    seq = lay.to_blocks(codes)
    assert seq.shape == (3, lay.num_tokens)
    assert torch.equal(lay.from_blocks(seq), codes)
    assert torch.equal(seq[:, : lay.block_size].reshape(3, bt, bh, bw), codes[:, :bt, :bh, :bw])


def test_tail_frames_get_blocks_of_the_same_size():
    # grid 3x1x4 (raster t*4 + w), blocks 2x1x2: frames 0-1 in two 2x1x2 boxes, the last frame one 1x1x4 block
    lay = BlockLayout((3, 1, 4), (2, 1, 2))
    assert lay.tail_block == (1, 1, 4)
    assert lay.order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 10, 11]
    # the paper's 2x1x8 and 2x2x2 on 5 latent frames: 2 pairs of frames, then the last frame
    for block, tail in (((2, 1, 8), (1, 1, 16)), ((2, 2, 2), (1, 2, 4))):
        lay = BlockLayout((5, 16, 16), block)
        assert lay.tail_block == tail and lay.num_blocks * lay.block_size == 1280
        head = _ref_order((4, 16, 16), block)
        assert lay.order.tolist() == head + [1024 + i for i in _ref_order((1, 16, 16), tail)]
        codes = torch.randint(0, 1000, (2, 5, 16, 16))
        assert torch.equal(lay.from_blocks(lay.to_blocks(codes)), codes)
    t = TaskLayout("frame_pred", BlockLayout((5, 16, 16), (2, 1, 8)), video_vocab=64000, context_frames=2)
    assert (t.context_len, count_steps(t)) == (512, 48)  # the context is whole blocks: frames 0-1


def test_block_must_divide_grid():
    with pytest.raises(ValueError, match="does not divide"):
        BlockLayout((5, 16, 16), (1, 3, 16))
    with pytest.raises(ValueError, match="cannot be cut"):
        BlockLayout((5, 16, 16), (3, 1, 16))  # 2 tail frames, 48 tokens: no 2 x h x w box of 48 fits 16x16


def _mask(prefix_len: int, num_tokens: int, block_size: int, ntp_len: int = 0) -> torch.Tensor:
    """The one block-id rule behind every mask (dense, Flex, cached steps)."""
    return mask_from_block_ids(block_ids(prefix_len + num_tokens, prefix_len, block_size, ntp_len))


def test_nbp_mask_hand_written():
    # prefix 1, 6 tokens, blocks of 2
    assert torch.equal(_mask(1, 6, 2), _m("""
        1000000
        1110000
        1110000
        1111100
        1111100
        1111111
        1111111"""))
    # NTP (block 1) is plain causal; no prefix
    assert torch.equal(_mask(0, 4, 1), torch.ones(4, 4).tril().bool())


def test_hybrid_mask_hand_written():
    # text_len 2, block 3, 8 input positions after the text: bov, v0, v1 | v2, mid1, mid2 | v3, v4
    assert torch.equal(_mask(2, 8, 3, ntp_len=3), _m("""
        1100000000
        1100000000
        1110000000
        1111000000
        1111100000
        1111111100
        1111111100
        1111111100
        1111111111
        1111111111"""))


def _ref_mask(L, P, B, ntp):
    """The rule spelled out position by position."""
    m = torch.zeros(L, L, dtype=torch.bool)
    for i, j in itertools.product(range(L), range(L)):
        if j < P:
            m[i, j] = True  # condition visible to all
        elif i < P:
            m[i, j] = False
        elif i < P + ntp:
            m[i, j] = j <= i  # plain causal region
        elif j < P + ntp:
            m[i, j] = True
        else:
            end = P + ntp + ((i - P - ntp) // B + 1) * B  # end of i's block
            m[i, j] = j < end
    return m


@pytest.mark.parametrize("block", SHAPES)
@pytest.mark.parametrize("task", ["class", "uncond", "frame_pred", "hybrid"])
def test_task_masks_match_rule_and_flex(task, block):
    from torch.nn.attention.flex_attention import create_mask

    text = tuple(tuple(range(8)) for _ in range(3))
    t = TaskLayout(task, BlockLayout(GRID, block), video_vocab=50, num_classes=3, context_frames=block[0],
                   text_ids=text if task == "hybrid" else ())
    L, B = t.seq_len, t.block_size
    dense = t.dense_mask()
    assert torch.equal(dense, _ref_mask(L, t.cond_len, B, t.ntp_len))
    flex = create_mask(block_mask_mod(t.block_ids()), None, None, L, L, device="cpu")[0, 0]
    assert torch.equal(flex, dense)
    # cached decode rows are the same rows of the full mask
    s = t.cond_len + t.ntp_len + B
    rows, want = step_mask(t, s, B), dense[s:s + B, :s + B]
    assert (rows is None and bool(want.all())) or torch.equal(rows, want)  # None: a whole block sees everything
    if t.ntp_len > 1:  # the causal rows of the hybrid layout's first block
        a = t.cond_len
        assert torch.equal(step_mask(t, a, 2), dense[a:a + 2, :a + 2]) and not dense[a, a + 1]


def test_next_block_targets_hand_made():
    # class task, grid 1x2x4, blocks 1x1x2 (B=2), 3 classes, video vocab 10: ids 0..1 start, 2..4 class, 5.. video
    t = TaskLayout("class", BlockLayout((1, 2, 4), (1, 1, 2)), video_vocab=10, num_classes=3)
    assert (t.num_special, t.video_offset, t.vocab_size) == (2, 5, 15)
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    inp, tgt = t.train_inputs(codes, t.cond_ids(torch.tensor([2])))
    assert inp.tolist() == [[4, 0, 1, 5, 6, 7, 8, 9, 10]]
    assert tgt.tolist() == [[IGNORE, 5, 6, 7, 8, 9, 10, 11, 12]]
    # position p of block i predicts position p of block i + 1: input v_j sits where target is v_{j+B}
    for j in range(6):
        pos = inp[0].tolist().index(j + 5)
        assert tgt[0, pos] == j + 2 + 5


def test_frame_pred_layout_is_released_k600():
    t = TaskLayout("frame_pred", BlockLayout((5, 16, 16), (1, 1, 16)), video_vocab=64000, context_frames=2)
    assert (t.vocab_size, t.seq_len, t.context_len, count_steps(t)) == (64000, 1264, 512, 48)
    seq = torch.arange(1280)[None]
    inp, tgt = t.train_inputs(seq)
    assert torch.equal(inp, seq[:, :-16]) and torch.equal(tgt, seq[:, 16:])
    assert torch.equal(t.dense_mask(), _mask(0, 1264, 16))


def test_hybrid_layout_is_released_ucf():
    names = ["ApplyEyeMakeup", "Archery"]
    table = ucf101_text_ids()
    assert len(table) == 101 and table["ApplyEyeMakeup"] == [2, 2, 2, 1, 3394, 10977, 1207, 786]
    t = TaskLayout("hybrid", BlockLayout((5, 16, 16), (1, 1, 16)), video_vocab=64000, num_classes=2,
                   text_ids=tuple(tuple(table[n]) for n in names))
    assert (t.vocab_size, t.seq_len, count_steps(t), t.cond_len) == (96016, 1288, 95, 8)
    codes = torch.arange(1280)[None] % 64000
    inp, tgt = t.train_inputs(codes, t.cond_ids(torch.tensor([1])))
    v = codes[0] + 32016
    assert inp[0, :8].tolist() == [i + 16 for i in table["Archery"]]
    assert inp[0, 8] == 0 and torch.equal(inp[0, 9:25], v[:16])
    assert inp[0, 25:40].tolist() == list(range(1, 16))
    assert torch.equal(inp[0, 40:], v[16:-16])
    assert (tgt[0, :8] == IGNORE).all() and torch.equal(tgt[0, 8:], v)
    assert torch.equal(t.dense_mask(), _mask(8, 1280, 16, ntp_len=16))
    assert t.prompt(t.cond_ids(torch.tensor([0]))).tolist() == [[i + 16 for i in table["ApplyEyeMakeup"]] + [0]]


def test_task_describe_round_trip():
    t = TaskLayout("class", BlockLayout((5, 8, 8), (1, 1, 8)), video_vocab=1000, num_classes=8)
    assert TaskLayout.from_dict(t.describe()) == t


def test_target_coords_hand_made():
    # class task, grid 2x2x2 (raster t*4 + h*2 + w), blocks 1x1x2: position 0 is the class (no target),
    # position 1 + j predicts token j of the block order (here raster order)
    t = TaskLayout("class", BlockLayout((2, 2, 2), (1, 1, 2)), video_vocab=10, num_classes=3)
    ref = [[-1, -1, -1]] + [[r // 4, r // 2 % 2, r % 2] for r in range(8)]
    assert t.target_coords().tolist() == ref
    # blocks 1x2x1 (columns): token j of the block order is raster cell order[j]
    t = TaskLayout("class", BlockLayout((2, 2, 2), (1, 2, 1)), video_vocab=10, num_classes=3)
    assert t.target_coords()[1:].tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1],
                                               [1, 0, 0], [1, 1, 0], [1, 0, 1], [1, 1, 1]]
    # frame prediction: position p holds token p and predicts token p + B
    t = TaskLayout("frame_pred", BlockLayout((3, 1, 2), (1, 1, 2)), video_vocab=10, context_frames=1)
    assert t.target_coords().tolist() == [[1, 0, 0], [1, 0, 1], [2, 0, 0], [2, 0, 1]]
    # hybrid (bov, first block token by token, middle-bos, blocks): the 8 text positions predict nothing,
    # then position 8 + j predicts token j
    t = TaskLayout("hybrid", BlockLayout((2, 1, 2), (1, 1, 2)), video_vocab=10, num_classes=1,
                   text_ids=((1,) * 8,))
    c = t.target_coords()
    assert len(c) == t.seq_len and (c[:8] == -1).all()
    assert c[8:].tolist() == [[0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 1]]
