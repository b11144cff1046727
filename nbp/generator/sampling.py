"""Block sampling with a preallocated KV cache: NBP (any block layout), NTP (block 1x1x1) and the released
UCF hybrid (first block token by token, then blocks).

One generation is a list of *groups*: the tokens that one forward pass emits. ``prefill`` runs the
prompt once (its last positions predict the first group); every ``decode_step`` feeds the group just
sampled (plus, for the hybrid layout, the middle-bos ids ``1..B-1`` once after the first block) at the
next positions: the new block attends to the whole cache and to itself in both directions, and its
positions predict the next group. The cache (:class:`nbp.generator.model.KVCache`) is allocated once
for the final length and written in place; nothing is re-concatenated per step. Forward passes =
number of groups (:func:`count_steps`): UCF hybrid 16 + 79 = 95, K600 768 / 16 = 48, NTP one per token.

Sampling choices (and where they differ from the released sampler):

- Only video ids are sampled: logits of condition/special ids are dropped before filtering (the released
  sampler draws over the whole vocabulary; a trained model gives those ids ~0 probability, an untrained
  one would emit ids that are not codes).
- :func:`filter_logits`: temperature, then top-k, then top-p on the k survivors (keeping the first token
  over the threshold), in one batched call over every position of the block and every sample; the
  released sampler sorts the full vocabulary once per position in a Python loop. On CPU the draw from that
  filter (:func:`_draw_filtered`) neither sorts nor selects the top k: it places cuts by counting at a few
  thresholds and draws by rejection, exactly from the filtered softmax. With no top-k the
  released code applies no top-p at all; here ``top_p`` alone is plain nucleus sampling over the whole
  vocabulary (pass ``top_p=None`` to get the released behaviour).
- Classifier-free guidance: ``(1 + t) * cond - t * uncond`` with the unconditional rows (learned
  ``uncond_embedding`` on the condition positions) batched beside the conditional ones; ``cfg_schedule
  = "linear"`` scales t by ``(s + 1) / S`` at step s of S.
- Randomness comes only from the ``generator`` passed in (``torch.Generator`` on the model's device), so
  a seeded call is reproducible; ``greedy`` is the argmax.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch

from nbp.generator import kernels
from nbp.generator.layout import TaskLayout
from nbp.generator.model import GPT, KVCache, decode_threads, plain_linears, wide_threads
from nbp.tracking import progress

# --------------------------------------------------------------------------------------
# logits -> tokens


def candidates(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Filtered candidate logits ``vals [..., k]`` and their vocabulary ids ``idx [..., k]`` (None: all ids,
    in order). Temperature, then top-k, then top-p on the survivors (first token over ``top_p`` kept)."""
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # [..., k] sorted descending
    elif top_p is not None:
        vals, idx = torch.sort(logits, dim=-1, descending=True)  # [..., V]
    else:
        return logits, None
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each candidate
        vals = vals.masked_fill(before > top_p, float("-inf"))
    return vals, idx


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Logits [..., V] with the filtered-out ids at -inf (see :func:`candidates`)."""
    vals, idx = candidates(logits, temperature, top_k, top_p)
    if idx is None:
        return vals
    return torch.full_like(logits, float("-inf"), dtype=vals.dtype).scatter_(-1, idx, vals)


TOP_P_MARGIN = 1e-5  # |mass before - top_p| below this: decided by the reference filter (float rounding)
DRAW_BLOCK = 1 << 20  # logits per block of rows of the CPU draw: 4 MB of fp32 (16 rows of 64,000), in cache
SAMPLE = 2048  # logits per row sampled to bracket the k-th largest
FLOOR = -3.0e38  # below every finite logit, and finite itself (x - FLOOR is never inf - inf)
CHUNK = 256  # entries per chunk of the two-level inverse-CDF draw
CANDIDATES = 4  # draws per row and round (most rows then need no second round)
BAND_MASS = 0.25  # narrow a top-k bracket until at most this share of the proposal lies outside the top k
FULL_PROPOSAL = 0.25  # propose from all weights (no pass to cut them) where the drop cut keeps at least this share
FULL_CANDIDATES = 12  # draws per row and round from all weights (a third or more of them is kept)


def _reference_kept(x: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Kept ids [R, V] (bool) of the reference filter on already temperature-scaled logits x [R, V]."""
    return torch.isfinite(filter_logits(x, 1.0, top_k, top_p))


def nucleus_decision(above: torch.Tensor, tied: torch.Tensor, wi: torch.Tensor, zl: torch.Tensor, zh: torch.Tensor,
                     top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Is a top-k candidate in the top-p nucleus? -> (keep, unsure), bool, all arguments of one shape.

    ``above``: the softmax mass of the ids with larger logits; ``tied``: how many ids share its logit (>= 1);
    ``wi``: its own mass; ``[zl, zh]``: bounds of the top-k mass (equal when it is known). The reference keeps
    the candidate of sorted rank r when the mass of ranks < r, over the top-k mass, is <= top_p; ids tied with
    it may sort before it, so that mass lies between ``above`` and ``above + (tied - 1) * wi``. ``keep`` is
    certain; ``unsure`` marks a decision that the bounds, a tie across the threshold or a mass within
    ``TOP_P_MARGIN`` of it (two float summation orders could decide differently) leave open."""
    above, wi = above.double(), wi.double()
    before_hi = above + (tied.double() - 1) * wi
    keep = before_hi <= (top_p - TOP_P_MARGIN) * zl.double()
    unsure = ~keep & (above <= (top_p + TOP_P_MARGIN) * zh.double())
    return keep, unsure


_WORK = threading.local()  # per-thread scratch of the CPU draw, kept between calls


def _scratch(name: str, n: int, V: int) -> torch.Tensor:
    """A float32 [n, V] scratch tensor kept between calls (per thread): a fresh multi-MB tensor costs more in
    page faults than the passes that fill it."""
    bufs = _WORK.__dict__.setdefault("bufs", {})
    flat = bufs.get(name)
    if flat is None or flat.numel() < n * V:
        flat = bufs[name] = torch.empty(n * V)
    return flat[: n * V].view(n, V)


def _above(x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """1.0 where x [n, V] > t [n, 1], else 0.0, written into the float tensor ``out`` (a comparison into a bool
    tensor is several times slower on CPU)."""
    return torch.gt(x, t, out=out)


def _count_mass(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(#(x > t), mass of w where x > t) per row, [n, 1] each (float)."""
    if kernels.usable(x, w):
        return kernels.count_mass(x, w, t)
    ind = _above(x, t, buf)
    count = ind.sum(-1, keepdim=True)
    return count, ind.mul_(w).sum(-1, keepdim=True)


def counts_masses(x: torch.Tensor, w2: torch.Tensor, t: torch.Tensor, buf: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(#(x > t), mass of w above t) [n, q] each, at q thresholds per row t [n, q], over x [n, V] (``w2`` [n, 2, V]:
    a row of ones and the row of weights): the compiled pass (:mod:`nbp.generator.kernels`), which reads x and the
    weights once for every threshold, or the indicators [n, q, V] summed, then weighted and summed, with torch ops
    (``buf``: float scratch of at least n * q * V). The masses must be accurate well within :data:`TOP_P_MARGIN`:
    torch's sum adds pairwise; a matmul against the weights did not hold that (one BLAS added the V products in a
    running float sum, on some CPUs)."""
    n, q = t.shape
    if kernels.usable(x, w2[:, 1], q=q):
        return kernels.count_mass(x, w2[:, 1], t)
    ind = torch.gt(x[:, None], t[..., None], out=buf.view(-1)[: n * q * x.shape[1]].view(n, q, -1))  # [n, q, V]
    count = ind.sum(-1)  # [n, q]
    return count, ind.mul_(w2[:, 1, None]).sum(-1)


def _w2(n: int, V: int) -> torch.Tensor:
    """[n, 2, V] per-thread scratch for :func:`weights`, its row of ones filled once per shape."""
    w2 = _scratch("w2", 2 * n, V).view(n, 2, V)
    tag = _WORK.__dict__.get("w2_ones")
    if tag != (n, V, w2.data_ptr()):
        w2[:, 0] = 1
        _WORK.w2_ones = (n, V, w2.data_ptr())
    return w2


def weights(x: torch.Tensor, m: torch.Tensor, sums: torch.Tensor | None = None) -> torch.Tensor:
    """[n, 2, V]: ones, and exp(x - m) (the softmax times its normaliser: every test of the draw is on ratios),
    in a per-thread scratch. ``sums`` [n, V // CHUNK]: filled with the weights' chunk sums (V a multiple of
    :data:`CHUNK`). With the compiled passes (:mod:`nbp.generator.kernels`) both come from one pass over x; the
    weights are then 0 where exp(x - m) is below the smallest normal float (torch's exp gives a subnormal)."""
    return weigh(x, m, sums)[0]


def weigh(x: torch.Tensor, m: torch.Tensor, sums: torch.Tensor | None = None, t: torch.Tensor | None = None,
          buf: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(:func:`weights` with ``sums``, and the counts and masses above thresholds t [n, q] as :func:`counts_masses`
    gives them (None without t; ``buf``: its scratch)): one pass over x with the compiled passes, else torch ops."""
    n, V = x.shape
    w2 = _w2(n, V)
    if kernels.usable(x, q=0 if t is None else t.shape[1]):
        counted = kernels.weights(x, m, w2[:, 1], sums, CHUNK if sums is not None else 0, t)
        return w2, None if t is None else counted
    torch.sub(x, m, out=w2[:, 1]).exp_()
    if sums is not None:
        torch.sum(w2[:, 1].view(n, V // CHUNK, CHUNK), -1, out=sums)
    return w2, None if t is None else counts_masses(x, w2, t, buf)


@dataclass
class Bracket:
    """Per row [n, 1]: thresholds ``lo <= hi`` around the k-th largest logit, with c(lo) >= k >= c(hi) where
    c(t) = #(x > t), and the masses above them. The top-k set lies between {x > hi} and {x > lo}; c(lo) == k
    gives it exactly, {x > lo} (no tie across the k-th place)."""

    lo: torch.Tensor
    hi: torch.Tensor
    c_lo: torch.Tensor
    c_hi: torch.Tensor
    z_lo: torch.Tensor
    z_hi: torch.Tensor

    FIELDS = ("lo", "hi", "c_lo", "c_hi", "z_lo", "z_hi")

    def rows(self, idx: torch.Tensor) -> Bracket:
        return Bracket(*(getattr(self, f)[idx] for f in self.FIELDS))

    def put(self, idx: torch.Tensor, other: Bracket) -> None:
        for f in self.FIELDS:
            getattr(self, f)[idx] = getattr(other, f)

    def settle(self, k: int) -> Bracket:
        """Rows with c(hi) == k: {x > hi} is the top-k set, so lo moves onto hi (c(lo) == k marks it known)."""
        at = self.c_hi == k
        if not bool(at.any()):
            return self
        return Bracket(torch.where(at, self.hi, self.lo), self.hi, torch.where(at, self.c_hi, self.c_lo), self.c_hi,
                       torch.where(at, self.z_hi, self.z_lo), self.z_hi)

    def mass_bounds(self, k: int, m: torch.Tensor, wmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounds ``zl <= zh`` [n, 1] of the top-k mass (``m``: each row's largest logit, ``wmax`` its softmax
        mass, 1 / Z). Every id in the band (lo, hi] weighs between w(lo) and w(hi), w(t) = exp(t - m) / Z; the top
        k are {x > hi} plus the k - c(hi) largest of the band, or {x > lo} less its c(lo) - k smallest."""
        fa, fb = self.c_lo - k, k - self.c_hi  # band ids below / above the k-th place
        w_hi, w_lo = torch.exp(self.hi - m) * wmax, torch.exp(self.lo - m) * wmax  # [n, 1]
        zl = torch.maximum(self.z_lo - fa * w_hi, self.z_hi + fb * w_lo)
        zh = torch.minimum(self.z_hi + fb * w_hi, self.z_lo - fa * w_lo)
        return torch.where(fa == 0, self.z_lo, zl), torch.where(fa == 0, self.z_lo, zh)


def sample_step(V: int) -> int:
    """The stride of :func:`strided_sample` in a row of V logits: odd, so that the sampled ids run through every
    residue of every power of two (a vocabulary's ids often carry structure in their bits: an LFQ code's id is
    its bits), and 1 for a row shorter than 2 * :data:`SAMPLE`."""
    step = V // SAMPLE if V >= 2 * SAMPLE else 1
    return step if step % 2 else step - 1


def strided_sample(x: torch.Tensor) -> torch.Tensor:
    """About :data:`SAMPLE` logits of each row of x [n, V], every :func:`sample_step`-th -> [n, s] (the whole
    row when it is short). Runs of neighbouring ids are not used: they share their high bits, and on the
    benchmark's vocabulary they biased the sampled ranks by two thirds of a standard deviation."""
    step = sample_step(x.shape[1])
    return x if step == 1 else x[:, ::step]  # [n, s]


def sample_ranks(k: int, s: int, V: int) -> tuple[int, int]:
    """Ranks (0-based, from the top) in a sample of s of V logits that bracket the k-th largest logit of the row:
    the expected sample rank of the k-th, less and plus 2.5 binomial standard deviations."""
    r, d = k * s / V, 2.5 * math.sqrt(s * (k / V) * (1 - k / V)) + 1  # expected sample rank (from the top), margin
    return min(s - 1, max(0, int(r - d))), min(s - 1, max(0, math.ceil(r + d)))


def top_k_marks(top: torch.Tensor, m: torch.Tensor, k: int, V: int) -> torch.Tensor:
    """The first bracket of the k-th largest logit of each row [n, 2] (hi, lo): the sample values ``top`` [n, J]
    (sorted descending; at least as many as :func:`sample_ranks` reaches) at the ranks of :func:`sample_ranks`,
    or (the row's maximum ``m``, :data:`FLOOR`) where they tie."""
    j_hi, j_lo = sample_ranks(k, -(-V // sample_step(V)), V)
    lo = top[:, j_lo:j_lo + 1].clamp(min=FLOOR)  # [n, 1] the (j_lo + 1)-th largest
    hi = top[:, j_hi:j_hi + 1].clamp(min=FLOOR)  # [n, 1] the (j_hi + 1)-th
    hi = torch.where(lo < hi, hi, m)  # a sample of tied values: start from the row's maximum
    lo = torch.where(lo < hi, lo, FLOOR)
    return torch.cat([hi, lo], 1)


def sample_top(x: torch.Tensor, k: int) -> torch.Tensor:
    """The largest values of the sample of x [n, V] (:func:`strided_sample`), sorted descending, as many as
    :func:`sample_ranks` reaches for the k-th largest -> [n, J]."""
    xs = strided_sample(x)
    return xs.topk(sample_ranks(k, xs.shape[1], x.shape[1])[1] + 1, -1).values


def top_k_bracket(x: torch.Tensor, w2: torch.Tensor, m: torch.Tensor, wmax: torch.Tensor, k: int, buf: torch.Tensor,
                  top: torch.Tensor | None = None, counted: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[Bracket, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A :class:`Bracket` of the k-th largest logit of each row of x [n, V] (``w2`` [n, 2, V]: ones and the
    weights, see :func:`weights`; ``m``: each row's largest logit, finite, ``wmax`` its weight; k < V), from a
    sample of about :data:`SAMPLE` logits and one pass counting both ends (:func:`counts_masses`; ``buf``:
    scratch of 2 n V floats); rows where the sample missed the k-th place are moved (:func:`_rebracket`), and
    narrowed (:func:`narrow`) where more than :data:`BAND_MASS` of the mass above ``lo`` may lie outside the top
    k. ``top``: :func:`sample_top` (None: taken here); ``counted``: the counts and masses above
    :func:`top_k_marks`, if already counted (:func:`weigh`). -> (bracket, bounds zl, zh [n, 1] of the top-k mass,
    ok [n]: False where fewer than k logits are finite, so the k-th is -inf)."""
    n, V = x.shape
    w = w2[:, 1]  # [n, V]
    j_hi, j_lo = sample_ranks(k, -(-V // sample_step(V)), V)
    top = sample_top(x, k) if top is None else top  # [n, J] the sample's largest, sorted descending
    t = top_k_marks(top, m, k, V)  # [n, 2] hi, lo
    c, z = counts_masses(x, w2, t, buf) if counted is None else counted  # [n, 2] each
    br = Bracket(t[:, 1:], t[:, :1], c[:, 1:], c[:, :1], z[:, 1:], z[:, :1])
    miss = ((br.c_hi > k) | (br.c_lo < k))[:, 0]  # the sample missed the k-th place in these rows
    if bool(miss.any()):
        rows = miss.nonzero()[:, 0]
        br.put(rows, _rebracket(x[rows], w[rows], m[rows], k, br.rows(rows), top[rows, max(0, 2 * j_hi - j_lo)]))
    br = br.settle(k)
    zl, zh = br.mass_bounds(k, m, wmax)
    wide = (br.z_lo - zl) > BAND_MASS * br.z_lo
    if bool(wide.any()):
        rows = wide[:, 0].nonzero()[:, 0]
        br.put(rows, narrow(x[rows], w[rows], m[rows], k, br.rows(rows), torch.empty(len(rows), V), exact=False))
        zl, zh = br.mass_bounds(k, m, wmax)
    return br, zl, zh, br.c_lo[:, 0] >= k


def _rebracket(x: torch.Tensor, w: torch.Tensor, m: torch.Tensor, k: int, br: Bracket, far: torch.Tensor) -> Bracket:
    """Rows of x [r, V] whose sampled bracket missed the k-th place: a hi with c(hi) > k becomes the lo, and the
    next hi is ``far`` [r] (a larger sample value), then the row's maximum; a lo with c(lo) < k becomes the hi,
    and the next lo lies just below the row's smallest logit. Each move is one pass over these rows only."""
    lo, hi, c_lo, c_hi, z_lo, z_hi = (getattr(br, f).clone() for f in Bracket.FIELDS)
    buf = torch.empty_like(x)
    up = c_hi > k  # [r, 1] hi lies below the k-th place
    if bool(up.any()):
        lo, c_lo, z_lo = torch.where(up, hi, lo), torch.where(up, c_hi, c_lo), torch.where(up, z_hi, z_lo)
        hi = torch.where(up, torch.maximum(far[:, None], lo), hi)
        c, z = _count_mass(x, w, hi, buf)
        c_hi, z_hi = torch.where(up, c, c_hi), torch.where(up, z, z_hi)
        up = c_hi > k  # missed again: the maximum (nothing above it)
        lo, c_lo, z_lo = torch.where(up, hi, lo), torch.where(up, c_hi, c_lo), torch.where(up, z_hi, z_lo)
        hi, c_hi, z_hi = torch.where(up, m, hi), torch.where(up, 0.0, c_hi), torch.where(up, 0.0, z_hi)
    dn = c_lo < k  # [r, 1] lo lies above the k-th place
    if bool(dn.any()):
        hi, c_hi, z_hi = torch.where(dn, lo, hi), torch.where(dn, c_lo, c_hi), torch.where(dn, z_lo, z_hi)
        mn = x.amin(-1, keepdim=True)
        lo = torch.where(dn, torch.nextafter(mn, torch.full_like(mn, -math.inf)).clamp(min=FLOOR), lo)
        c, z = _count_mass(x, w, lo, buf)
        c_lo, z_lo = torch.where(dn, c, c_lo), torch.where(dn, z, z_lo)
    return Bracket(lo, hi, c_lo, c_hi, z_lo, z_hi)


def narrow(x: torch.Tensor, w: torch.Tensor, m: torch.Tensor, k: int, br: Bracket, buf: torch.Tensor,
           exact: bool) -> Bracket:
    """Narrow the bracket of every row of x [n, V] by false position on the counts (Illinois): until the top-k
    set is known, c(lo) == k (``exact``), or else until at most :data:`BAND_MASS` of the mass above lo may lie
    outside the top k. A row stops early when lo and hi are neighbouring floats: the band is then one value,
    tied across the k-th place."""
    kf = float(k)
    wmax = w.amax(-1, keepdim=True)
    lo, hi, c_lo, c_hi, z_lo, z_hi = (getattr(br, f).clone() for f in Bracket.FIELDS)
    ga, gb = c_lo - kf, c_hi - kf  # Illinois-weighted distances to k (>= 0, <= 0)
    moved = torch.zeros_like(ga)  # +1: lo moved last, -1: hi moved last
    for _ in range(64):
        live = (c_lo != kf) & (c_hi != kf)
        if not exact:
            zl, _ = Bracket(lo, hi, c_lo, c_hi, z_lo, z_hi).mass_bounds(k, m, wmax)
            live &= (z_lo - zl) > BAND_MASS * z_lo
        t = lo + (hi - lo) * (ga / (ga - gb))  # [n, 1]
        t = torch.where((t > lo) & (t < hi), t, lo + (hi - lo) * 0.5)
        live &= (t > lo) & (t < hi)
        if not bool(live.any()):
            break
        c, z = _count_mass(x, w, t, buf)
        up, dn = live & (c >= kf), live & (c < kf)  # t becomes lo / hi
        lo, c_lo, z_lo = torch.where(up, t, lo), torch.where(up, c, c_lo), torch.where(up, z, z_lo)
        hi, c_hi, z_hi = torch.where(dn, t, hi), torch.where(dn, c, c_hi), torch.where(dn, z, z_hi)
        ga = torch.where(up, c - kf, torch.where(dn & (moved < 0), ga * 0.5, ga))
        gb = torch.where(dn, c - kf, torch.where(up & (moved > 0), gb * 0.5, gb))
        moved = torch.where(up, 1.0, torch.where(dn, -1.0, moved))
    return Bracket(lo, hi, c_lo, c_hi, z_lo, z_hi).settle(k)


def exact_top_k(x: torch.Tensor, w: torch.Tensor, k: int, br: Bracket) -> Bracket:
    """The bracket of each row of x [n, V] (weights w) made exact: the k-th largest logit is found among the
    c(lo) - c(hi) logits of the band (lo, hi] (``torch.topk`` of the band alone), then counted on both sides:
    c(lo) == k afterwards, unless a tie straddles the k-th place (the band is then that one value). One row at a
    time: this is for the few rows whose draws the bracket's mass bounds leave undecided."""
    rows = []
    for r in range(x.shape[0]):
        xr = x[r]
        band = xr[(xr > br.lo[r]) & (xr <= br.hi[r])]  # [b] the band's logits
        kth = band.topk(int(k - br.c_hi[r, 0])).values.amin()  # the k-th largest of the row
        t = torch.stack([torch.nextafter(kth, torch.tensor(-math.inf)), kth])[None]  # [1, 2] just below it, it
        ind = torch.gt(xr[None, None], t[..., None])  # [1, 2, V]
        c, z = ind.sum(-1).float(), (ind * w[r]).sum(-1)  # [1, 2]
        rows.append(Bracket(t[:, :1], t[:, 1:], c[:, :1], c[:, 1:], z[:, :1], z[:, 1:]).settle(k))
    return Bracket(*(torch.cat([getattr(b, f) for b in rows]) for f in Bracket.FIELDS))


def standing(x: torch.Tensor, w: torch.Tensor, i: torch.Tensor, buf: torch.Tensor | None = None):
    """Where ids i [r, c] stand in their rows of logits x [r, V] (softmax w): (#ids with a larger logit, #ids
    with the same logit (>= 1), mass of the larger ones), [r, c] each (``buf`` [r, c, V]: float scratch)."""
    v = x.gather(-1, i)[..., None]  # [r, c, 1]
    if kernels.usable(x, w, q=2 * i.shape[1]):
        t = torch.cat([v[..., 0], torch.nextafter(v[..., 0], torch.tensor(-math.inf))], 1)  # [r, 2c] v, just below v
        c, z = kernels.count_mass(x, w, t)  # [r, 2c] each
        gt = c[:, :i.shape[1]]  # [r, c]
        return gt, c[:, i.shape[1]:] - gt, z[:, :i.shape[1]]
    buf = torch.empty(*i.shape, x.shape[-1]) if buf is None else buf
    gt = torch.gt(x[:, None], v, out=buf).sum(-1)  # [r, c]
    above = buf.mul_(w[:, None]).sum(-1)  # [r, c]
    tied = torch.eq(x[:, None], v, out=buf).sum(-1)  # [r, c]
    return gt, tied, above


def _inverse_cdf(ws: torch.Tensor, cs: torch.Tensor, rows: torch.Tensor | None, c: int,
                 generator: torch.Generator | None) -> torch.Tensor:
    """``c`` independent ids per row, each drawn with probability proportional to its weight: ws [n, nc, C] the
    weights in chunks of C (zero-padded), cs [n, nc] their cumulative chunk sums (float64); ``rows`` a subset
    of the rows (None: all). The chunk comes from the cumulative chunk sums, the id inside it from the chunk's
    own cumulative sum, one uniform per draw. -> [r, c] ids, each of positive weight."""
    rows = torch.arange(ws.shape[0]) if rows is None else rows
    cs = cs[rows]  # [r, nc]
    r, nc = cs.shape
    C = ws.shape[-1]
    u = torch.rand(r, c, dtype=torch.float64, generator=generator) * cs[:, -1:]  # [r, c]
    j = torch.searchsorted(cs, u, right=True).clamp_(max=nc - 1)  # [r, c] first chunk whose total passes u
    base = torch.where(j > 0, cs.gather(-1, (j - 1).clamp(min=0)), 0.0)  # [r, c] mass of the chunks before
    seg = ws[rows[:, None], j].double().cumsum(-1)  # [r, c, C] inside the chosen chunks
    u2 = torch.minimum((u - base).clamp_(min=0), seg[..., -1] * (1 - 2.0 ** -40))  # within the chunk's mass
    return torch.searchsorted(seg, u2[..., None], right=True)[..., 0] + j * C  # [r, c]


def _draw_filtered(x: torch.Tensor, top_k: int | None, top_p: float | None,
                   generator: torch.Generator | None, max_rounds: int = 64) -> torch.Tensor:
    """One id per row of temperature-scaled logits x [R, V], distributed as softmax over the kept set of
    :func:`filter_logits`, without sorting or selecting the top k: rejection sampling, in blocks of about
    :data:`DRAW_BLOCK` logits.

    Per block: the weights w = exp(x - max) (the softmax times its normaliser), a sample of about
    :data:`SAMPLE` logits per row (:func:`strided_sample`), and two counting passes, each at two thresholds per
    row (:func:`counts_masses`: the ids above and their weight, exactly). The first brackets the k-th largest
    logit (:func:`top_k_bracket`), which bounds the top-k weight; with a nucleus, the second counts two
    thresholds placed from the sample either side of the nucleus edge (:func:`nucleus_marks`). From the four,
    :func:`sure_cuts` gives each row a keep cut (every id above it is kept) and a drop cut (no id at or below
    it is). The proposal is w itself (:func:`_inverse_cdf`), or w above the drop cut where less than
    :data:`FULL_PROPOSAL` of w lies above it; a draw above the keep cut is accepted and one at or below the drop
    cut rejected without further work. A draw between the two takes one pass over its row for its standing
    (:meth:`_Draw.keeps`: how many ids are larger, how many tie with it, and their weight): that decides top-k
    membership exactly, and the nucleus (:func:`nucleus_decision`) on the top-k weight's bounds, made exact for
    that row (:func:`exact_top_k`) where they leave it open; a tie across the k-th place or the nucleus
    threshold, or a weight within ``TOP_P_MARGIN`` of it, asks the reference filter of that row. Accepted
    draws follow the proposal restricted to the kept set, i.e. exactly the filtered softmax; rejections redraw.
    """
    R, V = x.shape
    rows = max(1, DRAW_BLOCK // V)
    out = torch.empty(R, dtype=torch.long)
    for a in range(0, R, rows):
        out[a:a + rows] = _draw_block(x[a:a + rows], top_k, top_p, generator, max_rounds)
    return out


def nucleus_marks(top: torch.Tensor, m: torch.Tensor, wmax: torch.Tensor, scale: float, anchor: torch.Tensor,
                  z_anchor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Two thresholds per row [n, 2] (higher, lower) around the logit where the softmax mass above reaches
    ``target`` [n, 1] (the nucleus edge): from the sample's largest values ``top`` [n, J] (sorted descending;
    each stands for ``scale`` ids of the row) and one exact point, the mass ``z_anchor`` above ``anchor`` [n, 1].
    The mass above each sample value is estimated from the anchor plus the sample's mass in between; the two
    thresholds lie 3 standard deviations of the sample count (and 2 values) either side of the crossing.
    +inf (higher) or -inf (lower) where the sample has no value that far: no threshold on that side."""
    J = top.shape[1]
    e = torch.exp(top - m) * (wmax * scale)  # [n, J] the mass each sample value stands for
    cum = torch.cat([torch.zeros_like(m), e.cumsum(-1)], 1)  # [n, J + 1] sample mass above top[j] (strictly)
    a = (top > anchor).sum(-1, keepdim=True)  # [n, 1] sample values above the anchor
    est = z_anchor + cum[:, :J] - cum.gather(-1, a)  # [n, J] estimated mass above each sample value
    j = (est <= target).sum(-1, keepdim=True)  # [n, 1] the crossing: est(top[j - 1]) <= target < est(top[j])
    d = (3 * ((j - a).abs() + 1).double().sqrt()).ceil().long() + 2  # [n, 1] margin in sample values
    hi_j, lo_j = j - 1 - d, j + d
    hi = torch.where(hi_j >= 0, top.gather(-1, hi_j.clamp(0, J - 1)), math.inf)
    lo = torch.where(lo_j < J, top.gather(-1, lo_j.clamp(0, J - 1)), -math.inf)
    return torch.cat([hi, lo], 1)  # [n, 2]


def sure_cuts(t: torch.Tensor, c: torch.Tensor, z: torch.Tensor, k: float, zl: torch.Tensor, zh: torch.Tensor,
              top_p: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From thresholds t [n, q] with their exact counts c and masses z above: (keep, drop, z_drop) [n, 1], so
    that every id with a logit > keep is in the kept set and every id with a logit <= drop is not (``[zl, zh]``:
    bounds of the top-k mass; k: the top-k size, V when unlimited); z_drop is the mass above drop (NaN where
    there is no drop). Above a t with c(t) <= k every id is in the top k (with its ties); at or below a t with
    c(t) >= k none is; above a t with z(t) <= (top_p - margin) * zl the mass before any id is within the
    nucleus; at or below a t with z(t) > (top_p + margin) * zh it is past it (the rules of
    :func:`nucleus_decision`). keep +inf / drop -inf: no such threshold."""
    keep_ok, drop_ok = c <= k, c >= k
    if top_p is not None:
        zd = z.double()
        keep_ok = keep_ok & (zd <= (top_p - TOP_P_MARGIN) * zl.double())
        drop_ok = drop_ok | (zd > (top_p + TOP_P_MARGIN) * zh.double())
    keep = torch.where(keep_ok, t, math.inf).amin(-1, keepdim=True)
    drop, at = torch.where(drop_ok, t, -math.inf).max(-1, keepdim=True)
    return keep, drop, torch.where(torch.isfinite(drop), z.gather(-1, at), math.nan)


@dataclass
class _Draw:
    """What the exact decision of a draw needs about one block of rows (see :func:`_draw_block`)."""

    x: torch.Tensor  # [n, V] logits
    w: torch.Tensor  # [n, V] softmax
    m: torch.Tensor  # [n, 1] largest logit
    wmax: torch.Tensor  # [n, 1] its mass
    top_k: int | None  # None: no top-k
    top_p: float | None  # None: no nucleus
    br: Bracket | None  # the top-k bracket (None without top-k)
    zl: torch.Tensor  # [n, 1] bounds of the top-k mass
    zh: torch.Tensor
    kept_ref: dict  # row -> the reference filter's kept ids (asked for ties and masses at the threshold)

    def keeps(self, rows: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Are the ids i [p] drawn in rows [p] (a row may repeat) in the kept set? -> [p] (bool). One pass over
        each draw's row (copied) for the id's standing; where the mass bounds leave the nucleus open, the row's
        bracket is made exact (:func:`exact_top_k`); a tie across the k-th place or the nucleus threshold, or a
        mass within TOP_P_MARGIN of it, asks the reference filter of the row."""
        kf = float(self.top_k) if self.top_k is not None else float(self.x.shape[1])
        x, w, i = self.x[rows], self.w[rows], i[:, None]  # [p, V], [p, V], [p, 1]
        gt, tied, above = standing(x, w, i, _scratch("cand", i.numel(), x.shape[1]).view(*i.shape, -1))
        in_k = gt + tied <= kf  # every id tied with it is in the top k
        keep, unsure = in_k, ~in_k & (gt < kf)  # a tie across the k-th place: the reference decides
        if self.top_p is not None:
            wi = w.gather(-1, i)  # [p, 1]
            keep_p, unsure_p = nucleus_decision(above, tied, wi, self.zl[rows], self.zh[rows], self.top_p)
            loose = (in_k & unsure_p & (self.zl[rows] < self.zh[rows]))[:, 0]  # [p]
            if self.br is not None and bool(loose.any()):  # the bounds leave it open: the exact top-k set
                rr = rows[loose].unique()
                self.br.put(rr, exact_top_k(self.x[rr], self.w[rr], self.top_k, self.br.rows(rr)))
                self.zl, self.zh = self.br.mass_bounds(self.top_k, self.m, self.wmax)
                keep_p, unsure_p = nucleus_decision(above, tied, wi, self.zl[rows], self.zh[rows], self.top_p)
            unsure = unsure | (in_k & unsure_p)
            keep = in_k & keep_p
        keep = keep[:, 0]
        for j in unsure[:, 0].nonzero()[:, 0].tolist():  # rare: ask the reference filter of that row
            keep[j] = self.reference(int(rows[j]), int(i[j, 0]))
        return keep

    def reference(self, r: int, j: int) -> bool:
        """The reference filter's word on id j of row r (rare: ties and masses at the threshold)."""
        if r not in self.kept_ref:
            self.kept_ref[r] = _reference_kept(self.x[r:r + 1], self.top_k, self.top_p)[0]
        return bool(self.kept_ref[r][j])


def _chunked(w: torch.Tensor) -> torch.Tensor | None:
    """w [n, V] (rows contiguous) viewed as [n, V / CHUNK, CHUNK] without a copy; None when V is not a multiple of
    CHUNK or the rows are not laid out for it."""
    n, V = w.shape
    if V % CHUNK or w.stride(1) != 1:
        return None
    return w.view(n, V // CHUNK, CHUNK)


@dataclass
class Cuts:
    """What :func:`filter_cuts` finds for a block of rows [n, 1] each: every id with a logit > ``keep`` is in the
    kept set, every id with a logit <= ``drop`` is not (+inf / -inf: no such cut); ``z_drop``: the weight above
    ``drop``; ``total``: the row's weight; ``[zl, zh]``: bounds of the top-k weight; ``br``: the top-k bracket
    (None without a top k)."""

    keep: torch.Tensor
    drop: torch.Tensor
    z_drop: torch.Tensor
    total: torch.Tensor
    zl: torch.Tensor
    zh: torch.Tensor
    br: Bracket | None


def filter_cuts(x: torch.Tensor, w2: torch.Tensor, m: torch.Tensor, top_k: int | None, top_p: float | None,
                buf: torch.Tensor, total: torch.Tensor | None = None, top: torch.Tensor | None = None,
                counted: tuple[torch.Tensor, torch.Tensor] | None = None) -> Cuts | None:
    """The :class:`Cuts` of the filter of :func:`filter_logits` on the rows of x [n, V] (``w2``: :func:`weights`;
    ``m``: each row's largest logit, finite; ``buf``: scratch of 2 n V floats; ``total``: each row's weight, if
    known; ``top``, ``counted``: the sample's largest values and the counts at :func:`top_k_marks`, if known,
    see :func:`top_k_bracket`): the top-k bracket (:func:`top_k_bracket`: one pass at two thresholds) and, with a
    nucleus, two thresholds around its edge placed from the sample (:func:`nucleus_marks`) and counted in a second pass;
    :func:`sure_cuts` turns the four into the cuts. None where a row has fewer than top_k finite logits."""
    n, V = x.shape
    wmax = torch.ones_like(m)  # the largest weight, exp(0)
    total = w2[:, 1].sum(-1, keepdim=True) if total is None else total  # [n, 1]
    limited = top_k is not None and top_k < V
    nucleus = top_p is not None and top_p < 1.0
    xs = strided_sample(x)  # [n, s]
    s = xs.shape[1]
    marks: list[tuple[torch.Tensor, ...]] = []  # (t, c, z) [n, 1] each: thresholds counted exactly
    br = None
    if limited:
        top = sample_top(x, top_k) if top is None else top  # [n, J] sorted
        br, zl, zh, ok = top_k_bracket(x, w2, m, wmax, top_k, buf, top, counted)
        if not bool(ok.all()):  # -inf at the k-th place
            return None
        marks += [(br.hi, br.c_hi, br.z_hi), (br.lo, br.c_lo, br.z_lo)]
        anchor, z_anchor = br.hi, br.z_hi
    else:
        zl = zh = total.double()
        top = xs.sort(-1, descending=True).values if nucleus else None  # [n, s]
        anchor, z_anchor = m, torch.zeros_like(m)  # nothing lies above the maximum
    if nucleus:  # two thresholds around the nucleus edge, counted in one pass: every draw above the upper one is
        # kept, every draw at or below the lower one dropped, without a pass of its own
        t = nucleus_marks(top, m, wmax, V / s, anchor, z_anchor, (top_p * 0.5 * (zl + zh)).float())  # [n, 2]
        t = torch.where(torch.isfinite(t), t, m)  # no sample value that far: a mark at the maximum
        c, z = counts_masses(x, w2, t, buf)
        marks += [(t[:, :1], c[:, :1], z[:, :1]), (t[:, 1:], c[:, 1:], z[:, 1:])]
    if not marks:  # nothing to filter
        return Cuts(torch.full_like(m, -math.inf), torch.full_like(m, -math.inf), total, total, zl, zh, br)
    kf = float(top_k) if limited else float(V)
    keep, drop, z_drop = sure_cuts(*(torch.cat(a, 1) for a in zip(*marks)), kf, zl, zh, top_p if nucleus else None)
    return Cuts(keep, drop, torch.where(z_drop.isnan(), total, z_drop), total, zl, zh, br)


def _draw_block(x: torch.Tensor, top_k: int | None, top_p: float | None, generator: torch.Generator | None,
                max_rounds: int) -> torch.Tensor:
    """:func:`_draw_filtered` for one block of rows x [n, V]."""
    n, V = x.shape
    m = x.amax(-1, keepdim=True)  # [n, 1]
    if not bool(torch.isfinite(m).all()):  # NaN, +inf, or nothing but -inf: the reference
        return _reference_sample(x, top_k, top_p, generator)
    x = x.contiguous()
    cw = torch.empty(n, V // CHUNK) if V % CHUNK == 0 else None  # [n, nc] the chunk sums of the weights
    limited = top_k is not None and top_k < V
    top = sample_top(x, top_k) if limited else None  # [n, J] the sample's largest, sorted descending
    buf = _scratch("buf", 2 * n, V)
    # the weights, their chunk sums and the counts at the first top-k bracket: one pass with the compiled passes
    w2, counted = weigh(x, m, cw, top_k_marks(top, m, top_k, V) if limited else None, buf)  # [n, 2, V] ones, weights
    w = w2[:, 1]  # [n, V]
    full_w = _chunked(w)  # [n, nc, C] the unfiltered weights, as a proposal (None: not laid out for it)
    cut = filter_cuts(x, w2, m, top_k, top_p, buf, None if cw is None else cw.sum(-1, keepdim=True), top, counted)
    if cut is None:  # -inf at the k-th place: the reference
        return _reference_sample(x, top_k, top_p, generator)
    # the proposal: all weights where at least FULL_PROPOSAL of them lie above the drop cut (which rejects the
    # rest without a pass), else the weights above the cut
    if full_w is not None and bool((cut.z_drop >= FULL_PROPOSAL * cut.total).all()):
        ws, c_draw = full_w, FULL_CANDIDATES
    else:
        Vp = -(-V // CHUNK) * CHUNK
        wl = _scratch("wl", n, Vp)  # [n, Vp] zero-padded to whole chunks
        wl[:, V:] = 0
        torch.gt(x, cut.drop, out=wl[:, :V]).mul_(w)
        ws, c_draw = wl.view(n, Vp // CHUNK, CHUNK), CANDIDATES
        cw = ws.sum(-1)
    cs = cw.double().cumsum_(-1)  # [n, nc]
    nucleus = top_p is not None and top_p < 1.0
    d = _Draw(x, w, m, torch.ones_like(m), top_k if limited else None, top_p if nucleus else None, cut.br, cut.zl,
              cut.zh, {})
    out = torch.empty(n, dtype=torch.long)
    todo = torch.arange(n)
    for _ in range(max_rounds):
        if not todo.numel():
            break
        full = len(todo) == n
        i = _inverse_cdf(ws, cs, None if full else todo, c_draw, generator)  # [r, c] vocabulary ids
        v = x.gather(-1, i) if full else x[todo[:, None], i]  # [r, c] their logits
        kt, dt = (cut.keep, cut.drop) if full else (cut.keep[todo], cut.drop[todo])
        keep, drop = v > kt, v <= dt  # [r, c] decided by the cuts
        open_ = ~keep & ~drop & (keep.cumsum(-1) == 0)  # undecided before the row's first certain keep
        if bool(open_.any()):  # the exact decision of those draws
            r, j = open_.nonzero().unbind(1)
            keep[r, j] = d.keeps(todo[r], i[r, j])
        done = keep.any(-1)  # [r]
        first = keep.to(torch.uint8).argmax(-1)  # [r] the first accepted draw: plain rejection sampling
        out[todo[done]] = i[done, first[done]]
        todo = todo[~done]
    if todo.numel():  # rejected max_rounds times (a tiny nucleus): the reference draw, still exact
        out[todo] = _reference_sample(x[todo], top_k, top_p, generator)
    return out


def _reference_sample(x: torch.Tensor, top_k: int | None, top_p: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """Draw over the sorted top-k candidates (torch.multinomial): the released sampler's way. x [R, V] -> [R]."""
    vals, idx = candidates(x, 1.0, top_k, top_p)
    probs = torch.softmax(vals, dim=-1).reshape(-1, vals.shape[-1])  # [R, k]
    pick = torch.multinomial(probs, 1, generator=generator).view(vals.shape[:-1])  # [R]
    return pick if idx is None else idx.gather(-1, pick.unsqueeze(-1)).squeeze(-1)


def sample_logits(logits: torch.Tensor, *, greedy: bool = False, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of logits [..., V] -> [...] (argmax when greedy, else a draw from the filtered softmax).

    CPU: :func:`_draw_filtered` (no sort and no top-k selection: a few counting passes and a rejection draw;
    the reference draw's distribution, not its draws for a seed). Other devices, and ``top_k`` <= 0, use the
    reference draw over the sorted candidates.
    """
    if greedy:
        return logits.argmax(dim=-1)
    lead, V = logits.shape[:-1], logits.shape[-1]
    x = logits.float()
    if temperature != 1.0:  # x / 1.0 is x: skip the pass
        x = x / temperature
    x = x.reshape(-1, V)  # [R, V]
    if x.device.type == "cpu" and (top_k is None or top_k > 0) and x.shape[0] > 0:
        return _draw_filtered(x, top_k, top_p, generator).view(lead)
    return _reference_sample(x, top_k, top_p, generator).view(lead)


def cfg_scale(scale: float, step: int, steps: int, schedule: str = "constant") -> float:
    """Guidance scale at ``step`` (0-based) of ``steps``: constant, or linear ``scale * (step + 1) / steps``."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return scale * (step + 1) / steps
    raise ValueError(f"unknown cfg schedule {schedule!r} (constant | linear)")


def cfg_combine(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits [2B, ...] (conditional rows, then unconditional) -> ``(1 + t) * cond - t * uncond`` [B, ...]."""
    cond, uncond = logits.chunk(2, dim=0)
    return (1 + scale) * cond - scale * uncond


# --------------------------------------------------------------------------------------
# the generation plan


@dataclass(frozen=True)
class Plan:
    """How ``num_new`` tokens after ``done`` given video tokens are produced: ``groups[s]`` tokens at step s;
    ``insert_after``: video token count after which ``insert`` ids are fed (hybrid middle bos; -1 = never)."""

    groups: tuple[int, ...]
    insert_after: int = -1
    insert: tuple[int, ...] = ()


def plan(task: TaskLayout, done: int, num_new: int) -> Plan:
    """Groups for generating video tokens ``done .. done+num_new-1`` (block order).

    ``done`` counts the video tokens already in the prompt (frame_pred: the context). It must sit on a
    group boundary, and frame_pred needs at least one context block (nothing predicts its first block).
    """
    B, N = task.block_size, task.num_tokens
    if done + num_new > N:
        raise ValueError(f"{done} given + {num_new} new tokens exceed the video's {N} tokens")
    if task.task == "hybrid":
        bounds = list(range(0, B)) + list(range(B, N + 1, B))
    else:
        bounds = list(range(B if task.task == "frame_pred" else 0, N + 1, B))
    if done not in bounds or done + num_new not in bounds:
        raise ValueError(f"generation must start and stop on a block boundary: {done} given, {num_new} new "
                         f"(block {B}, task {task.task})")
    edges = [b for b in bounds if done <= b <= done + num_new]
    groups = tuple(b - a for a, b in zip(edges[:-1], edges[1:]))
    if task.task == "hybrid":
        return Plan(groups, insert_after=B, insert=tuple(task.middle_ids.tolist()))
    return Plan(groups)


def count_steps(task: TaskLayout, done: int | None = None, num_new: int | None = None) -> int:
    """Forward passes to generate ``num_new`` tokens after ``done`` (default: a full video from the prompt)."""
    done = task.context_len if done is None else done
    num_new = task.num_tokens - done if num_new is None else num_new
    return len(plan(task, done, num_new).groups)


def video_start(task: TaskLayout) -> int:
    """Index in a user-layout id row where the video ids begin (after condition and start ids)."""
    return 0 if task.task == "frame_pred" else task.cond_len + task.start_ids.numel()


def to_model_layout(task: TaskLayout, ids: torch.Tensor) -> torch.Tensor:
    """User-layout ids [B, L] (hybrid: no middle bos) -> model-layout ids (hybrid: middle bos after v_{B-1})."""
    if task.task != "hybrid":
        return ids
    cut = video_start(task) + task.block_size
    if ids.shape[1] < cut:
        return ids
    mid = task.middle_ids.to(ids.device)[None].expand(ids.shape[0], -1)  # [B, B-1]
    return torch.cat([ids[:, :cut], mid, ids[:, cut:]], dim=1)


def from_model_layout(task: TaskLayout, ids: torch.Tensor) -> torch.Tensor:
    """Model-layout ids -> user layout (hybrid: the middle-bos positions removed)."""
    if task.task != "hybrid":
        return ids
    cut = video_start(task) + task.block_size
    if ids.shape[1] <= cut:
        return ids
    return torch.cat([ids[:, :cut], ids[:, cut + task.block_size - 1:]], dim=1)


# --------------------------------------------------------------------------------------
# forward passes


def layout_logits(model: GPT, task: TaskLayout, ids: torch.Tensor) -> torch.Tensor:
    """Model-layout ids [B, L] -> logits [B, L, V] under the task's attention mask (one full forward)."""
    return model(ids, task.dense_mask(ids.shape[1], device=ids.device))


def step_mask(task: TaskLayout, start: int, length: int, device=None, bid: list[int] | None = None) -> torch.Tensor | None:
    """Mask rows [length, start+length] of a cached step, or None when they see everything (a whole block).

    ``bid``: the task's block ids of the whole sequence as a list (generation computes it once), which
    answers the common case without tensor work: block ids never decrease, so every row sees every key
    exactly when the first and last fed positions share a block."""
    if bid is not None and bid[start] == bid[start + length - 1]:
        return None
    bid = task.block_ids(start + length)
    rows = bid[None, :] <= bid[start:, None]  # [length, start+length]
    return None if bool(rows.all()) else rows.to(device)


def prefill(model: GPT, task: TaskLayout, ids: torch.Tensor, cache: KVCache, uncond: torch.Tensor | None = None,
            last: int | None = None, vocab: tuple[int, int] | None = None, hidden: bool = False) -> torch.Tensor:
    """Run the prompt [B, P] once into the cache -> logits [B, P, V] (or of its ``last`` positions only;
    ``vocab`` (lo, hi): of those vocabulary ids only; ``hidden``: the head's input [B, P or last, C] instead)."""
    mask = task.dense_mask(ids.shape[1], device=ids.device)
    return model(ids, mask, cache=cache, start=0, uncond=uncond, last=last, vocab=vocab, hidden=hidden)


def decode_step(model: GPT, task: TaskLayout, ids: torch.Tensor, cache: KVCache, start: int,
                uncond: torch.Tensor | None = None, last: int | None = None, bid: list[int] | None = None,
                vocab: tuple[int, int] | None = None, hidden: bool = False) -> torch.Tensor:
    """Feed ids [B, n] at positions start..start+n-1: they attend to the cache and to each other -> logits [B, n, V]
    (or of the ``last`` positions only; ``vocab``: of vocabulary ids lo..hi-1 only; ``hidden``: the head's input
    [B, n or last, C] instead). ``bid``: see :func:`step_mask`."""
    mask = step_mask(task, start, ids.shape[1], ids.device, bid)
    return model(ids, mask, cache=cache, start=start, uncond=uncond, last=last, vocab=vocab, hidden=hidden)


class StaticDecoder:
    """Fixed-shape decode steps over one preallocated cache (:meth:`GPT.static_step`), for GPU decoding that
    is not bound by Python and kernel launches.

    ``mode``: ``"static"`` runs the fixed-shape step eagerly (any device; equals :func:`decode_step`);
    ``"graph"`` captures it once per input shape in a CUDA graph and replays it (CUDA only); ``"compile"``
    runs it through ``torch.compile`` (fused kernels), captured in a CUDA graph on CUDA. The step reads its
    inputs from static buffers: ids are copied in, the position offset is a 0-d device tensor. ``vocab``
    (lo, hi): the head computes the logits of those ids only.
    """

    MODES = ("static", "graph", "compile")

    def __init__(self, model: GPT, cache: KVCache, mode: str = "static", vocab: tuple[int, int] | None = None):
        if mode not in self.MODES:
            raise ValueError(f"unknown decoder {mode!r} (eager | {' | '.join(self.MODES)})")
        dev = cache.k.device
        if mode == "graph" and dev.type != "cuda":
            raise ValueError("decoder 'graph' needs CUDA (use 'static' elsewhere)")
        self.model, self.cache, self.mode, self.vocab = model, cache, mode, vocab
        self.limit = min(model.config.n_positions, cache.max_len)
        self.start = torch.zeros((), dtype=torch.long, device=dev)
        self.fn = model.static_step
        if mode == "compile":
            self.fn = torch.compile(model.static_step, dynamic=False, fullgraph=True)
        self.capture = dev.type == "cuda" and mode in ("graph", "compile")
        self.graphs: dict = {}  # (ids shape, last) -> (ids buffer, graph, logits buffer)

    def __call__(self, ids: torch.Tensor, start: int, last: int | None = None) -> torch.Tensor:
        """ids [B, L] at positions start..start+L-1 -> logits [B, last or L, V] (of the ``vocab`` ids only, when
        given; a buffer reused by the next call)."""
        if start + ids.shape[1] > self.limit:
            raise ValueError(f"positions up to {start + ids.shape[1] - 1} exceed the {self.limit} slots")
        self.start.fill_(start)
        if not self.capture:
            return self.fn(ids, self.start, self.cache, last, self.vocab)
        key = (tuple(ids.shape), last)
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids, last)
        buf, graph, out = self.graphs[key]
        buf.copy_(ids)
        graph.replay()
        return out

    def _capture(self, ids: torch.Tensor, last: int | None):
        """Warm up on a side stream (compilation, library workspaces), then record one step. Warm-up and
        capture write this step's own keys/values into the cache, which the replay writes again."""
        buf = ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(buf, self.start, self.cache, last, self.vocab)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(buf, self.start, self.cache, last, self.vocab)
        return buf, graph, out


# --------------------------------------------------------------------------------------
# generation

NARROW_THREADS = 1  # threads of a CPU decode step's small ops (fast path); the wide linears keep the caller's
WIDE_DRAW = 1 << 18  # logits of at least this many entries are filtered and drawn on the caller's threads


@torch.no_grad()
def generate(model: GPT, task: TaskLayout, prefix_ids: torch.Tensor, max_new_tokens: int | None = None, *,
             greedy: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             cfg: float | None = None, cfg_schedule: str = "constant", generator: torch.Generator | None = None,
             show_progress: bool = False, on_step=None, decoder: str = "eager", fast: bool = True) -> torch.Tensor:
    """User-layout prefix [B, P] (condition, start ids, optionally the first video ids) -> prefix + new ids.

    ``max_new_tokens`` defaults to the rest of the video. For the hybrid layout the middle-bos ids are
    inserted and removed here: the result holds only condition, bov and video ids. ``on_step(step)`` is
    called before each forward pass (for counting and timing). ``decoder``: ``"eager"`` (default) or a
    :class:`StaticDecoder` mode (``"static"``, ``"graph"``, ``"compile"``) for the decode steps that feed a
    whole block past the condition; the prefill and other steps stay eager. Greedy output is the same.

    Every forward computes the head over the video ids only (the logits that are sampled). ``fast`` (default):
    on CPU the model's linears get packed copies (:meth:`GPT.fast_cpu`, attached to the model and kept for
    later calls; fp32 stays fp32) and the decode steps after the prefill run their small ops on one thread
    (:func:`nbp.generator.model.decode_threads`); ``fast=False`` runs plain ``F.linear`` even where packs are attached.
    Greedy steps without guidance take their ids from :meth:`GPT.greedy_ids` (on the fast CPU path, for a few rows:
    the screened head, the argmax of the logits in float64; elsewhere the argmax of the fp32 logits).
    """
    prefix_ids = prefix_ids.long()
    Bsz, dev = prefix_ids.shape[0], prefix_ids.device
    start_v = video_start(task)
    if prefix_ids.shape[1] < start_v or (task.task == "frame_pred" and prefix_ids.shape[1] == 0):
        raise ValueError(f"prefix of {prefix_ids.shape[1]} ids is shorter than the task's prompt ({start_v})")
    done = prefix_ids.shape[1] - start_v
    num_new = task.num_tokens - done if max_new_tokens is None else int(max_new_tokens)
    p = plan(task, done, num_new)
    guided = cfg is not None and cfg != 0
    if guided and task.cond_len == 0:
        raise ValueError(f"classifier-free guidance needs a condition; task {task.task!r} has none")
    rows = 2 * Bsz if guided else Bsz
    uncond = torch.arange(rows, device=dev) >= Bsz if guided else None  # [rows]: True on the unconditional half

    ids = to_model_layout(task, prefix_ids)
    total = ids.shape[1] + num_new + (len(p.insert) if done < p.insert_after <= done + num_new else 0)
    cache = KVCache.for_model(model, rows, max_len=total)
    lo, hi = task.video_offset, task.video_offset + task.video_vocab
    static = None if decoder == "eager" else StaticDecoder(model, cache, decoder, vocab=(lo, hi))
    bid = task.block_ids(total).tolist()  # block id per position, for the per-step mask test
    out, pos, made = [ids], 0, done
    feed = ids
    steps = range(len(p.groups))
    narrow = fast and dev.type == "cpu"
    if narrow:
        model.fast_cpu()
    with contextlib.ExitStack() as stack:
        if not fast:
            stack.enter_context(plain_linears())
        for s in progress(steps, desc="sampling", leave=False) if show_progress else steps:
            if on_step is not None:
                on_step(s)
            if s == 1 and narrow:  # after the prefill
                stack.enter_context(decode_threads(NARROW_THREADS))
            x = feed.repeat(2, 1) if guided else feed  # [rows, n]
            n = p.groups[s]  # the last n fed positions predict the next group
            use_static = s > 0 and static is not None and pos >= task.cond_len and bid[pos] == bid[pos + x.shape[1] - 1]
            head = greedy and not guided and not use_static  # the model's greedy head picks from the hidden states
            if s == 0:
                out_s = prefill(model, task, x, cache, uncond, last=n, vocab=(lo, hi), hidden=head)
            elif use_static:
                out_s = static(x, pos, last=n)  # a whole block: no mask inside it
            else:
                out_s = decode_step(model, task, x, cache, pos, uncond, last=n, bid=bid, vocab=(lo, hi), hidden=head)
            pos += feed.shape[1]
            if head:
                new = model.greedy_ids(out_s, (lo, hi)) + lo  # [B, n], from the hidden states [B, n, C]
            else:
                logits = out_s  # [rows, n, V_video]
                if guided:
                    logits = cfg_combine(logits, cfg_scale(cfg, s, len(p.groups), cfg_schedule))
                with wide_threads(logits.numel() >= WIDE_DRAW):  # the draw's passes over the logits
                    new = sample_logits(logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=generator) + lo  # [B, n]
            made += n
            feed = new
            if made == p.insert_after:
                feed = torch.cat([new, torch.tensor(p.insert, device=dev)[None].expand(Bsz, -1)], dim=1)  # [B, n + B-1]
            out.append(feed)
    return from_model_layout(task, torch.cat(out, dim=1))[:, : prefix_ids.shape[1] + num_new]


def codes_of(task: TaskLayout, ids: torch.Tensor) -> torch.Tensor:
    """User-layout ids of complete videos [B, L] -> codes [B, T, H, W] (grid order)."""
    vid = ids[:, video_start(task):]
    if vid.shape[1] != task.num_tokens:
        raise ValueError(f"expected {task.num_tokens} video ids, got {vid.shape[1]}")
    return task.layout.from_blocks(task.codes(vid))


def prompt_ids(task: TaskLayout, labels: torch.Tensor | None = None, context: torch.Tensor | None = None,
               batch: int | None = None) -> torch.Tensor:
    """The generation prompt: class labels [B] (class, hybrid), context codes [B, T, H, W] (frame_pred: its
    first ``context_frames`` latent frames are used), or ``batch`` (uncond)."""
    if task.task == "frame_pred":
        if context is None:
            raise ValueError("frame prediction needs context codes")
        T = task.layout.grid[0]
        if context.shape[1] < T:  # only the context frames given: pad the grid (the padding is never read)
            pad = context.new_zeros(context.shape[0], T - context.shape[1], *context.shape[2:])
            context = torch.cat([context, pad], dim=1)  # [B, T, H, W]
        seq = task.layout.to_blocks(context.long())[:, : task.context_len]  # [B, context_len] block order
        return task.prompt(context=seq)
    if task.task == "uncond":
        return task.prompt(batch=batch)
    if labels is None:
        raise ValueError(f"task {task.task!r} needs class labels")
    return task.prompt(cond=task.cond_ids(labels))
