"""Sampling speed: NBP vs NTP generation with the same weights, and one cached decode step vs a full forward.

Writes the ``sampling_speed`` section of ``results/speed.md`` (one section per device type):

- generation of a K600-protocol video (2 latent context frames given, the remaining tokens generated) with
  block 1x1x16 (NBP) and 1x1x1 (NTP), batch 1, greedy and with the released evaluation filter (top-k 16,000,
  top-p 0.9): seconds, forward passes, tokens/s and the NBP/NTP speed-up (the tokenizer is not included here;
  ``eval_generator``'s ``fps`` includes it);
- the per-step cost of our cached decode step (B new tokens attend to a preallocated cache) vs one full
  forward over the same prefix (what a sampler without a cache pays per step).

    python benchmarks/sampling_speed.py                       # 4 layers, width 512, 64K vocabulary (the issue's setting)
    python benchmarks/sampling_speed.py --n-layer 24 --n-embd 1536 --n-head 16 --device cuda   # 700M
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from nbp.generator.layout import BlockLayout, TaskLayout
from nbp.generator.model import GPT, GPTConfig, KVCache
from nbp.generator.sampling import decode_step, generate, prefill, prompt_ids
from nbp.io import write_markdown_section

KEY = "sampling_speed"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def frame_task(grid, block, vocab, context_frames) -> TaskLayout:
    return TaskLayout("frame_pred", BlockLayout(tuple(grid), tuple(block)), vocab, context_frames=context_frames)


def bench_generation(model, a, device) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, a.vocab, (a.batch, *a.grid), generator=g)
    filters = {"greedy": dict(greedy=True), "top-k 16000, top-p 0.9": dict(top_k=16000, top_p=0.9)}
    for mode, block in (("NBP", (1, 1, a.block)), ("NTP", (1, 1, 1))):
        task = frame_task(a.grid, block, a.vocab, a.context_frames)
        prompt = prompt_ids(task, context=context).to(device)
        for fname, kw in filters.items():
            rng = torch.Generator(device=device).manual_seed(0)
            sec = timed(functools.partial(generate, model, task, prompt, generator=rng, **kw), device, a.repeats)
            new = task.num_tokens - task.context_len
            rows.append({"mode": mode, "block": "x".join(map(str, block)), "filter": fname, "steps": task.steps,
                         "seconds": sec, "tokens_per_s": a.batch * new / sec})
    return rows


def bench_step(model, a, device) -> list[dict]:
    rows = []
    for mode, block in (("NBP", (1, 1, a.block)), ("NTP", (1, 1, 1))):
        task = frame_task(a.grid, block, a.vocab, a.context_frames)
        B = task.block_size
        P = a.prefix
        ids = torch.randint(0, a.vocab, (a.batch, P + B), device=device)
        cache = KVCache.for_model(model, a.batch, max_len=P + B)
        with torch.no_grad():
            prefill(model, task, ids[:, :P], cache)
            step = timed(functools.partial(decode_step, model, task, ids[:, P:], cache, P), device, a.repeats * 5)
            full = timed(functools.partial(model, ids, task.dense_mask(P + B, device=device)), device, a.repeats)
        rows.append({"mode": mode, "prefix": P, "new": B, "step_ms": 1e3 * step, "full_ms": 1e3 * full, "ratio": full / step})
    return rows


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible), torch {torch.__version__}"


def markdown(gen_rows, step_rows, a, device, cmd) -> str:
    lines = [f"Device: {device_label(device)}. Model: {a.n_layer} layers, width {a.n_embd}, {a.n_head} heads, "
             f"vocabulary {a.vocab:,}, random weights (the same for NBP and NTP), batch {a.batch}; "
             f"grid {'x'.join(map(str, a.grid))}, {a.context_frames} latent context frames. Command: `{cmd}`.", "",
             "| mode | block | filter | forward passes | seconds | tokens/s |", "|---|---|---|---|---|---|"]
    for r in gen_rows:
        lines.append(f"| {r['mode']} | {r['block']} | {r['filter']} | {r['steps']} | {r['seconds']:.2f} "
                     f"| {r['tokens_per_s']:,.0f} |")
    by = {(r["mode"], r["filter"]): r["seconds"] for r in gen_rows}
    ratios = [f"{f}: {by[('NTP', f)] / by[('NBP', f)]:.1f}x" for f in dict.fromkeys(r["filter"] for r in gen_rows)]
    lines += ["", "NBP speed-up over NTP (same weights): " + "; ".join(ratios) + ".", "",
              "| mode | prefix | new tokens | cached decode step (ms) | full forward over prefix + new (ms) | full / cached |",
              "|---|---|---|---|---|---|"]
    for r in step_rows:
        lines.append(f"| {r['mode']} | {r['prefix']} | {r['new']} | {r['step_ms']:.2f} | {r['full_ms']:.2f} "
                     f"| {r['ratio']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64000)
    p.add_argument("--grid", type=int, nargs=3, default=[5, 16, 16])
    p.add_argument("--block", type=int, default=16, help="NBP block: 1x1xBLOCK")
    p.add_argument("--context-frames", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prefix", type=int, default=1024, help="prefix length of the per-step comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--md", default="results/speed.md")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=a.vocab, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)).to(device).eval()
    gen_rows = bench_generation(model, a, device)
    step_rows = bench_step(model, a, device)
    cmd = "python benchmarks/sampling_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = markdown(gen_rows, step_rows, a, device, cmd.strip())
    print(body)
    title = f"Sampling: NBP vs NTP, cached step vs full forward ({device.type})"
    write_markdown_section(Path(a.md), f"{KEY}_{device.type}", title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
