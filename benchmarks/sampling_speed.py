"""Sampling speed: NBP vs NTP generation with the same weights, greedy and sampled in one process, and one
cached decode step vs the bare transformer forward of the same shapes.

Writes the ``sampling_speed`` section of ``results/speed.md`` (one section per device type):

- generation of a K600-protocol video (2 latent context frames given, the remaining tokens generated) with
  block 1x1x16 (NBP) and 1x1x1 (NTP), batch 1: greedy, the released evaluation filter (top-k 16,000, top-p
  0.9) with our sort-free sampler, and (NBP) the same filter with the sort-based reference draw; each with the
  fast CPU linears (``generate``'s default: packed weights, small ops of a decode step on one thread) and,
  for comparison, greedy (and NBP sampled) with the plain path (``fast=False``: ``F.linear``, every op on all
  threads). Runs are interleaved (each repeat runs every setting once, greedy and sampled back to back),
  reported as median and min-max over the repeats, with the load average before and after (the tokenizer is
  not included here; ``eval_generator``'s ``fps`` includes it);
- one decode step of a block at a given prefix, fast and plain: our cached step (slices of the preallocated
  cache), the fixed-shape step (:meth:`GPT.static_step`), the *bare* forward (the same matmuls, with the same
  linear kernels and threads, layer norms and attention as plain functional calls over ready-made keys/values:
  no cache writes, masks or module calls) and a full forward over prefix + block (what a sampler without a
  cache pays);
- the hardware limits: weight and cache bytes per step over the measured read bandwidth, FLOPs over the
  measured sgemm rate, and the fraction of that limit each generation reaches.

    python benchmarks/sampling_speed.py                       # 4 layers, width 512, 64K vocabulary (the issue's setting)
    python benchmarks/sampling_speed.py --profile             # also: torch.profiler summary of one NBP sampled run
    python benchmarks/sampling_speed.py --tiny --repeats 1    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nbp.generator import kernels
from nbp.generator import model as M
from nbp.generator import sampling as S
from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, GPTConfig, KVCache, decode_threads, fast_linear, plain_linears
from nbp.io import write_markdown_section

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_seeds import machine  # noqa: E402

KEY = "sampling_speed"
LOADS: list[float] = []  # 1-minute load average after each timed generation
FILTERS = {"greedy": dict(greedy=True), "top-k 16000, top-p 0.9": dict(top_k=16000, top_p=0.9)}
REFERENCE = "top-k 16000, top-p 0.9, sort-based reference draw"
TORCH_OPS = "top-k 16000, top-p 0.9, torch-op passes"  # the sort-free draw without the compiled passes
NO_SCREEN = "noscreen"  # the fast path with the greedy head over fp32 logits (no screen)
BEFORE = "before"  # ... and oneDNN's one-row linears instead of the compiled GEMV (the rule of session 13)
ABLATIONS = {NO_SCREEN: "fast, head not screened (fp32 logits)",
             BEFORE: "fast, head not screened, oneDNN one-row linears (no compiled GEMV)"}
SAMPLED = "top-k 16000, top-p 0.9"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


@contextlib.contextmanager
def ablation(kind):
    """Greedy heads over fp32 logits (no screen: ``SCREEN_ROWS`` 0) and, for :data:`BEFORE`, one-row linears through
    oneDNN (no compiled GEMV: ``GEMV_ROWS`` 0)."""
    old = M.SCREEN_ROWS, M.GEMV_ROWS
    M.SCREEN_ROWS = 0
    if kind == BEFORE:
        M.GEMV_ROWS = 0
    try:
        yield
    finally:
        M.SCREEN_ROWS, M.GEMV_ROWS = old


@contextlib.contextmanager
def reference_draw():
    """Route every sampled draw through the sort-based reference (torch.topk sorted + multinomial)."""
    fast = S._draw_filtered
    S._draw_filtered = lambda x, top_k, top_p, generator, **_: S._reference_sample(x, top_k, top_p, generator)
    try:
        yield
    finally:
        S._draw_filtered = fast


def frame_task(grid, block, vocab, context_frames) -> TaskLayout:
    return TaskLayout("frame_pred", BlockLayout(tuple(grid), tuple(block)), vocab, context_frames=context_frames)


def settings(a) -> list[tuple[str, tuple, str, bool | str]]:
    """(mode, block, filter, linears) of every generation row; linears: True fast, False plain, or
    a key of :data:`ABLATIONS` (fast, without the screen or the compiled GEMV)."""
    out = []
    for mode, block in (("NBP", (1, 1, a.block)), ("NTP", (1, 1, 1))):
        out += [(mode, block, f, True) for f in FILTERS]
        if mode == "NBP" and a.reference:
            out.append((mode, block, REFERENCE, True))
        if mode == "NBP" and kernels.enabled():
            out.append((mode, block, TORCH_OPS, True))
        if a.plain:
            out += [(mode, block, f, False) for f in (FILTERS if mode == "NBP" else ["greedy"])]
        if mode == "NTP" and a.ablations and kernels.compiled():
            out += [(mode, block, "greedy", k) for k in ABLATIONS]
    return out


def variant(fname: str, fast) -> contextlib.AbstractContextManager:
    """The context a generation row runs in: the reference draw, the torch-op passes, an ablation, or nothing."""
    if fname == REFERENCE:
        return reference_draw()
    if fname == TORCH_OPS:
        return kernels.torch_ops()
    return ablation(fast) if fast in ABLATIONS else contextlib.nullcontext()


def bench_generation(model, a, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, a.vocab, (a.batch, *a.grid), generator=g)
    runs = {}
    for mode, block, fname, fast in settings(a):
        task = frame_task(a.grid, block, a.vocab, a.context_frames)
        kw = FILTERS.get(fname, FILTERS[SAMPLED])
        rng = torch.Generator(device=device).manual_seed(0)
        prompt = S.prompt_ids(task, context=context).to(device)
        runs[(mode, fname, fast)] = (task, functools.partial(S.generate, model, task, prompt, generator=rng,
                                                             fast=bool(fast), **kw))
    outs = {}
    for key, (_, fn) in runs.items():  # warm-up, one each (and the packs are built)
        with variant(key[1], key[2]):
            outs[key] = fn()
    times = {key: [] for key in runs}
    for _ in range(a.repeats):
        for key, (_, fn) in runs.items():
            with variant(key[1], key[2]):
                times[key].append(once(fn, device))
            LOADS.append(os.getloadavg()[0])
    rows = []
    for (mode, fname, fast), (task, _) in runs.items():
        new = task.num_tokens - task.context_len
        sp = spread(times[(mode, fname, fast)])
        same = None if fast is True or fname != "greedy" else torch.equal(outs[(mode, fname, True)], outs[(mode, fname, fast)])
        rows.append({"mode": mode, "block": "x".join(map(str, task.layout.block)), "filter": fname, "fast": fast,
                     "steps": S.count_steps(task), **sp, "tokens_per_s": a.batch * new / sp["median"], "same": same,
                     "task": task})
    return rows


def bare_forward(model: GPT, ids: torch.Tensor, start: int, kv: list[tuple[torch.Tensor, torch.Tensor]],
                 fast: bool = False) -> torch.Tensor:
    """The decode step's arithmetic as plain functional calls: ids [B, n] at positions start.., keys/values
    per layer ready [B, nh, start+n, hs] -> logits [B, n, V]. ``fast``: the linears through the model's packs
    (:meth:`GPT.fast_cpu`), the same kernels as the fast cached step."""
    B, n = ids.shape
    C = model.config.n_embd
    nh = model.config.n_head

    def lin(x, m):
        return fast_linear(x, m.weight, m.bias, m.__dict__.get("pack") if fast else None)

    x = F.embedding(ids, model.tok_emb.weight) + model.pos_emb[0, start:start + n]  # [B, n, C]
    for blk, (k, v) in zip(model.blocks, kv):
        at = blk.attn
        h = F.layer_norm(x, (C,), blk.ln1.weight, blk.ln1.bias)
        if at.fused:  # one matmul for query, key and value, as the model's own step
            q = fast_linear(h, at.qkv_weight, at.qkv_bias, at.__dict__.get("qkv_pack") if fast else None)[..., :C]
        else:
            q = lin(h, at.query)
            lin(h, at.key)  # the new keys/values are computed (and dropped) as in a real step
            lin(h, at.value)
        q = q.reshape(B, n, nh, C // nh).transpose(1, 2)  # [B, nh, n, hs]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, C)  # [B, n, C]
        x = x + lin(y, at.proj)
        h = F.layer_norm(x, (C,), blk.ln2.weight, blk.ln2.bias)
        x = x + lin(F.gelu(lin(h, blk.mlp[0])), blk.mlp[2])
    return lin(F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias), model.head)


def bench_step(model, a, device) -> list[dict]:
    """One decode step, fast (packs, small ops on one thread as in ``generate``) and plain (``F.linear``)."""
    rows = []
    narrow = device.type == "cpu"
    for mode, block in (("NBP", (1, 1, a.block)), ("NTP", (1, 1, 1))):
        task = frame_task(a.grid, block, a.vocab, a.context_frames)
        B, P = task.block_size, a.prefix
        ids = torch.randint(0, a.vocab, (a.batch, P + B), device=device)
        cache = KVCache.for_model(model, a.batch, max_len=P + B)
        with torch.no_grad():
            S.prefill(model, task, ids[:, :P], cache)
            S.decode_step(model, task, ids[:, P:], cache, P)
            kv = [(cache.k[i].clone(), cache.v[i].clone()) for i in range(model.config.n_layer)]  # [B, nh, P+B, hs]
            start = torch.tensor(P, device=device)
            bid = task.block_ids(P + B).tolist()  # as generate passes it: a whole block needs no mask
            step = {"cached": functools.partial(S.decode_step, model, task, ids[:, P:], cache, P, bid=bid),
                    "static": functools.partial(model.static_step, ids[:, P:], start, cache),
                    "full": functools.partial(model, ids, task.dense_mask(P + B, device=device))}
            fns = {}
            for fast in (True, False):
                tag = "" if fast else "plain_"
                for name, fn in step.items():
                    fns[tag + name] = (fast, fn)
                fns[tag + "bare"] = (fast, functools.partial(bare_forward, model, ids[:, P:], P, kv, fast))

            def run(fast, fn):
                with (decode_threads() if fast and narrow else contextlib.nullcontext()), \
                        (contextlib.nullcontext() if fast else plain_linears()):
                    return once(fn, device)

            for fast, fn in fns.values():
                run(fast, fn)
            t = {name: [] for name in fns}
            for r in range(a.repeats * 5):  # interleaved
                for name, (fast, fn) in fns.items():
                    if not name.endswith("full") or r % 5 == 0:
                        t[name].append(run(fast, fn))
        med = {name: spread(v) for name, v in t.items()}
        rows.append({"mode": mode, "prefix": P, "new": B, **{f"{n}_ms": {k: 1e3 * x for k, x in s.items() if k != "n"}
                                                            for n, s in med.items()}, "n": med["cached"]["n"]})
    return rows


def hardware(a, device) -> dict:
    """Measured read bandwidth (sum over 256 MB) and sgemm rate (2048^3), median of 5, on the set threads."""
    if device.type != "cpu":
        return {}
    n = (256 << 20) // 4 if not a.tiny else (8 << 20) // 4
    x = torch.ones(n)
    bw = [x.numel() * 4 / once(x.sum, device) for _ in range(6)][1:]
    m = 2048 if not a.tiny else 256
    p, q = torch.randn(m, m), torch.randn(m, m)
    fl = [2 * m ** 3 / once(lambda: p @ q, device) for _ in range(6)][1:]
    return {"bw": statistics.median(bw), "flops": statistics.median(fl), "bw_range": (min(bw), max(bw)),
            "flops_range": (min(fl), max(fl)), "bw_mb": n * 4 >> 20, "m": m}


def step_cost(model: GPT, n: int, prefix: int, vocab: int, last: int | None = None,
              head_bytes: int = 4) -> tuple[float, float]:
    """(bytes read, FLOPs) of one forward of n new tokens after ``prefix`` cached ones, head over ``vocab`` ids
    for the ``last`` positions (default n): every block and head weight once (the head at ``head_bytes`` a weight:
    1 for the screened greedy head's int8 copy), the cache of every layer once."""
    c = model.config
    C, L = c.n_embd, c.n_layer
    block = sum(m.weight.numel() + m.bias.numel() for b in model.blocks
                for m in (b.attn.query, b.attn.key, b.attn.value, b.attn.proj, b.mlp[0], b.mlp[2]))
    head = vocab * C
    kv = 2 * L * (prefix + n) * C
    flops = 2 * n * block + 2 * (last or n) * head + 4 * L * n * (prefix + n) * C  # matmuls + attention (QK^T, AV)
    return 4.0 * (block + kv) + head_bytes * head, float(flops)


def generation_limit(model: GPT, task, hw: dict, head_bytes: int = 4) -> float:
    """Seconds one generation needs at the measured limits: the prefill at the sgemm rate, every decode step at
    max(bytes / bandwidth, FLOPs / sgemm rate) (``head_bytes``: see :func:`step_cost`)."""
    p = S.plan(task, task.context_len, task.num_tokens - task.context_len)
    P = task.context_len
    _, f0 = step_cost(model, P, 0, task.video_vocab, last=p.groups[0])
    total, pos = f0 / hw["flops"], P
    for g in p.groups[:-1]:  # the step after group s feeds it (the last group is not fed)
        by, fl = step_cost(model, g, pos, task.video_vocab, head_bytes=head_bytes)
        total += max(by / hw["bw"], fl / hw["flops"])
        pos += g
    return total


def profile_runs(model, a, device, rows: int = 12) -> tuple[str, list[tuple[str, float, list]]]:
    """torch.profiler (self CPU time) of one NBP sampled generation and one NTP greedy generation of
    ``a.profile_ntp`` tokens, plain path then fast path -> (printed tables, [(name, seconds, top ops)])."""
    from torch.profiler import ProfilerActivity, profile

    context = torch.randint(0, a.vocab, (a.batch, *a.grid), generator=torch.Generator().manual_seed(0))
    out, summary = [], []
    for mode, block, fname, new in (("NBP", (1, 1, a.block), SAMPLED, None), ("NTP", (1, 1, 1), "greedy", a.profile_ntp)):
        task = frame_task(a.grid, block, a.vocab, a.context_frames)
        prompt = S.prompt_ids(task, context=context).to(device)
        for fast in (False, True):
            name = f"{mode} {fname}{'' if new is None else f', {new} new tokens'}, {'fast' if fast else 'plain'}"
            fn = functools.partial(S.generate, model, task, prompt, new, generator=torch.Generator().manual_seed(0),
                                   fast=fast, **FILTERS[fname])
            fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sec = once(fn, device)
            ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in ev)
            summary.append((name, sec, [(e.key, e.self_cpu_time_total / total, e.count) for e in ev[:5]]))
            out.append(f"== {name}: {sec:.2f} s ==\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                                    row_limit=rows))
    return "\n".join(out), summary


def screened(r: dict, a) -> bool:
    """Did this generation row's greedy head go through the screen (fast CPU path, few rows a step)?"""
    rows = a.batch * math.prod(r["task"].layout.block)
    return (r["fast"] is True and r["filter"] == "greedy" and rows <= M.SCREEN_ROWS and kernels.compiled()
            and a.device == "cpu")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    width = f", compiled passes at {kernels.width()} floats a vector" if kernels.enabled() else ""
    return f"CPU {machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}{width}"


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown(gen_rows, step_rows, a, device, cmd, load, hw=None, prof=None) -> str:
    during = f", {min(LOADS):.2f}-{max(LOADS):.2f} during the generation runs" if LOADS else ""
    lines = [f"Device: {device_label(device)}; load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after{during} "
             f"(other work on the machine inflates times). Model: {a.n_layer} layers, width {a.n_embd}, {a.n_head} heads, "
             f"vocabulary {a.vocab:,}, random weights (the same for NBP and NTP), fused QKV as `load_generator` builds "
             f"it, batch {a.batch}; grid "
             f"{'x'.join(map(str, a.grid))}, {a.context_frames} latent context frames. Seconds: median (min-max) of "
             f"{gen_rows[0]['n']} interleaved repeats after one warm-up. Command: `{cmd}`.", "",
             "Linears: *fast* is `generate`'s default on CPU (fp32 weights: the compiled GEMV for one or two rows, "
             "oneDNN's reordered weight for more; the head over the sampled ids only, and for greedy steps of at most "
             f"{M.SCREEN_ROWS} rows the screened head (an int8 copy read in full, a few fp32 rows scored again: the "
             "argmax of the float64 logits; its limit counts the head at 1 byte a weight); a decode step's small ops "
             "on one thread, the wide linears and attention over a long cache on all; the filter and draw on all, "
             "over the logits); *plain* is `generate(..., fast=False)` (`F.linear`, every op on all threads). "
             "*Sampled* draws with the sort-free CPU filter (bracketed top k, "
             "rejection draw) with its passes over the logits compiled (`nbp.generator.kernels`"
             + ("" if kernels.enabled() else ": not built here, so torch ops") + "); *torch-op passes* is the same "
             "draw with torch ops for those passes; the *reference draw* sorts the top k and draws with "
             "`torch.multinomial`.", "",
             "| mode | block | linears | filter | forward passes | seconds | tokens/s | limit s | of the limit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in gen_rows:
        lim = generation_limit(r["model"], r["task"], hw, 1 if screened(r, a) else 4) if hw else None
        lim_s = f"{lim:.2f} | {lim / r['median']:.0%}" if lim else "- | -"
        same = "" if r["same"] is None else (" (same ids as fast)" if r["same"] else " (ids DIFFER from fast)")
        label = {True: "fast", False: "plain", **ABLATIONS}[r["fast"]]
        lines.append(f"| {r['mode']} | {r['block']} | {label + same} | {r['filter']} | "
                     f"{r['steps']} | {fmt(r)} | {r['tokens_per_s']:,.0f} | {lim_s} |")
    by = {(r["mode"], r["filter"], r["fast"]): r["median"] for r in gen_rows}
    notes = ["NBP speed-up over NTP (same weights, fast): " + "; ".join(
        f"{f}: {by[('NTP', f, True)] / by[('NBP', f, True)]:.1f}x" for f in FILTERS) + "."]
    ref, tops = by.get(("NBP", REFERENCE, True)), by.get(("NBP", TORCH_OPS, True))
    notes.append(f"Sampled / greedy (fast): NBP {by[('NBP', SAMPLED, True)] / by[('NBP', 'greedy', True)]:.2f}, "
                 f"NTP {by[('NTP', SAMPLED, True)] / by[('NTP', 'greedy', True)]:.2f}"
                 + (f"; NBP with the torch-op passes {tops / by[('NBP', 'greedy', True)]:.2f}" if tops else "")
                 + (f"; NBP with the reference draw {ref / by[('NBP', 'greedy', True)]:.2f}." if ref else "."))
    plain = [f"{m} {f}: {by[(m, f, False)] / by[(m, f, True)]:.1f}x" for m in ("NBP", "NTP") for f in FILTERS
             if (m, f, False) in by]
    if plain:
        notes.append("Fast over plain: " + "; ".join(plain) + ".")
    if all(("NTP", "greedy", k) in by for k in ABLATIONS):
        fast = by[("NTP", "greedy", True)]
        notes.append(f"NTP greedy (interleaved in the same run): the screened head makes it "
                     f"{by[('NTP', 'greedy', NO_SCREEN)] / fast:.2f}x as fast as over fp32 logits, and the compiled "
                     f"one-row GEMV {by[('NTP', 'greedy', BEFORE)] / by[('NTP', 'greedy', NO_SCREEN)]:.2f}x as fast "
                     f"as oneDNN's (both: {by[('NTP', 'greedy', BEFORE)] / fast:.2f}x session 13's path).")
    screen = gen_rows[0]["model"].head.__dict__.get("screen")
    if screen is not None and screen.rows:
        notes.append(f"The screened head (NTP greedy, fast) scored {screen.rescored / screen.rows:.1f} candidate ids "
                     f"again per row on average (of {a.vocab:,}).")
    n_step = step_rows[0]["n"]
    lines += ["", *notes, "",
              f"One decode step, ms: median (min-max) of {n_step} interleaved runs (the full forward: every fifth). The "
              "bare forward runs the same linears (fast: the same packs and threads) as plain functional calls over "
              "ready keys/values.", "",
              "| mode | prefix | new tokens | linears | cached step | fixed-shape step | bare forward | cached / bare "
              "| full forward | full / cached | limit ms | of the limit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in step_rows:
        for tag, label in (("", "fast"), ("plain_", "plain")):
            c, st, b, f = (r[f"{tag}{k}_ms"] for k in ("cached", "static", "bare", "full"))
            lim = ""
            if hw:
                by_, fl = step_cost(r["model"], r["new"], r["prefix"], a.vocab)
                ms = 1e3 * max(by_ / hw["bw"], fl / hw["flops"])
                lim = f"{ms:.2f} | {ms / c['median']:.0%}"
            else:
                lim = "- | -"
            lines.append(f"| {r['mode']} | {r['prefix']} | {r['new']} | {label} | {fmt(c)} | {fmt(st)} | {fmt(b)} | "
                         f"{c['median'] / b['median']:.2f} | {fmt(f, 1)} | {f['median'] / c['median']:.1f}x | {lim} |")
    if hw:
        m = step_rows[0]["model"]
        lines += ["", f"Hardware limits (measured in this run, {torch.get_num_threads()} threads): read bandwidth "
                  f"{hw['bw'] / 1e9:.1f} GB/s ({hw['bw_range'][0] / 1e9:.1f}-{hw['bw_range'][1] / 1e9:.1f}; `x.sum()` "
                  f"over {hw['bw_mb']} MB), sgemm {hw['flops'] / 1e9:.0f} GFLOP/s ({hw['flops_range'][0] / 1e9:.0f}-"
                  f"{hw['flops_range'][1] / 1e9:.0f}; {hw['m']}^3), median of 5 each. A step's limit is max(bytes / "
                  "bandwidth, FLOPs / sgemm rate); a generation's is the prefill's FLOPs / sgemm rate plus every "
                  "step's limit; *of the limit* = limit / measured median."]
        for r in step_rows:
            by_, fl = step_cost(m, r["new"], r["prefix"], a.vocab)
            lines.append(f"- {r['mode']} step ({r['new']} new after {r['prefix']}): {by_ / 1e6:.0f} MB read (weights "
                         f"and cache), {fl / 1e9:.2f} GFLOP -> {1e3 * by_ / hw['bw']:.2f} ms at the bandwidth, "
                         f"{1e3 * fl / hw['flops']:.2f} ms at the sgemm rate.")
    if prof:
        lines += ["", "Where the time goes (torch.profiler, self CPU time; one run each, after a warm-up):", "",
                  "| run | seconds | top ops (share of self CPU time, calls) |", "|---|---|---|"]
        for name, sec, top in prof:
            ops = "; ".join(f"{k} {sh:.0%} ({n})" for k, sh, n in top)
            lines.append(f"| {name} | {sec:.2f} | {ops} |")
    return "\n".join(lines) + "\n"


def model_args(p: argparse.ArgumentParser) -> None:
    """The benchmark model and task (the issue's setting by default): also filter_cost.py's."""
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--grid", type=int, nargs=3, default=[5, 16, 16])
    p.add_argument("--block", type=int, default=16, help="NBP block: 1x1xBLOCK")
    p.add_argument("--context-frames", type=int, default=2)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    model_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefix", type=int, default=1024, help="prefix length of the per-step comparison")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference-draw rows")
    p.add_argument("--no-plain", dest="plain", action="store_false", help="skip the plain-path generation rows")
    p.add_argument("--no-ablations", dest="ablations", action="store_false",
                   help="skip the NTP greedy rows without the screened head and without the compiled one-row GEMV")
    p.add_argument("--profile-ntp", type=int, default=64, help="new tokens of the profiled NTP run")
    p.add_argument("--profile", action="store_true", help="print torch.profiler summaries of one NBP sampled run")
    p.add_argument("--tiny", action="store_true", help="smoke size: 1 layer, width 64, grid 3x4x4, 20,000 codes")
    p.add_argument("--md", default="results/speed.md", help="'' to write nothing")
    a = p.parse_args(argv)
    if a.tiny:
        a.n_layer, a.n_embd, a.n_head, a.vocab, a.grid, a.block, a.context_frames, a.prefix = 1, 64, 2, 20000, [3, 4, 4], 4, 1, 32
        a.profile_ntp = 4
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=a.vocab, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd))
    model.prepare_inference(device=device)  # as load_generator (eval_generator, nbp sample): fused QKV
    load0 = os.getloadavg()[0]
    print(f"load average before: {os.getloadavg()}", flush=True)
    gen_rows = bench_generation(model, a, device)
    step_rows = bench_step(model, a, device)
    for r in gen_rows + step_rows:
        r["model"] = model
    hw = hardware(a, device)
    prof = None
    if a.profile:
        tables, prof = profile_runs(model, a, device)
        print(tables)
    load1 = os.getloadavg()[0]
    print(f"load average after: {os.getloadavg()}", flush=True)
    cmd = "python benchmarks/sampling_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = markdown(gen_rows, step_rows, a, device, cmd.strip(), (load0, load1), hw, prof)
    print(body)
    if a.md:
        title = f"Sampling: NBP vs NTP, greedy vs sampled, cached step vs bare forward ({device.type})"
        write_markdown_section(Path(a.md), f"{KEY}_{device.type}", title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
