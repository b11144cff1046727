"""The generator: a minGPT-style decoder over token ids, with module names of the released checkpoints.

Released key ``transformer.X`` is our ``X``: ``tok_emb``, ``pos_emb`` [1, n_positions, C], ``blocks.L.{ln1,
attn.{key,query,value,proj}, ln2, mlp.0, mlp.2}``, ``ln_f``, ``head`` (no bias), ``uncond_embedding``.

One ``forward`` serves training and cached decoding: positions ``start .. start+L-1`` of the sequence;
with a :class:`KVCache` the new keys/values are written into the preallocated cache at ``[start,
start+L)`` and attention runs over ``cache[:start+L]``. ``mask`` is a dense bool ``[L, start+L]`` (True =
may attend; SDPA) or a FlexAttention ``BlockMask`` (see :mod:`nbp.generator.layout`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nbp.generator import kernels

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch: dense masks only
    BlockMask, flex_attention = None, None


@dataclass
class GPTConfig:
    vocab_size: int
    n_positions: int = 5120  # learned absolute position slots (5120 in the released models)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    cond_len: int = 0  # rows of uncond_embedding (condition positions replaced for CFG)
    flex_attention: bool = False  # compile FlexAttention on CUDA (a BlockMask selects it per call)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "small": dict(n_layer=12, n_head=12, n_embd=768),
    "base": dict(n_layer=24, n_head=16, n_embd=1536),  # 700M
    "xl": dict(n_layer=24, n_head=32, n_embd=2048),  # 1.2B
    "3b": dict(n_layer=32, n_head=32, n_embd=3072),
}


def gpt_config(preset: str, **kwargs) -> GPTConfig:
    """A preset's sizes plus the given fields (vocab_size, n_positions, dropout, ...); a size given as None keeps
    the preset's (``n_layer=None``: the preset's depth)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown generator preset {preset!r} (known: {', '.join(PRESETS)})")
    fields = {**PRESETS[preset], **{k: v for k, v in kwargs.items() if v is not None or k not in PRESETS[preset]}}
    if fields["n_embd"] % fields["n_head"]:
        raise ValueError(f"n_embd {fields['n_embd']} is not a multiple of n_head {fields['n_head']}")
    return GPTConfig(**fields)


def grid_position_code(coords: torch.Tensor, grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Sinusoidal code of latent coordinates: ``coords`` [L, 3] (t, h, w) -> [L, dim], unit amplitude.

    ``dim`` is split into a quarter for t and the rest evenly for h and w; each axis of extent n gets
    sin/cos pairs at angular frequencies (pi/2) * (1/(4n))^(i/(m-1)), i = 0..m-1 (a quarter turn per cell
    down to one turn per 16n cells), so neighbouring cells get similar codes and no two cells of the grid
    the same one.
    """
    parts, dims = [], (dim // 4, (dim - dim // 4) // 2, dim - dim // 4 - (dim - dim // 4) // 2)
    for axis, (n, d) in enumerate(zip(grid, dims)):
        m = d // 2
        freq = (math.pi / 2) * (1.0 / (4 * n)) ** (torch.arange(m, dtype=torch.float64) / max(m - 1, 1))  # [m]
        angle = coords[:, axis, None].double() * freq[None]  # [L, m]
        code = torch.cat([angle.sin(), angle.cos()], dim=1)  # [L, 2m]
        parts.append(F.pad(code, (0, d - 2 * m)))  # [L, d] (an odd d gets a zero column)
    return torch.cat(parts, dim=1).float()  # [L, dim]


class KVCache:
    """Keys and values of every layer, preallocated once: ``k, v`` [n_layer, batch, n_head, max_len, head_dim]."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, device=None, dtype=torch.float32):
        self.k = torch.zeros(n_layer, batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @classmethod
    def for_model(cls, model: GPT, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, batch, c.n_head, max_len or c.n_positions, c.n_embd // c.n_head,
                   device=device or p.device, dtype=dtype or p.dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, nh, L, hs] at [start, start+L); return the cache up to start+L."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot hold position {end - 1}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape update: write k, v [B, nh, L, hs] at positions ``pos`` [L] (a device tensor, no host
        sync); return the whole cache of the layer [B, nh, max_len, hs] (the caller masks unwritten slots)."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]


# --------------------------------------------------------------------------------------
# fast CPU inference: packed copies of the linear weights (inference-only derived state, never saved)

PLAIN = False  # True (see plain_linears): every linear through F.linear, packs or not (comparison runs)


@contextlib.contextmanager
def plain_linears():
    """Run the block's forwards with plain ``F.linear`` even where packs are attached."""
    global PLAIN
    old, PLAIN = PLAIN, True
    try:
        yield
    finally:
        PLAIN = old


WIDE_THREADS = 0  # > 0 inside decode_threads(): the thread count for the linears worth parallelizing
WIDE_MIN_BYTES = 32 << 20  # weights of at least this many bytes (the L3 size here) stream from memory: more cores
WIDE_MIN_FLOPS = 256e6  # or matmuls of at least this much work (~3 ms of one core)
WIDE_ATTN_BYTES = 1 << 20  # attention over keys and values of at least this many bytes (read from memory)


@contextlib.contextmanager
def decode_threads(threads: int = 1):
    """Run small ops on ``threads`` threads, and the wide linears (:data:`WIDE_MIN_BYTES`,
    :data:`WIDE_MIN_FLOPS`, :data:`GEMV_WIDE_BYTES`) and attention over a long cache (:data:`WIDE_ATTN_BYTES`) on
    the thread count set before. A parallel region costs microseconds on idle cores
    but up to a scheduler tick (4 ms) when other work shares them, far more than the work of a decode step's
    small ops (layer norms, GELU, one block's attention: tens of microseconds); see results/speed.md."""
    global WIDE_THREADS
    wide, old = torch.get_num_threads(), WIDE_THREADS
    WIDE_THREADS = wide
    torch.set_num_threads(min(threads, wide))
    try:
        yield
    finally:
        WIDE_THREADS = old
        torch.set_num_threads(wide)


@contextlib.contextmanager
def wide_threads(enabled: bool = True):
    """Inside :func:`decode_threads`: run on the thread count set before it (for work that pays for a parallel
    region); elsewhere, or with ``enabled`` False, change nothing."""
    if not (enabled and WIDE_THREADS):
        yield
        return
    narrow = torch.get_num_threads()
    torch.set_num_threads(WIDE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(narrow)


def _mkl_packed(w: torch.Tensor, rows: int):
    """MKL's packed sgemm weight for inputs of exactly ``rows`` rows (other row counts make ``_mkl_linear``
    fall back to plain linear), or None where this build has no MKL op."""
    if not hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        return None
    return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)


def _dnnl_packed(w: torch.Tensor, rows: int):
    """oneDNN's reordered weight (any row count), or None where this build has no oneDNN op."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(w, rows)


def _gemv_weight(w: torch.Tensor, rows: int) -> torch.Tensor:
    """The weight itself: :func:`nbp.generator.kernels.gemv` reads it as it is."""
    return w


PACKERS = {"mkl": _mkl_packed, "dnnl": _dnnl_packed, "gemv": _gemv_weight}
_HAVE_DNNL = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
GEMV_ROWS = 2  # inputs of at most this many rows go through the compiled GEMV (where it is built)
GEMV_WIDE_BYTES = 1 << 20  # and weights of at least this many bytes through it on all threads


def pack_kind(rows: int) -> str:
    """The matmul for an fp32 CPU linear of ``rows`` input rows (a fixed rule from the measurements in
    results/speed.md, so that a machine always runs the same kernels): the compiled GEMV for up to
    :data:`GEMV_ROWS` rows where it is built (:func:`nbp.generator.kernels.compiled`; it reads the weight at the
    rate a plain sum does); oneDNN's reordered weight otherwise; MKL's packed sgemm for one row only where this
    build has neither (plain ``F.linear`` takes MKL's sgemv path, which reads the weight at a fraction of the
    bandwidth)."""
    if rows <= GEMV_ROWS and kernels.compiled():
        return "gemv"
    return "dnnl" if rows > 1 or _HAVE_DNNL else "mkl"


def pack_rows(kind: str, rows: int) -> int:
    """The row count a pack is laid out for (0: the input's own): MKL's packs serve exactly their row count;
    oneDNN keeps one pack for a decode step's rows (1 to 64, laid out for 16) and one for longer inputs (a
    prefill); the GEMV reads the weight itself."""
    if kind == "mkl":
        return rows
    if kind == "gemv":
        return 0
    return 16 if rows <= 64 else 0


def _run_packed(kind: str, x: torch.Tensor, packed, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if kind == "mkl":
        return torch.ops.mkl._mkl_linear(x, packed, w, b, x.shape[0])
    if kind == "gemv":
        return kernels.gemv(x, packed, b, torch.get_num_threads())
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


class LinearPack:
    """Packed copies of one weight [N, K] (or of its rows lo:hi), one per matmul kind, built on first use from
    the weight and rebuilt when the weight or bias changes (storage or in-place version). Not a parameter or
    buffer: state dicts never see it, and pickling drops it (rebuilt on the next call). A kind whose op is
    missing or fails falls back to ``F.linear``."""

    def __init__(self):
        self.packs: dict = {}  # (kind, row bucket, lo, hi) -> (weight key, packed, weight, bias)

    def __getstate__(self) -> dict:
        return {"packs": {}}

    def clear(self) -> None:
        self.packs.clear()

    @staticmethod
    def _key(w: torch.Tensor, b: torch.Tensor | None) -> tuple:
        return (w.data_ptr(), w._version, w.shape, None if b is None else (b.data_ptr(), b._version))

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, span: tuple[int, int] | None) -> torch.Tensor:
        """x [..., K] -> ``F.linear(x, w[lo:hi], b[lo:hi])`` [..., hi-lo] (``span`` (lo, hi); None: all rows)."""
        lo, hi = span if span is not None else (0, w.shape[0])
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)  # [M, K]
        M = x2.shape[0]
        kind = pack_kind(M)
        bucket = pack_rows(kind, M)
        slot = (kind, bucket, lo, hi)
        key = self._key(w, b)
        entry = self.packs.get(slot)
        if entry is None or entry[0] != key:
            ws = w[lo:hi].detach()  # [hi-lo, K] (a row slice of a contiguous weight stays contiguous)
            bs = None if b is None else b[lo:hi].detach()
            try:
                packed = PACKERS[kind](ws.contiguous(), bucket or M)  # the row count it is laid out for
            except RuntimeError:
                packed = None
            entry = self.packs[slot] = (key, packed, ws, bs)
        _, packed, ws, bs = entry
        wide = ws.numel() * 4 >= (GEMV_WIDE_BYTES if kind == "gemv" else WIDE_MIN_BYTES) or 2 * M * ws.numel() >= WIDE_MIN_FLOPS
        with wide_threads(wide):
            y = None
            if packed is not None:
                try:
                    y = _run_packed(kind, x2.contiguous(), packed, ws, bs)  # [M, hi-lo]
                except RuntimeError:  # the op exists but refuses this input: plain from now on
                    self.packs[slot] = (key, None, ws, bs)
            if y is None:
                y = F.linear(x2, ws, bs)  # [M, hi-lo]
        return y.view(*lead, hi - lo)  # [..., hi-lo]


SCREEN_ROWS = 8  # greedy rows (batch x positions) up to which the head is screened: below the machine balance
# (FLOPs per byte of sgemm over memory), an fp32 head of so few rows is bound by reading its weight
SCREEN_SLACK = 1e-6  # relative slack on the screen's error bound (for the float64 rounding of its inputs)


class HeadScreen:
    """The greedy head of a few rows without its full fp32 logits: the argmax over the head's outputs lo:hi of
    hidden rows h, reading an int8 copy of the weight (a quarter of its bytes) and then a few fp32 rows.

    An int8 copy q (per-row scales s, |q| <= 127) and, per call, an int16 copy of each hidden row (one scale,
    :func:`nbp.generator.kernels.screen_limit`) give every logit's *screen value* a_j = x^ . w^_j exactly (integer
    dot products, :func:`nbp.generator.kernels.screen`, scaled in float64). With the exact logit e_j = x . w_j,

        |e_j - a_j| <= ||x - x^|| max_i ||w_i|| + ||x^|| max_i ||w^_i - w_i|| = B   (Cauchy-Schwarz),

    so the largest logit lies among the *candidates* a_j >= max a - 2B, and those are scored again in float64
    from the fp32 weight rows: the result is the argmax of the logits in float64 (the first of equal ones), which
    fp32 logits approximate (they agree unless the two largest are within fp32 rounding of each other). Built
    per span on first use, rebuilt when the weight changes; never in the state dict; pickling drops it.
    ``rows`` and ``rescored`` count the rows screened and the candidates scored again (for the benchmarks)."""

    def __init__(self):
        self.spans: dict = {}  # (lo, hi) -> (weight key, q, s, max row norm, max quantization error norm)
        self.rows = self.rescored = 0

    def __getstate__(self) -> dict:
        return {"spans": {}, "rows": 0, "rescored": 0}

    def clear(self) -> None:
        self.spans.clear()

    @staticmethod
    def quantize(w: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """w [N, K] -> (q int8 [N, K], s float64 [N], max_j ||w_j||, max_j ||s_j q_j - w_j||), q = round(w / s),
        s_j = max|w_j| / 127 (1 for a zero row); the norms in float64, ``chunk`` rows at a time."""
        N, K = w.shape
        q, s = torch.empty(N, K, dtype=torch.int8), torch.empty(N, dtype=torch.float64)
        wmax = rmax = 0.0
        for a in range(0, N, chunk):
            w64 = w[a:a + chunk].detach().double()  # [n, K]
            amax = w64.abs().amax(1)  # [n]
            sc = torch.where(amax > 0, amax / 127, torch.ones_like(amax))  # [n]
            qc = torch.round(w64 / sc[:, None])  # [n, K], |qc| <= 127
            q[a:a + chunk], s[a:a + chunk] = qc.to(torch.int8), sc
            wmax = max(wmax, float(w64.norm(dim=1).max()))
            rmax = max(rmax, float((qc * sc[:, None] - w64).norm(dim=1).max()))
        return q, s, wmax, rmax

    def __call__(self, h: torch.Tensor, w: torch.Tensor, span: tuple[int, int] | None, threads: int) -> torch.Tensor | None:
        """h [R, K] fp32 -> the argmax over ``w[lo:hi]`` of each row's logits [R] (long, counted from lo); None
        where the screen does not apply (a weight or hidden value that is not finite)."""
        lo, hi = span if span is not None else (0, w.shape[0])
        key = (w.data_ptr(), w._version, w.shape)
        entry = self.spans.get((lo, hi))
        if entry is None or entry[0] != key:
            ws = w[lo:hi].detach()  # [N, K]
            ok = bool(torch.isfinite(ws).all())
            entry = self.spans[(lo, hi)] = (key, ws, *(self.quantize(ws) if ok else (None,) * 4))
        _, ws, q, s, wmax, rmax = entry
        if q is None or not bool(torch.isfinite(h).all()):
            return None
        R, K = h.shape
        x = h.double()  # [R, K]
        sx = x.abs().amax(1, keepdim=True) / kernels.screen_limit(K)  # [R, 1]
        sx = torch.where(sx > 0, sx, torch.ones_like(sx))
        xq = torch.round(x / sx)  # [R, K], |xq| <= screen_limit(K)
        xh = xq * sx  # [R, K]: x^
        dx, nx = (x - xh).norm(dim=1), xh.norm(dim=1)  # [R] each
        a = kernels.screen(q, xq.to(torch.int16), threads).double() * s[None] * sx  # [R, N]: x^ . w^_j
        bound = (dx * wmax + nx * rmax) * (1 + SCREEN_SLACK) + 1e-12 * nx * (wmax + rmax)  # [R]: B, with rounding
        cut = a.amax(1) - 2 * bound  # [R]
        ids = torch.empty(R, dtype=torch.long)
        for r in range(R):
            cand = (a[r] >= cut[r]).nonzero()[:, 0]  # [n] ascending
            ids[r] = cand[(ws[cand].double() @ x[r]).argmax()]  # the first of equal float64 logits
            self.rescored += cand.numel()
        self.rows += R
        return ids


def fast_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, pack: LinearPack | None,
                span: tuple[int, int] | None = None) -> torch.Tensor:
    """``F.linear(x, w[lo:hi], b[lo:hi])`` (``span`` (lo, hi); None: all rows): through the pack for fp32 CPU
    inference (no gradient, not under ``torch.compile``), else plain."""
    if (pack is not None and not PLAIN and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == w.dtype == torch.float32 and not torch.compiler.is_compiling()):
        return pack(x, w, b, span)
    if span is not None:
        w, b = w[span[0]:span[1]], None if b is None else b[span[0]:span[1]]
    return F.linear(x, w, b)


def linear(m: nn.Linear, x: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
    """``m(x)`` (its outputs lo:hi only, ``span``), through ``m.pack`` when :meth:`GPT.fast_cpu` attached one."""
    pack = m.__dict__.get("pack")
    if pack is None and span is None:
        return m(x)
    return fast_linear(x, m.weight, m.bias, pack, span)


_compiled_flex = None


def _flex(q, k, v, block_mask):
    """FlexAttention: compiled on CUDA (fused kernel), eager elsewhere (materializes scores; tests only)."""
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    return flex_attention(q, k, v, block_mask=block_mask)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B, nh, L, hs], k/v [B, nh, S, hs]; mask: bool [L, S], a BlockMask, or None (full)."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _flex(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        assert C % config.n_head == 0
        self.n_head = config.n_head
        self.key = nn.Linear(C, C)
        self.query = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.resid_drop = nn.Dropout(config.dropout)
        self.fused = False  # fuse_qkv(): one [3C, C] projection whose rows are query, key, value

    def fuse_qkv(self) -> None:
        """Build the fused query/key/value projection (inference). The three Linear weights become views of
        it, so state-dict names stay the released ones, and ``load_state_dict`` or an optimizer step (both
        write in place) keep it current; a dtype or device move rebuilds it (``_apply``)."""
        lins = (self.query, self.key, self.value)
        w = torch.cat([m.weight.detach() for m in lins])  # [3C, C]
        b = torch.cat([m.bias.detach() for m in lins])  # [3C]
        C = w.shape[1]
        for i, m in enumerate(lins):
            m.weight.data = w[i * C:(i + 1) * C]
            m.bias.data = b[i * C:(i + 1) * C]
        self.qkv_weight, self.qkv_bias, self.fused = w, b, True

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.fused:  # a move gave the three weights new storage: fuse again
            self.fuse_qkv()
        return out

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, C] -> q, k, v [B, L, C] (one matmul when fused and no gradient is needed)."""
        if self.fused and not torch.is_grad_enabled():
            qkv = fast_linear(x, self.qkv_weight, self.qkv_bias, self.__dict__.get("qkv_pack"))  # [B, L, 3C]
            return qkv.chunk(3, dim=-1)  # 3 x [B, L, C]
        return linear(self.query, x), linear(self.key, x), linear(self.value, x)

    def forward(self, x, mask, cache: KVCache | None = None, layer: int = 0, start: int | torch.Tensor = 0):
        """``start`` an int: cache slots [start, start+L) by slicing; a tensor of positions [L]: static
        write (:meth:`KVCache.write`), attention over the whole cache under ``mask`` [L or 1, max_len]."""
        B, L, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.qkv(x)
        q = q.reshape(B, L, nh, hs).transpose(1, 2)  # [B, nh, L, hs]
        k = k.reshape(B, L, nh, hs).transpose(1, 2)  # [B, nh, L, hs]
        v = v.reshape(B, L, nh, hs).transpose(1, 2)  # [B, nh, L, hs]
        if cache is not None:
            if isinstance(start, torch.Tensor):
                k, v = cache.write(layer, start, k, v)  # [B, nh, max_len, hs]
            else:
                k, v = cache.update(layer, start, k, v)  # [B, nh, start+L, hs]
        with wide_threads(2 * k.numel() * k.element_size() >= WIDE_ATTN_BYTES):
            y = attend(q, k, v, mask)  # [B, nh, L, hs]
        y = y.transpose(1, 2).reshape(B, L, C)  # [B, L, C]
        return self.resid_drop(linear(self.proj, y))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C), nn.Dropout(config.dropout))

    def forward(self, x, mask, cache=None, layer=0, start=0):
        x = x + self.attn(self.ln1(x), mask, cache, layer, start)
        return x + self.ffn(self.ln2(x))

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """``self.mlp(h)``, each Linear through :func:`linear` (its pack, when attached)."""
        m = self.mlp
        return m[3](linear(m[2], m[1](linear(m[0], h))))


class GPT(nn.Module):
    """Pre-LayerNorm transformer with learned absolute positions and an untied head without bias.

    ``uncond_embedding`` [cond_len, C] is learned (a Parameter, so condition dropout trains it; the key
    matches the released buffer): rows flagged in ``uncond`` use it instead of the token embeddings of
    the condition positions 0..cond_len-1 (classifier-free guidance).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.n_positions, C))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        self.uncond_embedding = nn.Parameter(torch.zeros(config.cond_len, C))
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.uncond_embedding, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def fuse_qkv(self) -> GPT:
        """Fused query/key/value projections in every block (see :meth:`SelfAttention.fuse_qkv`)."""
        for b in self.blocks:
            b.attn.fuse_qkv()
        return self

    def prepare_inference(self, dtype: torch.dtype | None = None, device=None, fuse_qkv: bool = True) -> GPT:
        """Eval mode, optionally another dtype (e.g. bf16 weights; caches follow the weights) and device,
        and the fused QKV projection. The state dict keeps the released names and shapes."""
        self.to(device=device, dtype=dtype).eval()
        return self.fuse_qkv() if fuse_qkv else self

    def _pack_slots(self) -> list[tuple[nn.Module, str]]:
        """(module, attribute) of every pack :meth:`fast_cpu` attaches: the head, each block linear, each fused QKV."""
        slots = [(self.head, "pack")]
        for b in self.blocks:
            a = b.attn
            slots += [(m, "pack") for m in (a.query, a.key, a.value, a.proj, b.mlp[0], b.mlp[2])] + [(a, "qkv_pack")]
        return slots

    def fast_cpu(self, enabled: bool = True) -> GPT:
        """Attach (or drop) packed copies of every block linear and of the head for fp32 CPU inference
        (:class:`LinearPack`: built on first use per input row count, rebuilt when a weight changes, never in
        the state dict), and the head's greedy screen (:class:`HeadScreen`, used by :meth:`greedy_ids`). Forwards
        without gradient on CPU in fp32 then use them; training, other dtypes and devices keep ``F.linear``.
        Idempotent."""
        for m, attr in self._pack_slots():
            if not enabled:
                m.__dict__.pop(attr, None)
            elif m.__dict__.get(attr) is None:
                setattr(m, attr, LinearPack())
        if not enabled:
            self.head.__dict__.pop("screen", None)
        elif self.head.__dict__.get("screen") is None:
            self.head.screen = HeadScreen()
        return self

    def packs(self) -> list[LinearPack]:
        """The attached packs (empty without :meth:`fast_cpu`)."""
        return [p for m, attr in self._pack_slots() if (p := m.__dict__.get(attr)) is not None]

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        for p in self.packs():  # a move or cast: the packed copies are of the old weights
            p.clear()
        if (screen := self.head.__dict__.get("screen")) is not None:
            screen.clear()
        return out

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.pos_emb.numel() - self.tok_emb.weight.numel()

    def embed(self, idx: torch.Tensor, start: int = 0, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position embeddings of positions start..start+L-1 -> [B, L, C]."""
        B, L = idx.shape
        if start + L > self.config.n_positions:
            raise ValueError(f"positions up to {start + L - 1} exceed the model's {self.config.n_positions} slots")
        x = self.tok_emb(idx)  # [B, L, C]
        n = min(self.config.cond_len - start, L)
        if uncond is not None and n > 0:
            u = self.uncond_embedding[start:start + n].to(x.dtype)[None].expand(B, n, -1)  # [B, n, C]
            x = torch.cat([torch.where(uncond.view(B, 1, 1), u, x[:, :n]), x[:, n:]], dim=1)  # [B, L, C]
        return x + self.pos_emb[:, start:start + L]

    def forward(self, idx: torch.Tensor, mask=None, *, cache: KVCache | None = None, start: int = 0,
                uncond: torch.Tensor | None = None, last: int | None = None,
                vocab: tuple[int, int] | None = None, hidden: bool = False) -> torch.Tensor:
        """idx [B, L] ids at positions start..start+L-1 -> logits [B, L, V].

        mask: bool [L, start+L] (True = may attend), a FlexAttention BlockMask, or None (full attention).
        uncond: bool [B], rows that get the unconditional embedding on the condition positions.
        last: only the last ``last`` positions go through the head (sampling) -> logits [B, last, V].
        vocab: (lo, hi), only vocabulary ids lo..hi-1 go through the head (sampling) -> logits [..., hi-lo].
        hidden: return the head's input (``ln_f``'s output) [B, L or last, C] instead (for :meth:`greedy_ids`).
        """
        x = self.drop(self.embed(idx, start, uncond))
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i, start)
        if last is not None:
            x = x[:, -last:]  # [B, last, C]
        x = self.ln_f(x)
        return x if hidden else linear(self.head, x, vocab)

    def greedy_ids(self, h: torch.Tensor, vocab: tuple[int, int] | None = None) -> torch.Tensor:
        """The head's argmax for hidden states h [B, n, C] (``forward(..., hidden=True)``) -> [B, n] (among
        vocabulary ids lo..hi-1, counted from lo, with ``vocab``). In fp32 CPU inference with :meth:`fast_cpu` and
        the compiled kernels, for at most :data:`SCREEN_ROWS` rows: through the head's :class:`HeadScreen` (the
        argmax of the logits in float64); otherwise the argmax of the fp32 logits."""
        B, n, C = h.shape
        screen = self.head.__dict__.get("screen")
        if (screen is not None and B * n <= SCREEN_ROWS and not PLAIN and not torch.is_grad_enabled()
                and h.device.type == "cpu" and h.dtype == self.head.weight.dtype == torch.float32
                and kernels.compiled() and not torch.compiler.is_compiling()):
            ids = screen(h.reshape(B * n, C), self.head.weight, vocab, WIDE_THREADS or torch.get_num_threads())
            if ids is not None:
                return ids.view(B, n)  # [B, n]
        return linear(self.head, h, vocab).argmax(dim=-1)  # [B, n]

    def static_step(self, idx: torch.Tensor, start: torch.Tensor, cache: KVCache, last: int | None = None,
                    vocab: tuple[int, int] | None = None) -> torch.Tensor:
        """A decode step with fixed shapes (CUDA-graph / ``torch.compile`` friendly): ids [B, L] at positions
        ``start .. start+L-1`` (``start`` a 0-d long tensor on the model's device), each attending to every
        cached position before ``start + L`` (a whole block: no mask inside it) -> logits [B, last or L, V]
        (``vocab`` (lo, hi): of those vocabulary ids only).

        Equal to ``forward(idx, None, cache=cache, start=int(start))`` for such a step; positions come by
        offset (index_select of pos_emb), the cache is written with index_copy_, and attention always spans
        the preallocated cache, masked by position, so no shape depends on ``start``. The caller checks that
        the positions fit (``start + L <= min(n_positions, cache.max_len)``) and lie past the condition.
        """
        B, L = idx.shape
        pos = start + torch.arange(L, device=idx.device)  # [L]
        x = self.tok_emb(idx) + self.pos_emb[0].index_select(0, pos)[None]  # [B, L, C]
        slots = torch.arange(cache.max_len, device=idx.device)  # [max_len]
        mask = (slots < start + L)[None]  # [1, max_len]: written slots only
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache, i, pos)
        if last is not None:
            x = x[:, -last:]  # [B, last, C]
        return linear(self.head, self.ln_f(x), vocab)
