"""Token layouts: block orders over the latent grid, per-task id layouts, attention masks.

Two layers:

- :class:`BlockLayout` cuts the latent grid (T, H, W) into blocks (bt, bh, bw) that divide it and
  reorders the tokens so that each block is contiguous: blocks in raster order (t, h, w), raster order
  inside a block. Block 1x1x1 is NTP; 1x1xW one latent row (the paper's 1x1x16); 1xHxW one frame.
- :class:`TaskLayout` turns block-ordered codes and a condition into model ids, next-block targets and
  the attention mask for one task (``class``, ``uncond``, ``frame_pred``, ``hybrid``). Its docstring
  lists the id layout of every task; the sampler follows it.

The attention rule of every task is one integer per position, its *block id* ``bid``: the condition
prefix has ``bid = -1``; after it come ``ntp_len`` positions that are each their own block (causal; the
hybrid task's first block); then blocks of ``block_size`` positions. Position ``i`` may attend to
position ``j`` iff ``bid[j] <= bid[i]``: the prefix is visible to all (and bidirectional within
itself), attention is bidirectional inside a block and causal across blocks. The dense boolean mask
(SDPA) and the FlexAttention ``mask_mod`` are both built from ``bid``, so they cannot disagree.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

IGNORE = -100  # target id that the loss skips (cross_entropy's ignore_index)
TASKS = ("class", "uncond", "frame_pred", "hybrid")

# released UCF hybrid model: LLaMA-2 text ids of the class names, left-padded to 8 with id 2
TEXT_IDS_FILE = Path(__file__).resolve().parent / "ucf101_llama_text_ids.tsv"
TEXT_VOCAB = 32000  # LLaMA-2 vocabulary
TEXT_LEN = 8


# --------------------------------------------------------------------------------------
# block order


def _box_order(grid: tuple[int, int, int], block: tuple[int, int, int]) -> torch.Tensor:
    """Raster indices of ``grid`` in block order for blocks that divide it."""
    (T, H, W), (bt, bh, bw) = grid, block
    idx = torch.arange(T * H * W).view(T // bt, bt, H // bh, bh, W // bw, bw)  # [nt, bt, nh, bh, nw, bw]
    return idx.permute(0, 2, 4, 1, 3, 5).reshape(-1)  # [N] block raster, then raster inside a block


@dataclass(frozen=True)
class BlockLayout:
    """A latent grid ``(T, H, W)`` cut into blocks ``(bt, bh, bw)``.

    ``order[k]`` is the raster index (t*H*W + h*W + w) of the token at block-order position ``k``;
    ``inverse`` undoes it. ``to_blocks``/``from_blocks`` convert codes between the grid and the
    block order.

    ``bh``, ``bw`` must divide ``H``, ``W``. When ``bt`` does not divide ``T`` (2x1x8 or 2x2x2 on the
    5 latent frames of a 17-frame clip), the last ``r = T % bt`` frames are cut into ``tail_block``s of
    depth r and the same size (2x1x8 -> 1x1x16 or 1x2x8; 2x2x2 -> 1x2x4): the block size stays constant
    and the leading frames, e.g. a frame-prediction context of 2 latent frames, keep whole blocks.
    """

    grid: tuple[int, int, int]
    block: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        object.__setattr__(self, "block", tuple(int(b) for b in self.block))
        if len(self.grid) != 3 or len(self.block) != 3:
            raise ValueError(f"grid {self.grid} and block {self.block} must have 3 entries (t, h, w)")
        (T, H, W), (bt, bh, bw) = self.grid, self.block
        if min(self.block) <= 0 or bt > T or H % bh or W % bw:
            raise ValueError(f"block {list(self.block)} does not divide the latent grid {list(self.grid)}")
        _ = self.tail_block  # raises when the trailing frames cannot be cut into blocks of the same size

    @property
    def tail_block(self) -> tuple[int, int, int] | None:
        """Block shape of the last ``T % bt`` frames (None when ``bt`` divides ``T``)."""
        (T, H, W), (bt, bh, bw) = self.grid, self.block
        r = T % bt
        if r == 0:
            return None
        area = self.block_size // r if self.block_size % r == 0 else 0
        for th, tw in ((bh, area // bh if area % bh == 0 else 0), (area // bw if area % bw == 0 else 0, bw)):
            if th and tw and H % th == 0 and W % tw == 0:
                return (r, th, tw)
        raise ValueError(f"block {list(self.block)} does not divide the latent grid {list(self.grid)}, and its last "
                         f"{r} frame(s) cannot be cut into blocks of {self.block_size} tokens")

    @property
    def num_tokens(self) -> int:
        T, H, W = self.grid
        return T * H * W

    @property
    def block_size(self) -> int:
        bt, bh, bw = self.block
        return bt * bh * bw

    @property
    def num_blocks(self) -> int:
        return self.num_tokens // self.block_size

    @cached_property
    def order(self) -> torch.Tensor:
        (T, H, W), bt = self.grid, self.block[0]
        r = T % bt
        head = _box_order((T - r, H, W), self.block)
        if not r:
            return head
        tail = _box_order((r, H, W), self.tail_block) + (T - r) * H * W
        return torch.cat([head, tail])

    @cached_property
    def inverse(self) -> torch.Tensor:
        inv = torch.empty_like(self.order)
        inv[self.order] = torch.arange(self.num_tokens)
        return inv

    def to_blocks(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, H, W] -> [B, N] in block order."""
        B = codes.shape[0]
        flat = codes.reshape(B, self.num_tokens)  # [B, N] raster
        return flat[:, self.order.to(codes.device)]

    def from_blocks(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, N] in block order -> codes [B, T, H, W]."""
        B = seq.shape[0]
        flat = seq[:, self.inverse.to(seq.device)]  # [B, N] raster
        return flat.reshape(B, *self.grid)  # [B, T, H, W]


# --------------------------------------------------------------------------------------
# masks


def block_ids(length: int, prefix_len: int, block_size: int, ntp_len: int = 0) -> torch.Tensor:
    """Block id of each of ``length`` positions: -1 on the prefix, one id per position for the next
    ``ntp_len`` positions, then one id per ``block_size`` positions (aligned at ``prefix_len + ntp_len``)."""
    pos = torch.arange(length)
    rel = pos - prefix_len
    bid = torch.where(rel < ntp_len, rel, ntp_len + torch.div(rel - ntp_len, block_size, rounding_mode="floor"))
    return torch.where(rel < 0, torch.full_like(pos, -1), bid)


def mask_from_block_ids(bid: torch.Tensor) -> torch.Tensor:
    """Dense bool mask [L, L]: ``mask[i, j] = bid[j] <= bid[i]`` (True = may attend)."""
    return bid[None, :] <= bid[:, None]


def block_mask_mod(bid: torch.Tensor, q_offset: int = 0):
    """FlexAttention ``mask_mod`` for the same rule; query index q is absolute position q + q_offset."""

    def mask_mod(b, h, q_idx, kv_idx):
        return bid[kv_idx] <= bid[q_idx + q_offset]

    return mask_mod


def flex_block_mask(bid: torch.Tensor, q_len: int | None = None, kv_len: int | None = None, q_offset: int = 0, device=None):
    """A FlexAttention BlockMask for queries [q_offset, q_offset + q_len) over keys [0, kv_len)."""
    from torch.nn.attention.flex_attention import create_block_mask

    L = bid.numel()
    q_len = L - q_offset if q_len is None else q_len
    kv_len = L if kv_len is None else kv_len
    device = device or "cpu"  # create_block_mask's own default is "cuda"
    bid = bid.to(device)
    return create_block_mask(block_mask_mod(bid, q_offset), None, None, q_len, kv_len, device=device)


# --------------------------------------------------------------------------------------
# task layouts


def ucf101_text_ids() -> dict[str, list[int]]:
    """Class name (``ApplyEyeMakeup``) -> the 8 LLaMA-2 ids the released UCF model saw."""
    out = {}
    with open(TEXT_IDS_FILE, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            out[row["class"]] = [int(t) for t in row["llama_ids"].split()]
    return out


@dataclass(frozen=True)
class TaskLayout:
    """Ids, next-block targets and mask of one task. ``V`` = video vocabulary (codes 0..V-1),
    ``B`` = block size, ``N`` = video tokens (block order), ``K`` = classes.

    - ``class``: ids ``0..B-1`` = start block placeholders, ``B + label`` = class token,
      ``B + K + code`` = video. Input (training) = ``[class][start 0..B-1][v_0 .. v_{N-B-1}]`` (1 + N).
      Mask: prefix = the class token (cond_len 1), then blocks of B. Prompt = ``[class][start]``.
    - ``uncond``: like ``class`` without the class token: ``0..B-1`` start, ``B + code`` video;
      input ``[start][v_0 .. v_{N-B-1}]`` (N). Prompt = ``[start]``.
    - ``frame_pred`` (the released K600 layout): id = code; input = ``v[:-B]``, target = ``v[B:]``
      (N - B positions; the context blocks are also trained, as in the release). Mask: blocks of B
      from position 0 (no prefix). Prompt = the context, ``context_frames`` latent frames in block
      order (``context_len`` tokens); generation emits the remaining ``N - context_len`` tokens.
    - ``hybrid`` (the released UCF layout, NBP.md section 2): ``0`` = bov, ``1..B-1`` = middle bos,
      ``B + llama_id`` = text (32,000 ids), ``B + 32000 + code`` = video.
      Full sequence = ``[8 text][bov][v_0..v_{B-1}][1..B-1][v_B..v_{N-1}]``; input drops the last B
      (8 + N). Mask: text prefix, plain causal over positions 8..8+B-1, then blocks aligned at 8 + B.
      Prompt = ``[text][bov]``; the first B tokens come one per step, then ``middle_ids`` are appended
      after v_{B-1} and every step emits B tokens (B + (N - B)/B steps).

    In every task the model input position ``cond_len + k`` predicts ``target_ids[k]`` (video tokens in
    block order, from ``v_0`` or, for frame_pred, ``v_B``); condition positions have no target.
    """

    task: str
    layout: BlockLayout
    video_vocab: int
    num_classes: int = 0
    context_frames: int = 0  # frame_pred only
    text_ids: tuple[tuple[int, ...], ...] = field(default=(), repr=False)  # hybrid: LLaMA ids per class

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {TASKS}")
        if self.task == "frame_pred":
            bt = self.layout.block[0]
            if not 0 < self.context_frames < self.layout.grid[0] or self.context_frames % bt:
                raise ValueError(f"context_frames {self.context_frames} must be a multiple of the block's {bt} frames "
                                 f"and less than {self.layout.grid[0]}")
        if self.task == "hybrid" and self.text_ids and any(len(t) != TEXT_LEN for t in self.text_ids):
            raise ValueError(f"hybrid text ids must have {TEXT_LEN} entries per class")

    # ---- id layout ----------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def cond_len(self) -> int:
        """Condition positions at the start of the input (their embeddings are replaced for CFG)."""
        return {"class": 1, "uncond": 0, "frame_pred": 0, "hybrid": TEXT_LEN}[self.task]

    @property
    def num_special(self) -> int:
        return 0 if self.task == "frame_pred" else self.block_size

    @property
    def cond_vocab(self) -> int:
        return {"class": self.num_classes, "uncond": 0, "frame_pred": 0, "hybrid": TEXT_VOCAB}[self.task]

    @property
    def video_offset(self) -> int:
        return self.num_special + self.cond_vocab

    @property
    def vocab_size(self) -> int:
        return self.video_offset + self.video_vocab

    @property
    def context_len(self) -> int:
        """Video tokens given to the generator (frame_pred: the context frames), in block order."""
        T, H, W = self.layout.grid
        return self.context_frames * H * W if self.task == "frame_pred" else 0

    @property
    def seq_len(self) -> int:
        """Training input length."""
        return self.cond_len + self.num_tokens - (self.block_size if self.task == "frame_pred" else 0)

    @property
    def ntp_len(self) -> int:
        return self.block_size if self.task == "hybrid" else 0

    @property
    def start_ids(self) -> torch.Tensor:
        """class/uncond: the start block ids; hybrid: the bov id alone."""
        if self.task == "hybrid":
            return torch.zeros(1, dtype=torch.long)
        return torch.arange(self.num_special)

    @property
    def middle_ids(self) -> torch.Tensor:
        """hybrid: the middle-bos ids 1..B-1 fed after the first block."""
        return torch.arange(1, self.block_size)

    # ---- ids ----------------------------------------------------------------------------
    def video_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.long() + self.video_offset

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - self.video_offset

    def cond_ids(self, labels: torch.Tensor) -> torch.Tensor | None:
        """labels [B] -> condition ids [B, cond_len] (None when the task has no condition)."""
        labels = labels.long()
        if self.task == "class":
            return (labels + self.num_special)[:, None]  # [B, 1]
        if self.task == "hybrid":
            if not self.text_ids:
                raise ValueError("hybrid task without text ids")
            table = torch.tensor(self.text_ids, dtype=torch.long, device=labels.device)  # [K, 8]
            return table[labels] + self.num_special  # [B, 8]
        return None

    def prompt(self, cond: torch.Tensor | None = None, context: torch.Tensor | None = None, batch: int | None = None):
        """Ids [B, P] to prefill before the first generation step.

        ``cond``: [B, cond_len] condition ids (class/hybrid); ``context``: [B, context_len] codes in block
        order (frame_pred). ``batch`` for uncond.
        """
        if self.task == "frame_pred":
            return self.video_ids(context)
        if self.task == "uncond":
            return self.start_ids[None].expand(batch, -1).clone()
        start = self.start_ids.to(cond.device)[None].expand(cond.shape[0], -1)  # [B, nstart]
        return torch.cat([cond, start], dim=1)

    # ---- training -----------------------------------------------------------------------
    def train_inputs(self, seq: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-ordered codes [B, N] (+ condition ids) -> (input ids [B, L], targets [B, L]).

        targets hold video ids (``IGNORE`` on condition positions): the token at position p of
        block i predicts the token at position p of block i + 1.
        """
        Bsz, B = seq.shape[0], self.block_size
        vid = self.video_ids(seq)  # [Bsz, N]
        if self.task == "frame_pred":
            return vid[:, :-B], vid[:, B:]
        parts = [] if cond is None else [cond]
        if self.task == "hybrid":
            bov = self.start_ids.to(seq.device)[None].expand(Bsz, -1)  # [Bsz, 1]
            mid = self.middle_ids.to(seq.device)[None].expand(Bsz, -1)  # [Bsz, B-1]
            parts += [bov, vid[:, :B], mid, vid[:, B:-B]]
        else:
            start = self.start_ids.to(seq.device)[None].expand(Bsz, -1)  # [Bsz, B]
            parts += [start, vid[:, :-B]]
        inp = torch.cat(parts, dim=1)  # [Bsz, cond_len + N]
        ignore = torch.full((Bsz, self.cond_len), IGNORE, dtype=torch.long, device=seq.device)
        return inp, torch.cat([ignore, vid], dim=1)

    def target_coords(self) -> torch.Tensor:
        """(t, h, w) latent coordinates [seq_len, 3] of the token each training position predicts; -1 rows
        where a position predicts nothing (the condition). Read off :meth:`train_inputs` itself (token k of the
        block order as code k), so it follows every task's id layout."""
        N = self.num_tokens
        cond = torch.zeros(1, self.cond_len, dtype=torch.long) if self.cond_len else None
        _, targets = self.train_inputs(torch.arange(N)[None], cond)  # [1, seq_len]
        k = self.codes(targets[0])  # [seq_len] block-order index of the target token (negative: none)
        valid = targets[0] != IGNORE
        raster = self.layout.order[k.clamp(min=0)]  # [seq_len]
        T, H, W = self.layout.grid
        coords = torch.stack([raster // (H * W), raster // W % H, raster % W], dim=1)  # [seq_len, 3]
        return torch.where(valid[:, None], coords, torch.full_like(coords, -1))

    # ---- masks --------------------------------------------------------------------------
    def block_ids(self, length: int | None = None) -> torch.Tensor:
        """Block id of each position of a sequence of ``length`` (default: the training input)."""
        return block_ids(self.seq_len if length is None else length, self.cond_len, self.block_size, self.ntp_len)

    def dense_mask(self, length: int | None = None, device=None) -> torch.Tensor:
        return mask_from_block_ids(self.block_ids(length)).to(device)

    def block_mask(self, length: int | None = None, device=None):
        """FlexAttention BlockMask of the training input (or a prefix of ``length``)."""
        return flex_block_mask(self.block_ids(length), device=device)

    def describe(self) -> dict:
        """Plain-data description stored in checkpoints (``from_dict`` inverts it)."""
        return {"task": self.task, "grid": list(self.layout.grid), "block": list(self.layout.block),
                "video_vocab": self.video_vocab, "num_classes": self.num_classes,
                "context_frames": self.context_frames, "text_ids": [list(t) for t in self.text_ids]}

    @classmethod
    def from_dict(cls, d: dict) -> TaskLayout:
        return cls(task=d["task"], layout=BlockLayout(tuple(d["grid"]), tuple(d["block"])), video_vocab=int(d["video_vocab"]),
                   num_classes=int(d.get("num_classes", 0)), context_frames=int(d.get("context_frames", 0)),
                   text_ids=tuple(tuple(int(x) for x in t) for t in d.get("text_ids", ())))
