"""Where the CPU filter's time goes: the sort-free draw (`sampling._draw_filtered`) on the logits of a real
generation, whole and by its passes, with the compiled passes (`nbp.generator.kernels`) and with the torch ops that
replace them where the extension is not built, against the budget that "sampled within 15 % of greedy" leaves it.

The benchmark's model (as ``sampling_speed.py``: 4 layers, width 512, 64K codes, K600 protocol, NBP 1x1x16,
batch 1) generates one video with the evaluation filter (top-k 16,000, top-p 0.9); the logits of each of its steps
are kept. Then, interleaved over ``--repeats`` repeats, each timed over all the kept steps (median, min-max, per
step):

- greedy generation (its seconds per step set the budget: 15 % of a greedy step, plus the ``argmax`` the draw
  replaces), and sampled generation with the compiled passes and with torch ops;
- the whole draw, both ways, and on one thread;
- ``argmax`` (what greedy does instead);
- the draw's passes over the whole block of logits, each as the draw calls it: the row maximum, the sample's
  ``topk``, the two-level inverse CDF of a round of draws, and, both ways, the first pass (``weigh``: the weights
  ``exp(x - max)``, their chunk sums, and the counts and masses at the top-k bracket's two thresholds) and the
  second counting pass (``counts_masses`` at the nucleus' two thresholds);
- what remains of the compiled draw: the whole draw less those passes (the bookkeeping on a few values a row, the
  exact decisions and their standing passes).

Writes the ``filter_cost_cpu`` section of ``results/speed.md``.

    python benchmarks/filter_cost.py                      # the issue's setting
    python benchmarks/filter_cost.py --tiny --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embedded_seeds import machine  # noqa: E402
from sampling_speed import frame_task, model_args  # noqa: E402

from nbp.generator import kernels  # noqa: E402
from nbp.generator import sampling as S  # noqa: E402
from nbp.generator.model import GPT, GPTConfig  # noqa: E402
from nbp.io import write_markdown_section  # noqa: E402

KEY = "filter_cost"
TARGET = 1.15  # sampled / greedy, issue 14
PASSES_WAY = {True: "compiled (nbp.generator.kernels), and torch ops where a row says so",
              False: "torch ops (the extension is not built, or NBP_KERNELS=0)"}


@contextlib.contextmanager
def kept_logits(into: list[torch.Tensor]):
    """Keep a copy of the logits every CPU draw is given (after temperature) while generating."""
    draw = S._draw_filtered

    def keep(x, *args, **kwargs):
        into.append(x.detach().clone())
        return draw(x, *args, **kwargs)

    S._draw_filtered = keep
    try:
        yield
    finally:
        S._draw_filtered = draw


def per_step(fn, steps: list[torch.Tensor]) -> float:
    """Seconds per step of ``fn(x)`` over the kept steps."""
    t0 = time.perf_counter()
    for x in steps:
        fn(x)
    return (time.perf_counter() - t0) / len(steps)


def parts(top_k: int, top_p: float, threads: int, steps: list[torch.Tensor]) -> dict[str, object]:
    """label -> a function of one step's logits x [n, V] that runs that part as the draw does."""
    n, V = steps[0].shape
    buf = torch.empty(2 * n * V)
    ready = {}  # id(x) -> (m, w2, cumulative chunk sums, first thresholds, nucleus thresholds), made once

    def prep(x):
        if id(x) not in ready:
            m = x.amax(-1, keepdim=True)
            w2 = S.weights(x, m).clone()
            cw = S._chunked(w2[:, 1]).sum(-1)
            t1 = S.top_k_marks(S.sample_top(x, top_k), m, top_k, V)
            t2 = torch.quantile(x[:, ::97], torch.tensor([0.95, 0.9]), dim=-1).T.contiguous()  # [n, 2]
            ready[id(x)] = (m, w2, cw.double().cumsum(-1), t1, t2)
        return ready[id(x)]

    for x in steps:
        prep(x)

    def whole(nthreads, compiled=True):
        def run(x):
            torch.set_num_threads(nthreads)
            with contextlib.nullcontext() if compiled else kernels.torch_ops():
                S._draw_filtered(x, top_k, top_p, torch.Generator().manual_seed(0))
            torch.set_num_threads(threads)
        return run

    def first(x):
        m, _, _, t, _ = prep(x)
        S.weigh(x, m, torch.empty(n, V // S.CHUNK), t, buf)

    def second(x):
        _, w2, _, _, t = prep(x)
        S.counts_masses(x, w2, t, buf)

    def torch_ops(fn):
        def run(x):
            with kernels.torch_ops():
                fn(x)
        return run

    out = {"whole draw": whole(threads), "whole draw, torch ops": whole(threads, False),
           "whole draw, one thread": whole(1), "argmax (greedy)": lambda x: x.argmax(-1),
           "row maximum": lambda x: x.amax(-1, keepdim=True),
           "sample topk": lambda x: S.sample_top(x, top_k),
           "first pass: weights, chunk sums, counts at 2 thresholds": first,
           "first pass, torch ops": torch_ops(first),
           "counting pass, 2 thresholds": second,
           "counting pass, 2 thresholds, torch ops": torch_ops(second),
           "inverse CDF, 12 draws a row": lambda x: S._inverse_cdf(
               S._chunked(prep(x)[1][:, 1]), prep(x)[2], None, S.FULL_CANDIDATES, torch.Generator().manual_seed(0))}
    if not kernels.enabled():  # without the extension both would be torch ops: keep one of each
        out = {k: v for k, v in out.items() if "torch ops" not in k}
    return out


PASSES = ["row maximum", "sample topk", "first pass: weights, chunk sums, counts at 2 thresholds",
          "counting pass, 2 thresholds", "inverse CDF, 12 draws a row"]  # what one draw runs over the whole block


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.2f} ({min(xs) * 1e3:.2f}-{max(xs) * 1e3:.2f})"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_args(p)
    p.add_argument("--top-k", type=int, default=16000)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="smoke size: 1 layer, width 64, grid 3x4x4, 20,480 codes")
    p.add_argument("--md", default="results/speed.md", help="'' to write nothing")
    a = p.parse_args(argv)
    if a.tiny:
        a.n_layer, a.n_embd, a.n_head, a.vocab, a.grid, a.block, a.top_k = 1, 64, 2, 20480, [3, 4, 4], 4, 5000
    return a


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=a.vocab, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd))
    model.prepare_inference(device=torch.device("cpu"))
    task = frame_task(a.grid, (1, 1, a.block), a.vocab, a.context_frames)
    context = torch.randint(0, a.vocab, (1, *a.grid), generator=torch.Generator().manual_seed(0))
    prompt = S.prompt_ids(task, context=context)
    load0 = os.getloadavg()
    print(f"load average before: {load0}", flush=True)
    steps: list[torch.Tensor] = []
    with kept_logits(steps):
        S.generate(model, task, prompt, generator=torch.Generator().manual_seed(0), top_k=a.top_k, top_p=a.top_p)
    if not steps:
        raise SystemExit("filter_cost: the generation made no CPU draw (nothing to time)")
    if S._chunked(steps[0]) is None:
        raise SystemExit(f"filter_cost: {steps[0].shape[1]} logits a row is not a multiple of the draw's chunk of "
                         f"{S.CHUNK}: its proposal would be cut first (choose --vocab accordingly)")
    fns = parts(a.top_k, a.top_p, a.threads, steps)
    compiled = kernels.enabled()
    gens = ["greedy generation", "sampled generation"] + (["sampled generation, torch ops"] if compiled else [])
    times: dict[str, list[float]] = {**{k: [] for k in gens}, **{k: [] for k in fns}}
    for r in range(a.repeats + 1):  # the first repeat warms up and is dropped
        t0 = time.perf_counter()
        S.generate(model, task, prompt, greedy=True)
        greedy = (time.perf_counter() - t0) / len(steps)
        got = {"greedy generation": greedy}
        for label in gens[1:]:
            t0 = time.perf_counter()
            with contextlib.nullcontext() if label == "sampled generation" else kernels.torch_ops():
                S.generate(model, task, prompt, generator=torch.Generator().manual_seed(r), top_k=a.top_k, top_p=a.top_p)
            got[label] = (time.perf_counter() - t0) / len(steps)
        got |= {k: per_step(f, steps) for k, f in fns.items()}
        if r:
            for k, v in got.items():
                times[k].append(v)
    load1 = os.getloadavg()
    print(f"load average after: {load1}", flush=True)
    # paired per repeat: the rest of the draw, the ratio, the budget
    rest = [w - sum(times[p][i] for p in PASSES) for i, w in enumerate(times["whole draw"])]
    ratios = {k: [s / g for s, g in zip(times[k], times["greedy generation"])] for k in gens[1:]}
    budget = [(TARGET - 1) * g + am for g, am in zip(times["greedy generation"], times["argmax (greedy)"])]
    n, V = steps[0].shape
    cmd = "python benchmarks/filter_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"`{cmd.strip()}`: {a.n_layer} layers, width {a.n_embd}, {a.vocab:,} codes, NBP 1x1x{a.block}, "
             f"grid {'x'.join(map(str, a.grid))} with {a.context_frames} context frames, batch 1, {a.threads} threads; "
             f"top-k {a.top_k:,}, top-p {a.top_p}; the draw's input: {len(steps)} steps of {n} x {V:,} logits from one "
             f"sampled generation. Milliseconds per step, median (min-max) of {a.repeats} interleaved repeats. "
             f"CPU: {machine()}; torch {torch.__version__}. Load average {load0[0]:.2f} before, {load1[0]:.2f} "
             f"after. The draw's passes: {PASSES_WAY[compiled]}"
             f"{f', {kernels.width()} floats a vector' if compiled else ''}.", "",
             "| | ms per step |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in times.items()]
    lines += [f"| the rest of the draw (whole draw less the passes it runs: {', '.join(PASSES)}) | {fmt(rest)} |",
              f"| budget of the draw for sampled / greedy <= {TARGET} ({TARGET - 1:.2f} x a greedy step + argmax) "
              f"| {fmt(budget)} |", "",
              *(f"{k.capitalize()} / greedy generation, paired per repeat: {statistics.median(v):.3f} "
                f"({min(v):.3f}-{max(v):.3f})." for k, v in ratios.items()), ""]
    body = "\n".join(lines) + "\n"
    print(body)
    if a.md:
        write_markdown_section(Path(a.md), f"{KEY}_cpu", "The CPU filter's cost, whole and by pass "
                               "(benchmarks/filter_cost.py)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
