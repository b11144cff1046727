"""Sampling speed: NBP vs NTP generation with the same weights, greedy and sampled in one process, and one
cached decode step vs the bare transformer forward of the same shapes.

Writes the ``sampling_speed`` section of ``results/speed.md`` (one section per device type):

- generation of a K600-protocol video (2 latent context frames given, the remaining tokens generated) with
  block 1x1x16 (NBP) and 1x1x1 (NTP), batch 1: greedy, the released evaluation filter (top-k 16,000, top-p
  0.9) with our sort-free sampler, and (NBP) the same filter with the sort-based reference draw. Runs are
  interleaved (each repeat runs every setting once, greedy and sampled back to back), reported as median and
  min-max over the repeats, with the load average before and after (the tokenizer is not included here;
  ``eval_generator``'s ``fps`` includes it);
- one decode step of a block at a given prefix: our cached step (slices of the preallocated cache), the
  fixed-shape step (:meth:`GPT.static_step`), the *bare* forward (the same matmuls, layer norms and attention
  as plain functional calls over ready-made keys/values: no cache writes, masks or module calls) and a full
  forward over prefix + block (what a sampler without a cache pays).

    python benchmarks/sampling_speed.py                       # 4 layers, width 512, 64K vocabulary (the issue's setting)
    python benchmarks/sampling_speed.py --profile             # also: torch.profiler summary of one NBP sampled run
    python benchmarks/sampling_speed.py --tiny --repeats 1    # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nbp.generator import sampling as S
from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, GPTConfig, KVCache
from nbp.io import write_markdown_section

KEY = "sampling_speed"
LOADS: list[float] = []  # 1-minute load average after each timed generation
FILTERS = {"greedy": dict(greedy=True), "top-k 16000, top-p 0.9": dict(top_k=16000, top_p=0.9)}
REFERENCE = "top-k 16000, top-p 0.9, sort-based reference draw"


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


def settings(a) -> list[tuple[str, tuple, str]]:
    out = []
    for mode, block in (("NBP", (1, 1, a.block)), ("NTP", (1, 1, 1))):
        out += [(mode, block, f) for f in FILTERS]
        if mode == "NBP" and a.reference:
            out.append((mode, block, REFERENCE))
    return out


def bench_generation(model, a, device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, a.vocab, (a.batch, *a.grid), generator=g)
    runs = {}
    for mode, block, fname in settings(a):
        task = frame_task(a.grid, block, a.vocab, a.context_frames)
        kw = FILTERS.get(fname, FILTERS["top-k 16000, top-p 0.9"])
        rng = torch.Generator(device=device).manual_seed(0)
        prompt = S.prompt_ids(task, context=context).to(device)
        runs[(mode, fname)] = (task, functools.partial(S.generate, model, task, prompt, generator=rng, **kw))
    for key, (_, fn) in runs.items():  # warm-up, one each
        with reference_draw() if key[1] == REFERENCE else contextlib.nullcontext():
            fn()
    times = {key: [] for key in runs}
    for _ in range(a.repeats):
        for key, (_, fn) in runs.items():
            with reference_draw() if key[1] == REFERENCE else contextlib.nullcontext():
                times[key].append(once(fn, device))
            LOADS.append(os.getloadavg()[0])
    rows = []
    for (mode, fname), (task, _) in runs.items():
        new = task.num_tokens - task.context_len
        sp = spread(times[(mode, fname)])
        rows.append({"mode": mode, "block": "x".join(map(str, task.layout.block)), "filter": fname, "steps": S.count_steps(task),
                     **sp, "tokens_per_s": a.batch * new / sp["median"]})
    return rows


def bare_forward(model: GPT, ids: torch.Tensor, start: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The decode step's arithmetic as plain functional calls: ids [B, n] at positions start.., keys/values
    per layer ready [B, nh, start+n, hs] -> logits [B, n, V]."""
    B, n = ids.shape
    C = model.config.n_embd
    nh = model.config.n_head
    x = F.embedding(ids, model.tok_emb.weight) + model.pos_emb[0, start:start + n]  # [B, n, C]
    for blk, (k, v) in zip(model.blocks, kv):
        at = blk.attn
        h = F.layer_norm(x, (C,), blk.ln1.weight, blk.ln1.bias)
        q = F.linear(h, at.query.weight, at.query.bias).view(B, n, nh, C // nh).transpose(1, 2)  # [B, nh, n, hs]
        F.linear(h, at.key.weight, at.key.bias)  # the new keys/values are computed (and dropped) as in a real step
        F.linear(h, at.value.weight, at.value.bias)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, C)  # [B, n, C]
        x = x + F.linear(y, at.proj.weight, at.proj.bias)
        h = F.layer_norm(x, (C,), blk.ln2.weight, blk.ln2.bias)
        x = x + F.linear(F.gelu(F.linear(h, blk.mlp[0].weight, blk.mlp[0].bias)), blk.mlp[2].weight, blk.mlp[2].bias)
    return F.linear(F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias), model.head.weight)


def bench_step(model, a, device) -> list[dict]:
    rows = []
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
            fns = {"cached": functools.partial(S.decode_step, model, task, ids[:, P:], cache, P),
                   "static": functools.partial(model.static_step, ids[:, P:], start, cache),
                   "bare": functools.partial(bare_forward, model, ids[:, P:], P, kv),
                   "full": functools.partial(model, ids, task.dense_mask(P + B, device=device))}
            for fn in fns.values():
                fn()
            t = {name: [] for name in fns}
            for r in range(a.repeats * 5):  # interleaved
                for name, fn in fns.items():
                    if name != "full" or r % 5 == 0:
                        t[name].append(once(fn, device))
        med = {name: spread(v) for name, v in t.items()}
        rows.append({"mode": mode, "prefix": P, "new": B, **{f"{n}_ms": {k: 1e3 * x for k, x in s.items() if k != "n"}
                                                            for n, s in med.items()}, "n": med["cached"]["n"]})
    return rows


def profile_summary(model, a, device, rows: int = 12) -> str:
    """torch.profiler tables (self CPU time) of one NBP sampled generation, reference draw then sort-free."""
    from torch.profiler import ProfilerActivity, profile

    task = frame_task(a.grid, (1, 1, a.block), a.vocab, a.context_frames)
    context = torch.randint(0, a.vocab, (a.batch, *a.grid), generator=torch.Generator().manual_seed(0))
    prompt = S.prompt_ids(task, context=context).to(device)
    out = []
    for name, ctx in (("reference draw", reference_draw), ("sort-free draw", contextlib.nullcontext)):
        with ctx():
            S.generate(model, task, prompt, generator=torch.Generator().manual_seed(0), **FILTERS["top-k 16000, top-p 0.9"])
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                S.generate(model, task, prompt, generator=torch.Generator().manual_seed(0), **FILTERS["top-k 16000, top-p 0.9"])
        out.append(f"== NBP sampled, {name} ==\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(out)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible), torch {torch.__version__}"


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def markdown(gen_rows, step_rows, a, device, cmd, load) -> str:
    during = f", {min(LOADS):.2f}-{max(LOADS):.2f} during the generation runs" if LOADS else ""
    lines = [f"Device: {device_label(device)}; load average (1 min) {load[0]:.2f} before, {load[1]:.2f} after{during} "
             f"(other work on the machine inflates times). Model: {a.n_layer} layers, width {a.n_embd}, {a.n_head} heads, "
             f"vocabulary {a.vocab:,}, random weights (the same for NBP and NTP), batch {a.batch}; grid "
             f"{'x'.join(map(str, a.grid))}, {a.context_frames} latent context frames. Seconds: median (min-max) of "
             f"{gen_rows[0]['n']} interleaved repeats after one warm-up. Command: `{cmd}`.", "",
             "| mode | block | filter | forward passes | seconds | tokens/s |", "|---|---|---|---|---|---|"]
    for r in gen_rows:
        lines.append(f"| {r['mode']} | {r['block']} | {r['filter']} | {r['steps']} | {fmt(r)} | {r['tokens_per_s']:,.0f} |")
    by = {(r["mode"], r["filter"]): r["median"] for r in gen_rows}
    sampled = "top-k 16000, top-p 0.9"
    notes = ["NBP speed-up over NTP (same weights): " + "; ".join(
        f"{f}: {by[('NTP', f)] / by[('NBP', f)]:.1f}x" for f in FILTERS) + "."]
    ref = by.get(("NBP", REFERENCE))
    notes.append(f"Sampled / greedy: NBP {by[('NBP', sampled)] / by[('NBP', 'greedy')]:.2f}, "
                 f"NTP {by[('NTP', sampled)] / by[('NTP', 'greedy')]:.2f}"
                 + (f"; NBP with the reference draw {ref / by[('NBP', 'greedy')]:.2f}." if ref else "."))
    n_step = step_rows[0]["n"]
    lines += ["", *notes, "",
              f"One decode step, ms: median (min-max) of {n_step} interleaved runs (the full forward: every fifth).", "",
              "| mode | prefix | new tokens | cached step | fixed-shape step | bare forward | cached / bare | full forward "
              "| full / cached |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in step_rows:
        c, st, b, f = r["cached_ms"], r["static_ms"], r["bare_ms"], r["full_ms"]
        lines.append(f"| {r['mode']} | {r['prefix']} | {r['new']} | {fmt(c)} | {fmt(st)} | {fmt(b)} | "
                     f"{c['median'] / b['median']:.2f} | {fmt(f, 1)} | {f['median'] / c['median']:.1f}x |")
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--grid", type=int, nargs=3, default=[5, 16, 16])
    p.add_argument("--block", type=int, default=16, help="NBP block: 1x1xBLOCK")
    p.add_argument("--context-frames", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefix", type=int, default=1024, help="prefix length of the per-step comparison")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the reference-draw rows")
    p.add_argument("--profile", action="store_true", help="print torch.profiler summaries of one NBP sampled run")
    p.add_argument("--tiny", action="store_true", help="smoke size: 1 layer, width 64, grid 3x4x4, 20,000 codes")
    p.add_argument("--md", default="results/speed.md", help="'' to write nothing")
    a = p.parse_args(argv)
    if a.tiny:
        a.n_layer, a.n_embd, a.n_head, a.vocab, a.grid, a.block, a.context_frames, a.prefix = 1, 64, 2, 20000, [3, 4, 4], 4, 1, 32
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=a.vocab, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)).to(device).eval()
    load0 = os.getloadavg()[0]
    print(f"load average before: {os.getloadavg()}", flush=True)
    gen_rows = bench_generation(model, a, device)
    step_rows = bench_step(model, a, device)
    load1 = os.getloadavg()[0]
    print(f"load average after: {os.getloadavg()}", flush=True)
    cmd = "python benchmarks/sampling_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = markdown(gen_rows, step_rows, a, device, cmd.strip(), (load0, load1))
    print(body)
    if a.profile:
        print(profile_summary(model, a, device))
    if a.md:
        title = f"Sampling: NBP vs NTP, greedy vs sampled, cached step vs bare forward ({device.type})"
        write_markdown_section(Path(a.md), f"{KEY}_{device.type}", title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
