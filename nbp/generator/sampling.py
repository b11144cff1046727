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
  released sampler sorts the full vocabulary once per position in a Python loop. With no top-k the
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
from dataclasses import dataclass

import torch

from nbp.generator.layout import TaskLayout
from nbp.generator.model import GPT, KVCache, decode_threads, plain_linears
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


def _reference_kept(x: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Kept ids [R, V] (bool) of the reference filter on already temperature-scaled logits x [R, V]."""
    return torch.isfinite(filter_logits(x, 1.0, top_k, top_p))


def nucleus_test(x: torch.Tensor, w: torch.Tensor, z: torch.Tensor, i: torch.Tensor,
                 top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Is candidate i [n, 1] of each row of the top-k logits x [n, k] (any order; their softmax w, total z
    [n, 1]) in the top-p nucleus? -> (keep [n], unsure [n]) bool.

    The reference keeps the candidate of sorted rank r when the mass of ranks < r, over z, is <= top_p; the
    ids ranked before i are those with larger logits, plus some of the ids tied with it (their order comes
    from the sort). ``keep`` is certain; ``unsure`` marks ties across the threshold and masses within
    ``TOP_P_MARGIN`` of it, where two float summation orders could decide differently.
    """
    V = x.shape[-1]
    v = x.gather(-1, i)  # [n, 1]
    sgn = (x - v).sign_()  # [n, V]: 1 above the id, 0 tied with it, -1 below
    above = sgn.clamp_min(0).mul_(w).sum(-1).double()  # [n] mass of the larger logits
    tied = V - sgn.abs_().sum(-1)  # [n] ids sharing its logit (>= 1)
    wi = w.gather(-1, i)[:, 0].double()
    before_lo = above / z[:, 0]  # mass before the first of the tied ids
    before_hi = (above + (tied - 1) * wi) / z[:, 0]  # mass before the last of them
    keep = before_hi <= top_p - TOP_P_MARGIN
    unsure = ~keep & (before_lo <= top_p + TOP_P_MARGIN)
    return keep, unsure


def _draw_filtered(x: torch.Tensor, top_k: int | None, top_p: float | None,
                   generator: torch.Generator | None, max_rounds: int = 64) -> torch.Tensor:
    """One id per row of temperature-scaled logits x [R, V], distributed as softmax over the kept set of
    :func:`filter_logits`, without sorting the candidates: rejection sampling.

    The top-k set comes from ``torch.topk(sorted=False)``: the same selection as the reference's sorted
    top-k (ties included), without its sort of the k survivors. The proposal is the softmax over the
    survivors, drawn by inverting its cumulative sum (float64, survivors in topk's order) with one uniform
    per row. A draw is accepted when it is in the top-p nucleus (:func:`nucleus_test`; ties across the
    threshold and masses within ``TOP_P_MARGIN`` of it ask the reference filter of that row). Accepted draws
    follow the proposal restricted to the kept set, i.e. exactly the filtered softmax; the acceptance rate is
    the kept share of the top-k mass, > top_p, so about 1.1 rounds at top_p 0.9.
    """
    R, V = x.shape
    if top_k is not None and top_k < V:
        vals, idx = torch.topk(x, top_k, dim=-1, sorted=False)  # [R, k] the top-k set, unsorted
    else:
        vals, idx = x, None
    w = torch.softmax(vals, dim=-1)  # [R, k]
    cum = w.double().cumsum(-1)  # [R, k]
    z = cum[:, -1:]  # [R, 1] (1 up to rounding)
    K = vals.shape[-1]
    out = torch.empty(R, dtype=torch.long)
    nucleus = top_p is not None and top_p < 1.0
    kept_ref: dict[int, torch.Tensor] = {}
    todo = torch.arange(R)
    for _ in range(max_rounds):
        if not todo.numel():
            break
        full = todo.numel() == R
        vs, ws, cs, zs = (vals, w, cum, z) if full else (vals[todo], w[todo], cum[todo], z[todo])
        u = torch.rand(todo.numel(), 1, dtype=torch.float64, generator=generator) * zs  # [n, 1]
        i = torch.searchsorted(cs, u, right=True)  # [n, 1] first survivor whose cumulative mass exceeds u
        accept = i[:, 0] < K
        i = i.clamp_max(K - 1)
        if nucleus:
            keep, unsure = nucleus_test(vs, ws, zs, i, top_p)
            for r in unsure.nonzero().squeeze(-1).tolist():  # rare: ask the reference filter
                row = int(todo[r])
                if row not in kept_ref:
                    kept_ref[row] = _reference_kept(x[row:row + 1], top_k, top_p)[0]
                vocab_id = i[r, 0] if idx is None else idx[row, i[r, 0]]
                keep[r] = kept_ref[row][vocab_id]
            accept &= keep
        ids = i if idx is None else (idx if full else idx[todo]).gather(-1, i)  # [n, 1] vocabulary ids
        out[todo[accept]] = ids[accept, 0]
        todo = todo[~accept]
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

    CPU: :func:`_draw_filtered` (no sort of the candidates; the reference draw's distribution, not its draws
    for a seed). Other devices, and ``top_k`` <= 0, use the reference draw over the sorted candidates.
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
            last: int | None = None, vocab: tuple[int, int] | None = None) -> torch.Tensor:
    """Run the prompt [B, P] once into the cache -> logits [B, P, V] (or of its ``last`` positions only;
    ``vocab`` (lo, hi): of those vocabulary ids only)."""
    mask = task.dense_mask(ids.shape[1], device=ids.device)
    return model(ids, mask, cache=cache, start=0, uncond=uncond, last=last, vocab=vocab)


def decode_step(model: GPT, task: TaskLayout, ids: torch.Tensor, cache: KVCache, start: int,
                uncond: torch.Tensor | None = None, last: int | None = None, bid: list[int] | None = None,
                vocab: tuple[int, int] | None = None) -> torch.Tensor:
    """Feed ids [B, n] at positions start..start+n-1: they attend to the cache and to each other -> logits [B, n, V]
    (or of the ``last`` positions only; ``vocab``: of vocabulary ids lo..hi-1 only). ``bid``: see :func:`step_mask`."""
    mask = step_mask(task, start, ids.shape[1], ids.device, bid)
    return model(ids, mask, cache=cache, start=start, uncond=uncond, last=last, vocab=vocab)


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
            if s == 0:
                logits = prefill(model, task, x, cache, uncond, last=n, vocab=(lo, hi))  # [rows, n, V_video]
            elif static is not None and pos >= task.cond_len and bid[pos] == bid[pos + x.shape[1] - 1]:
                logits = static(x, pos, last=n)  # a whole block: no mask inside it
            else:
                logits = decode_step(model, task, x, cache, pos, uncond, last=n, bid=bid, vocab=(lo, hi))
            pos += feed.shape[1]
            if guided:
                logits = cfg_combine(logits, cfg_scale(cfg, s, len(p.groups), cfg_schedule))
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
